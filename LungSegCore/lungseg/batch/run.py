"""Batch segmentation: `lungseg segment INPUT... -o OUT_DIR`.

Pipeline: DataLoader workers read and preprocess files, the main process runs the model in batches, and a
process pool post-processes and writes each output, so decoding, compute and writing overlap. Every input gets a record
`OUT_DIR/.lungseg/<name>.json`, written last and atomically: it marks the input as complete, so a rerun skips it
(unless `--overwrite`) and a killed run loses nothing. `results.csv` and `results.json` gather all records in the
folder, which also makes the outputs of several `--shard I/N` jobs add up to one table.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import LungSegError
from ..io.files import FATAL_WRITE_ERRNOS, OUT_OF_SPACE, list_inputs, prepare_output_folder, remove_partial_files, \
    stem_of, write_atomic_text, write_csv
from ..io.radiograph import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, ImageReadError, NotAnImageError, Radiograph, read_radiograph, \
    reorient, write_float_map, write_labelmap
from ..inference.labels import lung_areas
from .overlay import thumbnail_base, write_overlay, write_thumbnail
from ..inference.postprocess import postprocess
from ..qc.model import assess, reads_image
from .review import REVIEW_PAGE, write_review

RESULT_FIELDS = [
    "input", "status", "error", "output", "overlay", "probabilities", "uncertainty_map", "thumbnail", "model",
    "model_version",
    "definition", "device", "rows", "columns", "spacing_row_mm", "spacing_col_mm", "right_area_px", "left_area_px",
    "right_area_mm2", "left_area_mm2", "lung_fraction", "right_left_ratio", "quality", "qc_threshold", "qc",
    "qc_reasons", "uncertainty_mean",
    "orientation_corrected", "read_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "write_ms"]
RECORDS = ".lungseg"
THUMBNAILS = "thumbs"  # OUT/.lungseg/thumbs/<name>.jpg, for the review page


@dataclass
class Options:
    fmt: str = "nrrd"
    overlays: bool = False
    save_probabilities: bool = False
    uncertainty: bool = False
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # refuse larger images before decoding them (None: no limit)


def output_names(paths: list[Path]) -> dict[Path, str]:
    """A unique output stem per input: the file's stem, with a counter where two inputs share one."""
    names, used = {}, {}
    for path in paths:
        stem = stem_of(path)
        count = used.get(stem.lower(), 0)
        used[stem.lower()] = count + 1
        names[path] = stem if count == 0 else f"{stem}__{count + 1}"
    return names


def in_shard(path: Path, shard: tuple[int, int] | None) -> bool:
    """Shard I of N (1-based) by a hash of the path as given: every job agrees, with no overlap and no gap."""
    if shard is None:
        return True
    index, count = shard
    digest = int(hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:12], 16)
    return digest % count == index - 1


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise LungSegError(f"--shard '{text}': expected I/N, e.g. 3/10") from None
    if not 1 <= index <= count:
        raise LungSegError(f"--shard '{text}': I must be between 1 and N")
    return index, count


def record_path(out_dir: Path, name: str) -> Path:
    """The input's record, written last: it marks the input complete."""
    return out_dir / RECORDS / f"{name}.json"


def output_paths(out_dir: Path, name: str, options: Options) -> dict[str, Path]:
    float_ext = ".nrrd" if options.fmt in ("png", "dicom-seg") else OUTPUT_FORMATS[options.fmt]  # those hold no floats
    paths = {"output": out_dir / f"{name}{OUTPUT_FORMATS[options.fmt]}"}
    if options.overlays:
        paths["overlay"] = out_dir / f"{name}_overlay.png"
    if options.save_probabilities:
        paths["probabilities"] = out_dir / f"{name}_probabilities{float_ext}"
    if options.uncertainty:
        paths["uncertainty_map"] = out_dir / f"{name}_uncertainty{float_ext}"
    paths["thumbnail"] = out_dir / RECORDS / THUMBNAILS / f"{name}.jpg"  # always: the review page shows every input
    return paths


def is_complete(record_path: Path, expected: dict[str, Path]) -> bool:
    """An earlier run finished this input with the same outputs, all still present."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("status") == "ok" and all(record.get(k) == str(p) and p.exists() for k, p in expected.items())


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


def write_outputs(prediction, image: Radiograph, paths: dict[str, Path], row: dict, record: Path,
                  thumbnail=None) -> dict:
    t0 = time.perf_counter()
    if paths["output"].name.endswith(OUTPUT_FORMATS["dicom-seg"]):
        from ..io.dicomseg import write_dicom_seg

        write_dicom_seg(prediction.label, image.path, paths["output"], row["model"], row["model_version"],
                        row["definition"])
    else:
        write_labelmap(prediction.label, image.reference, paths["output"])
    if "overlay" in paths:
        write_overlay(image.pixels, prediction.label, paths["overlay"])
    if "probabilities" in paths:
        write_float_map(prediction.probabilities, image.reference, paths["probabilities"])
    if "uncertainty_map" in paths:
        write_float_map(prediction.uncertainty, image.reference, paths["uncertainty_map"])
    if "thumbnail" in paths:
        write_thumbnail(thumbnail, prediction.label, paths["thumbnail"])
    row.update({k: str(p) for k, p in paths.items()}, write_ms=round((time.perf_counter() - t0) * 1e3, 1))
    write_atomic_text(json.dumps(row), record)  # last: marks the input complete
    return row


def finish_row(item: dict, output: tuple, options: Options, card: dict) -> tuple:
    """Post-process one model output (`ModelOutput.item`: probabilities, uncertainty, member spread) into its
    prediction (on the input grid) and its results row, with its QC (`quality.assess`: the rules of the card's
    lung definition and the predicted quality of its `qc` block)."""
    t0 = time.perf_counter()
    image: Radiograph = item["image"]
    probabilities, uncertainty, member_spread = output
    prediction = postprocess(probabilities, image.shape, uncertainty, options.save_probabilities, image.display_flips,
                             member_spread, item.get("model_image"))
    flip_rows, flip_cols = image.display_flips
    assessment = assess(prediction, card)
    row = {"rows": image.shape[0], "columns": image.shape[1],
           "spacing_row_mm": image.spacing[0] if image.spacing else "",
           "spacing_col_mm": image.spacing[1] if image.spacing else "",
           **lung_areas(prediction.label, image.pixel_area_mm2),
           "quality": "" if assessment.quality is None else assessment.quality,
           "qc": assessment.qc, "qc_reasons": "; ".join(assessment.reasons), "qc_threshold": assessment.threshold,
           "uncertainty_mean": round(float(prediction.uncertainty[prediction.label > 0].mean()), 4)
           if prediction.uncertainty is not None and (prediction.label > 0).any() else "",
           "orientation_corrected": "mirrored" if flip_cols else ("upside-down" if flip_rows else ""),
           "read_ms": round(item["read_ms"], 1), "preprocess_ms": round(item["preprocess_ms"], 1),
           "postprocess_ms": round((time.perf_counter() - t0) * 1e3, 1)}
    return prediction, row


# Held by a finisher while it works on an input: one whose batch process died exits between inputs, never within one.
_WORKING = threading.Lock()


def finish_and_write(item: dict, output: tuple, options: Options, card: dict, paths: dict[str, Path], row: dict,
                     record: Path) -> dict:
    """Post-processing, QC and writing of one input, run in a separate process beside the model."""
    with _WORKING:
        prediction, stats = finish_row(item, output, options, card)
        return write_outputs(prediction, item["image"], paths, {**row, **stats}, record, item.get("thumbnail"))


HELPER_NICENESS = 10
PARENT_POLL_S = 1.0  # how often a helper looks whether its batch process is still there
READER_PREFETCH = 2  # batches each reader process reads ahead
START_METHOD_VARIABLE = "LUNGSEG_START_METHOD"  # fork or spawn: overrides the platform's choice (tests)


def start_method() -> str:
    """How reader and finisher processes start. `fork` on Linux: at once, sharing the loaded code. Windows has only
    `spawn`, and on macOS `fork` after the model has run is unsafe (CPython's documentation), so `spawn` there."""
    method = os.environ.get(START_METHOD_VARIABLE, "").strip()
    if not method:
        return "fork" if sys.platform.startswith("linux") else "spawn"
    if method not in ("fork", "spawn") or method not in multiprocessing.get_all_start_methods():
        raise LungSegError(f"{START_METHOD_VARIABLE}={method}: this platform starts processes with "
                           f"{' or '.join(m for m in ('fork', 'spawn') if m in multiprocessing.get_all_start_methods())}")
    return method


class ReaderDied(RuntimeError):
    """A batch from the reader processes could not be received: an image half sent, or shared by one now dead."""


def _reader_died(exc: BaseException) -> bool:
    """Whether `exc` says a reader process (a DataLoader worker) died: torch's report, or a batch it left behind."""
    return isinstance(exc, ReaderDied) or \
        isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker (pid")


def _helper_process(method: str, *_) -> None:
    """Start of a reader or finisher process: one thread, at a lower priority than the model. The model's threads
    then take every core whenever they can run, and the helpers fill the gaps; giving the model only the cores
    left over by the helpers capped it at its one-thread forward rate.

    A helper also leaves when its batch process dies (killed, or out of memory): neither kind saw it go. A
    finisher (a process pool's worker) waits for work on a pipe whose write end it holds too. A reader (torch's
    DataLoader worker) notices, but then waits forever at exit to flush an image into a pipe no one reads. Each
    killed batch left them behind, holding their memory."""
    torch.set_num_threads(1)
    _lower_priority()
    wait = functools.partial(_wait_for_parent_fork, os.getppid()) if method == "fork" else _wait_for_parent_spawn
    threading.Thread(target=_exit_with_parent, args=(wait,), daemon=True).start()


def _lower_priority() -> None:
    if hasattr(os, "nice"):  # POSIX
        os.nice(HELPER_NICENESS)
    elif sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), 0x4000)  # BELOW_NORMAL_PRIORITY_CLASS


def _wait_for_parent_fork(parent: int) -> None:
    """Forked helpers inherit each other's end of the pipe that signals the parent's exit, so poll the parent's id,
    which changes when the process is handed to another."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)


def _wait_for_parent_spawn() -> None:
    """A spawned helper holds a handle on its parent (Windows) or a pipe only the parent writes (POSIX), which its
    exit signals; Windows hands no orphan to another parent, so the parent's id would not change."""
    multiprocessing.parent_process().join()


def _exit_with_parent(wait) -> None:
    """Once the parent is gone, finish the input at hand (a finisher writes it whole, and the batch skips it when
    run again), then exit at once, without waiting on the pipes."""
    wait()
    _WORKING.acquire()
    os._exit(1)


def collect_results(out_dir: Path) -> list[dict]:
    rows = []
    for record in sorted((out_dir / RECORDS).glob("*.json")):
        try:
            rows.append(json.loads(record.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # a record being replaced by another shard right now; it is complete in its own table
    return sorted(rows, key=lambda r: r.get("input", ""))


def write_results(rows: list[dict], out_dir: Path) -> None:
    write_csv(rows, RESULT_FIELDS, out_dir / "results.csv")
    write_atomic_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", out_dir / "results.json")


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass
class RunSummary:
    done: int = 0        # inputs processed in this run
    failed: int = 0
    skipped: int = 0     # completed by an earlier run
    seconds: float = 0.0  # from the model being loaded to the last output written
    not_images: int = 0  # DICOM objects that hold no image (reports, presentation states, DICOMDIR): in `done`, skipped
    to_check: int = 0    # segmented in this run, and flagged by QC (qc=check)
    folder_results: int = 0    # segmented results in the output folder: this run's, earlier runs' and other shards'
    folder_to_check: int = 0   # of those, flagged by QC: what the review page puts first

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def run_segment(inputs: list[str], out_dir: str | Path, **kwargs) -> int:
    """The `lungseg segment` command: segment, print a one-line summary, return the exit status."""
    try:
        summary = segment_inputs(inputs, out_dir, **kwargs)
    except OSError as exc:  # a full disk, or a folder that became read-only: the run stops with one line
        if exc.errno not in FATAL_WRITE_ERRNOS:
            raise
        raise LungSegError(stopped_message(exc, Path(out_dir))) from exc
    if summary is None:
        print(f"lungseg: no input images found in {', '.join(map(str, inputs))}", file=sys.stderr)
        return 2
    images = summary.done - summary.not_images
    print(f"lungseg: {images - summary.failed} of {images} segmented, {summary.failed} failed"
          + (f", {summary.not_images} non-image DICOM objects skipped" if summary.not_images else "")
          + (f", {summary.skipped} already done (skipped)" if summary.skipped else "")
          + f", in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s); "
          f"results in {Path(out_dir) / 'results.csv'}; {summary.folder_to_check} of the folder's "
          f"{summary.folder_results} results flagged by QC to check, review page {Path(out_dir) / REVIEW_PAGE}")
    return 1 if summary.failed else 0


def stopped_message(exc: OSError, out_dir: Path) -> str:
    """One line for an OSError that stops a run: what failed, why, and that a rerun resumes."""
    name = str(exc.filename or out_dir)  # Python's own write errors name no file: the run writes only there
    if not Path(os.path.abspath(name)).is_relative_to(os.path.abspath(out_dir)):
        return f"{name}: {exc.strerror}"
    fix = "free some space" if exc.errno in OUT_OF_SPACE else "make the folder writable"
    return (f"writing to the output folder {out_dir} failed ({exc.strerror}: {name}); the run stopped. Every input "
            f"finished before is complete and no partial file is left: {fix} and rerun the same command to resume")


def segment_inputs(inputs: list[str], out_dir: str | Path, model: str = "unet", options: Options | None = None,
                   device: str = "auto", recursive: bool = False, shard: str | None = None, batch_size: int = 4,
                   workers: int | None = None, progress_lines: bool = False) -> RunSummary | None:
    """Segment every input (None when there is none); bad inputs become error rows, never exceptions."""
    from ..inference.segmenter import Segmenter

    options = options or Options()
    if options.fmt not in OUTPUT_FORMATS:
        raise LungSegError(f"unknown output format '{options.fmt}'; choose one of {', '.join(OUTPUT_FORMATS)}")
    if options.fmt == "dicom-seg":
        from ..io.dicomseg import require_highdicom

        require_highdicom()
    out_dir = Path(out_dir)
    all_paths = list_inputs(inputs, recursive=recursive)
    if not all_paths:
        return None
    names = output_names(all_paths)  # over all inputs, so that shards agree on names
    shard_range = parse_shard(shard)
    paths = [p for p in all_paths if in_shard(p, shard_range)]
    prepare_output_folder(out_dir)  # a folder that cannot be created or written is one line, before any work
    (out_dir / RECORDS).mkdir(exist_ok=True)

    todo = [p for p in paths if options.overwrite or not is_complete(record_path(out_dir, names[p]),
                                                                      output_paths(out_dir, names[p], options))]

    segmenter = Segmenter(model, device)
    run = BatchRun(segmenter, todo, names, out_dir, options, total=len(paths), batch_size=batch_size,
                   progress_lines=progress_lines)
    return run.run(default_workers() if workers is None else workers)


class BatchRun:
    """One `lungseg segment` run over `todo`, the inputs of this shard that no earlier run completed.

    The model runs in this process, in batches, and a process pool finishes and writes each output beside it
    (in the model's process, that work would halve its rate). `submit` hands a batch over; `settle` records one
    input's outcome. `done` and `failed` count this run's inputs, `skipped` those an earlier run completed, and
    `total` all inputs of the shard.
    """

    def __init__(self, segmenter, todo: list[Path], names: dict[Path, str], out_dir: Path, options: Options,
                 total: int, batch_size: int = 4, progress_lines: bool = False):
        self.segmenter, self.todo, self.names, self.out_dir, self.options = segmenter, todo, names, out_dir, options
        self.total, self.skipped = total, total - len(todo)
        self.batch_size, self.progress_lines = batch_size, progress_lines
        self.method = start_method()  # how the reader and finisher processes start
        self.done = self.failed = self.not_images = self.to_check = 0
        self.pending: list[tuple[dict, Future]] = []  # submitted, in input order
        self.handed: set[Path] = set()  # inputs settled or submitted
        self.suspects: set[Path] = set()  # held by finishers when one died: each is finished alone
        self.base = {"model": segmenter.name, "model_version": segmenter.card.get("version", ""),
                     "definition": segmenter.definition, "device": str(segmenter.device)}
        # what QC needs of the card, small enough to hand to the finishers with every input
        self.qc_card = {"definition": segmenter.definition, "qc": segmenter.card.get("qc")}
        self.qc_reads_image = reads_image(self.qc_card, self.options.uncertainty)  # else the input stays here
        self.bar = tqdm(total=len(todo), desc="segmenting", unit="image", disable=progress_lines or None)

    def run(self, workers: int) -> RunSummary:
        """Segment every input of `todo` with `workers` reader and finisher processes; then the results table."""
        t_start = time.perf_counter()
        remaining = self.todo
        while remaining:  # another round only after a reader or a finisher process died
            remaining = self.run_round(remaining, workers)
        self.bar.close()
        elapsed = time.perf_counter() - t_start
        rows = collect_results(self.out_dir)
        write_results(rows, self.out_dir)
        write_review(rows, self.out_dir)  # every finished input in the folder: earlier runs and other shards too
        segmented = [r for r in rows if r.get("status") == "ok"]
        return RunSummary(done=self.done, failed=self.failed, skipped=self.skipped, seconds=elapsed,
                          not_images=self.not_images, to_check=self.to_check, folder_results=len(segmented),
                          folder_to_check=sum(r.get("qc") == "check" for r in segmented))

    def run_round(self, inputs: list[Path], workers: int) -> list[Path]:
        """Read, segment and finish `inputs` with new reader and finisher processes; returns the inputs left for
        another round when one of those processes died."""
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context(self.method),
                                 initializer=_helper_process, initargs=(self.method,)) as finisher:
            try:
                self.read_and_segment(inputs, workers, finisher)
                self.settle_all()
            except BrokenProcessPool:
                # the readers are gone by now: they held the pool's pipe, and leaving it blocked the pool's shutdown
                interrupted = self.after_finisher_died()
            else:
                interrupted = []
        for path in interrupted:  # the pool's finishers are gone now: what they were writing is no one's
            name = self.names[path]
            for output in [*output_paths(self.out_dir, name, self.options).values(),
                           record_path(self.out_dir, name)]:
                remove_partial_files(output)
        return [path for path in inputs if path not in self.handed]

    def after_finisher_died(self) -> list[Path]:
        """A finisher process died (killed for memory, or a crash): the pool failed every input it held, which are
        returned. They are segmented again in the next round, each finished alone; one whose finisher dies then is
        the cause, and becomes an error."""
        waiting, self.pending = self.pending, []
        interrupted = []
        for row, future in waiting:
            if not isinstance(future.exception(), BrokenProcessPool):
                self.settle(row, future)
                continue
            path = Path(row["input"])
            interrupted.append(path)
            if path not in self.suspects:
                self.suspects.add(path)
                self.handed.discard(path)
            else:
                self.settle({**row, "status": "error",
                             "error": "not finished: a finisher process died while it held this input alone, after "
                                      "one died with it among others (too little memory, or a crash post-processing "
                                      "or writing it); a rerun retries it"})
        retried = sum(path not in self.handed for path in interrupted)
        if retried:  # else the one input it held has its error line
            tqdm.write(f"lungseg: a finisher process died (too little memory, or a crash) holding {retried} input(s): "
                       "they are segmented again, each finished alone", file=sys.stderr)
        return interrupted

    def read_and_segment(self, inputs: list[Path], workers: int, finisher: ProcessPoolExecutor) -> None:
        """Read `inputs` in `workers` reader processes and segment them. A reader process that dies (killed for
        memory, or a decoder that crashed) would leave the batch waiting forever on an image half sent: the inputs
        it may have held become errors (a rerun retries them), and the inputs never read are left unhanded, for a
        new round with new readers. A finisher that dies raises BrokenProcessPool once the readers are gone."""
        reader = InputReader(inputs, self.segmenter.size, self.options.overlays, self.options.max_pixels,
                             dicom_seg=self.options.fmt == "dicom-seg")
        loader = torch.utils.data.DataLoader(reader,
                                             batch_size=self.batch_size, num_workers=workers, collate_fn=_collate,
                                             prefetch_factor=READER_PREFETCH if workers else None,
                                             multiprocessing_context=self.method if workers else None,
                                             worker_init_fn=functools.partial(_helper_process, self.method))
        batches, read = iter(loader), 0
        reader_died = finisher_died = None
        try:
            while True:
                try:
                    items = next(batches)
                except StopIteration:
                    break
                except (OSError, EOFError) as exc:  # an image half sent, or shared through a reader now dead
                    raise ReaderDied(f"a batch from the readers could not be received: {type(exc).__name__}: "
                                     f"{exc}") from exc
                read += len(items)
                self.submit(items, finisher)
                # settle in input order: what is done at once (prompt progress), the rest when too many are in flight
                while self.pending and (self.pending[0][1].done() or len(self.pending) > 4 * self.batch_size):
                    self.settle(*self.pending.pop(0))
        except BrokenProcessPool as exc:
            finisher_died = exc
        except RuntimeError as exc:
            if not _reader_died(exc):
                raise
            reader_died = str(exc).strip().rstrip(".")
        del batches  # shuts its readers down now, and takes a dead one off torch's watch of its workers
        if finisher_died is not None:
            raise finisher_died
        if reader_died is None:
            return
        held = READER_PREFETCH * self.batch_size * workers  # what the readers may have been reading
        suspects = [path for path in inputs[read:read + held] if path not in self.handed]
        for path in suspects:
            self.handed.add(path)
            self.settle({**self.base, "input": str(path), "status": "error",
                         "error": f"not segmented: a reader process died while this input was among the "
                                  f"{len(suspects)} being read ({reader_died}; too little memory, or a crash "
                                  "decoding one of them); a rerun retries it"})

    def submit(self, items: list[dict], finisher: ProcessPoolExecutor) -> None:
        """Settle the unreadable inputs of a batch at once; run the model on the others and hand each output to
        the finisher."""
        good = [it for it in items if "error" not in it]
        for it in items:
            if "error" in it:
                self.settle({**self.base, "input": str(it["path"]), "status": it.get("status", "error"),
                             "error": it["error"]})
                self.handed.add(it["path"])
        if not good:
            return
        t0 = time.perf_counter()
        output = self.segmenter.predict(torch.stack([it["input"] for it in good]), self.options.uncertainty)
        inference_ms = (time.perf_counter() - t0) * 1e3 / len(good)
        for k, it in enumerate(good):
            alone = it["path"] in self.suspects  # with nothing else in flight: tells a cause from its company
            if alone:
                self.settle_all()
            name = self.names[it["path"]]
            row = {**self.base, "input": str(it["path"]), "status": "ok", "error": "",
                   "inference_ms": round(inference_ms, 1)}
            model_image = it.pop("input")[0]
            if self.qc_reads_image:
                it["model_image"] = model_image
            future = finisher.submit(finish_and_write, it, tuple(None if t is None else t.clone()
                                                                 for t in output.item(k)), self.options,
                                     self.qc_card, output_paths(self.out_dir, name, self.options), row,
                                     record_path(self.out_dir, name))
            self.pending.append((row, future))
            self.handed.add(it["path"])
            if alone:
                self.settle_all()

    def settle_all(self) -> None:
        while self.pending:
            self.settle(*self.pending.pop(0))

    def settle(self, row: dict, future: Future | None = None) -> None:
        """Count one input's outcome (the finisher's row, when it was submitted), record a failure, show progress."""
        if future is not None:
            try:
                row = future.result()
            except Exception as exc:  # this input failed, the batch goes on
                if isinstance(exc, OSError) and exc.errno in FATAL_WRITE_ERRNOS:
                    raise  # a full disk or a read-only folder fails every input: stop (run_segment says why)
                if _reader_died(exc) or isinstance(exc, BrokenProcessPool):  # a helper died: not this input's fault
                    self.pending.insert(0, (row, future))
                    raise
                row.update(status="error", error=f"post-processing or writing failed: {type(exc).__name__}: {exc}")
        if row["status"] != "ok":  # an error, or a skipped non-image object: its row in results.csv
            write_atomic_text(json.dumps(row), record_path(self.out_dir, self.names[Path(row["input"])]))
        if row["status"] == "error":
            self.failed += 1
            tqdm.write(f"lungseg: error: {row['input']}: {row['error']}", file=sys.stderr)
        elif row["status"] == "skipped":
            self.not_images += 1
        flagged = row["status"] == "ok" and row.get("qc") == "check"
        self.to_check += flagged
        self.done += 1
        self.bar.update(1)
        if self.progress_lines:  # for callers that track progress (the Slicer module), one flushed line per input
            status = "check" if flagged else row["status"]  # ok, check (segmented, flagged by QC), error, skipped
            print(f"lungseg-progress {self.done + self.skipped}/{self.total} {status} {row['input']}",
                  flush=True)
