"""Reading the batch's inputs: each file is read and preprocessed in a reader process (a DataLoader worker)."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import torch

from ..io.radiograph import DEFAULT_MAX_PIXELS, ImageReadError, NotAnImageError, read_radiograph, reorient
from .overlay import thumbnail_base
from .records import Options
from .workers import helper_process

READER_PREFETCH = 2  # batches each reader process reads ahead


class InputReader(torch.utils.data.Dataset):
    """Reads and preprocesses one input in a DataLoader worker; an unreadable file becomes an error item."""

    def __init__(self, paths: list[Path], size: int, keep_pixels: bool, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 dicom_seg: bool = False):
        self.paths, self.size, self.keep_pixels = paths, size, keep_pixels
        self.max_pixels, self.dicom_seg = max_pixels, dicom_seg  # dicom_seg: only DICOM sources can be referenced

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from ..inference.preprocess import model_input

        item = {"index": i, "path": self.paths[i]}
        t0 = time.perf_counter()
        try:
            if self.dicom_seg:
                from ..io.dicomseg import check_source

                check_source(self.paths[i])
            image = read_radiograph(self.paths[i], self.max_pixels)
            t1 = time.perf_counter()
            item["input"] = model_input(reorient(image.pixels, image.display_flips), self.size)
            item["thumbnail"] = thumbnail_base(item["input"][0].numpy(), image.shape, image.display_flips)
            if not self.keep_pixels:  # the full image is only needed for overlays; do not ship it between processes
                image = dataclasses.replace(image, pixels=None)
            item.update(image=image, read_ms=(t1 - t0) * 1e3, preprocess_ms=(time.perf_counter() - t1) * 1e3)
        except NotAnImageError as exc:  # a report, presentation state or DICOMDIR beside the images: nothing to do
            item.update(error=exc.problem, status="skipped")
        except ImageReadError as exc:
            item["error"] = exc.problem
        except Exception as exc:  # any other failure stays this file's problem
            item["error"] = f"{type(exc).__name__}: {exc}"
        return item


def _collate(items: list[dict]) -> list[dict]:
    return items


def input_loader(inputs: list[Path], size: int, options: Options, batch_size: int, workers: int,
                 method: str) -> torch.utils.data.DataLoader:
    """Batches of `inputs`, read in `workers` reader processes started with `method` (none: read in this one)."""
    reader = InputReader(inputs, size, options.overlays, options.max_pixels, dicom_seg=options.fmt == "dicom-seg")
    return torch.utils.data.DataLoader(reader,
                                       batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                       prefetch_factor=READER_PREFETCH if workers else None,
                                       multiprocessing_context=method if workers else None,
                                       worker_init_fn=functools.partial(helper_process, method))
