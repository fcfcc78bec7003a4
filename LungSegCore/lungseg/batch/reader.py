"""Reading the batch's inputs: each file is read and preprocessed in a reader process, a few batches ahead."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..io.radiograph import DEFAULT_MAX_PIXELS, ImageReadError, NotAnImageError, read_radiograph, reorient
from .overlay import thumbnail_base
from .records import Options
from .workers import ReaderDied, helper_process

READER_PREFETCH = 2  # batches each reader process reads ahead


def read_input(
    path: Path, size: int, keep_pixels: bool, max_pixels: int | None = DEFAULT_MAX_PIXELS, dicom_seg: bool = False
) -> dict:
    """Read and preprocess one input; an unreadable file becomes an error item. `keep_pixels`: the full image is
    only needed for overlays, so it is not sent between processes otherwise. `dicom_seg`: only DICOM sources can be
    referenced by a DICOM Segmentation."""
    from ..inference.preprocess import model_input

    item = {"path": path}
    t0 = time.perf_counter()
    try:
        if dicom_seg:
            from ..io.dicomseg import check_source

            check_source(path)
        image = read_radiograph(path, max_pixels)
        t1 = time.perf_counter()
        item["input"] = model_input(reorient(image.pixels, image.display_flips), size)
        item["thumbnail"] = thumbnail_base(item["input"][0], image.shape, image.display_flips)
        if not keep_pixels:
            image = dataclasses.replace(image, pixels=None)
        item.update(image=image, read_ms=(t1 - t0) * 1e3, preprocess_ms=(time.perf_counter() - t1) * 1e3)
    except NotAnImageError as exc:  # a report, presentation state or DICOMDIR beside the images: nothing to do
        item.update(error=exc.problem, status="skipped")
    except ImageReadError as exc:
        item["error"] = exc.problem
    except Exception as exc:  # any other failure stays this file's problem
        item["error"] = f"{type(exc).__name__}: {exc}"
    return item


def read_batches(
    inputs: list[Path], size: int, options: Options, batch_size: int, workers: int, method: str
) -> Iterator[list[dict]]:
    """Batches of `inputs` in their order, read in `workers` reader processes started with `method` (none: in this
    one), each up to READER_PREFETCH batches ahead. A reader that dies (killed for memory, or a decoder that
    crashed) raises ReaderDied naming the inputs that were being read; the rest are never read here."""
    args = (size, options.overlays, options.max_pixels, options.fmt == "dicom-seg")
    if not workers:
        for start in range(0, len(inputs), batch_size):
            yield [read_input(path, *args) for path in inputs[start : start + batch_size]]
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(method),
        initializer=helper_process,
        initargs=(method, "reader"),
    )
    try:
        ahead, queue, batch = READER_PREFETCH * batch_size * workers, deque(), []
        upcoming = iter(inputs)
        while True:
            try:
                while len(queue) < ahead and (path := next(upcoming, None)) is not None:
                    queue.append((path, pool.submit(read_input, path, *args)))
                if not queue:
                    break
                batch.append(queue[0][1].result())
            except BrokenProcessPool as exc:  # the reads under way fail; those done before are read again
                wait([future for _, future in queue])
                held = [p for p, future in queue if isinstance(future.exception(), BrokenProcessPool)]
                raise ReaderDied(held, "a reader process ended abruptly") from exc
            queue.popleft()
            if len(batch) == batch_size or not queue:
                yield batch
                batch = []
    finally:  # at once: a reader still reading would keep the finishers' pipes open (forked, it holds them too)
        pool.shutdown(wait=True, cancel_futures=True)
