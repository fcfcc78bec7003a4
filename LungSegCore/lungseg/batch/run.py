"""Batch segmentation: `lungseg segment INPUT... -o OUT_DIR`.

Pipeline: DataLoader workers read and preprocess files (`reader`), the main process runs the model in batches, and a
process pool post-processes and writes each output (`finish`), so decoding, compute and writing overlap. Each input's
record (`records`) marks it complete, so a rerun skips it and a killed run loses nothing; `workers` starts the helper
processes and recovers when one dies.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import LungSegError
from ..io.files import FATAL_WRITE_ERRNOS, OUT_OF_SPACE, list_inputs, prepare_output_folder, write_atomic_text
from ..io.radiograph import OUTPUT_FORMATS
from ..qc.model import reads_image
from .finish import finish_and_write
from .reader import read_batches
from .records import (
    RECORDS,
    Options,
    collect_results,
    in_shard,
    is_complete,
    output_names,
    output_paths,
    parse_shard,
    record_path,
    remove_partial_outputs,
    write_results,
)
from .review import REVIEW_PAGE, write_review
from .workers import (
    ReaderDied,
    default_workers,
    helper_process,
    reader_death_errors,
    recover_from_finisher_death,
    start_method,
)


@dataclass
class RunSummary:
    done: int = 0  # inputs processed in this run
    failed: int = 0
    skipped: int = 0  # completed by an earlier run
    seconds: float = 0.0  # from the model being loaded to the last output written
    not_images: int = 0  # DICOM objects that hold no image (reports, presentation states, DICOMDIR): in `done`, skipped
    to_check: int = 0  # segmented in this run, and flagged by QC (qc=check)
    folder_results: int = 0  # segmented results in the output folder: this run's, earlier runs' and other shards'
    folder_to_check: int = 0  # of those, flagged by QC: what the review page puts first

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
    print(
        f"lungseg: {images - summary.failed} of {images} segmented, {summary.failed} failed"
        + (f", {summary.not_images} non-image DICOM objects skipped" if summary.not_images else "")
        + (f", {summary.skipped} already done (skipped)" if summary.skipped else "")
        + f", in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s); "
        f"results in {Path(out_dir) / 'results.csv'}; {summary.folder_to_check} of the folder's "
        f"{summary.folder_results} results flagged by QC to check, review page {Path(out_dir) / REVIEW_PAGE}"
    )
    return 1 if summary.failed else 0


def stopped_message(exc: OSError, out_dir: Path) -> str:
    """One line for an OSError that stops a run: what failed, why, and that a rerun resumes."""
    name = str(exc.filename or out_dir)  # Python's own write errors name no file: the run writes only there
    if not Path(os.path.abspath(name)).is_relative_to(os.path.abspath(out_dir)):
        return f"{name}: {exc.strerror}"
    fix = "free some space" if exc.errno in OUT_OF_SPACE else "make the folder writable"
    return (
        f"writing to the output folder {out_dir} failed ({exc.strerror}: {name}); the run stopped. Every input "
        f"finished before is complete and no partial file is left: {fix} and rerun the same command to resume"
    )


def segment_inputs(
    inputs: list[str],
    out_dir: str | Path,
    model: str = "unet",
    options: Options | None = None,
    device: str = "auto",
    recursive: bool = False,
    shard: str | None = None,
    batch_size: int = 4,
    workers: int | None = None,
    progress_lines: bool = False,
) -> RunSummary | None:
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

    todo = [
        p
        for p in paths
        if options.overwrite
        or not is_complete(record_path(out_dir, names[p]), output_paths(out_dir, names[p], options))
    ]

    segmenter = Segmenter(model, device, orientation=options.orientation, corrections=options.corrections)
    run = BatchRun(
        segmenter, todo, names, out_dir, options, total=len(paths), batch_size=batch_size, progress_lines=progress_lines
    )
    return run.run(default_workers() if workers is None else workers)


class Tally:
    """This run's counts and its progress: a bar, or one flushed line per input for callers that track progress
    (the Slicer module). `done` and `failed` count this run's inputs, `skipped` those an earlier run completed, and
    `total` all inputs of the shard."""

    def __init__(self, todo: int, total: int, progress_lines: bool = False):
        self.total, self.skipped, self.progress_lines = total, total - todo, progress_lines
        self.done = self.failed = self.not_images = self.to_check = 0
        self.bar = tqdm(total=todo, desc="segmenting", unit="image", disable=progress_lines or None)

    def count(self, row: dict) -> None:
        """Count one input's outcome, say what failed, show progress."""
        if row["status"] == "error":
            self.failed += 1
            tqdm.write(f"lungseg: error: {row['input']}: {row['error']}", file=sys.stderr)
        elif row["status"] == "skipped":
            self.not_images += 1
        flagged = row["status"] == "ok" and row.get("qc") == "check"
        self.to_check += flagged
        self.done += 1
        self.bar.update(1)
        if self.progress_lines:
            status = "check" if flagged else row["status"]  # ok, check (segmented, flagged by QC), error, skipped
            print(f"lungseg-progress {self.done + self.skipped}/{self.total} {status} {row['input']}", flush=True)

    def close(self) -> None:
        self.bar.close()

    def summary(self, seconds: float, rows: list[dict]) -> RunSummary:
        """This run's counts, and those of the folder's `rows`: earlier runs and other shards too."""
        segmented = [r for r in rows if r.get("status") == "ok"]
        return RunSummary(
            done=self.done,
            failed=self.failed,
            skipped=self.skipped,
            seconds=seconds,
            not_images=self.not_images,
            to_check=self.to_check,
            folder_results=len(segmented),
            folder_to_check=sum(r.get("qc") == "check" for r in segmented),
        )


# size: one run's state (pool, pending batches, tallies) that submit, settle and tally share
class BatchRun:
    """One `lungseg segment` run over `todo`, the inputs of this shard that no earlier run completed.

    The model runs in this process, in batches, and a process pool finishes and writes each output beside it
    (in the model's process, that work would halve its rate). `submit` hands a batch over; `settle` records one
    input's outcome, which `tally` counts.
    """

    def __init__(
        self,
        segmenter,
        todo: list[Path],
        names: dict[Path, str],
        out_dir: Path,
        options: Options,
        total: int,
        batch_size: int = 4,
        progress_lines: bool = False,
    ):
        self.segmenter, self.todo, self.names, self.out_dir, self.options = segmenter, todo, names, out_dir, options
        self.batch_size = batch_size
        self.method = start_method()  # how the reader and finisher processes start
        self.pending: list[tuple[dict, Future]] = []  # submitted, in input order
        self.handed: set[Path] = set()  # inputs settled or submitted
        self.suspects: set[Path] = set()  # held by finishers when one died: each is finished alone
        self.base = {
            "model": segmenter.name,
            "model_version": segmenter.card.get("version", ""),
            "definition": segmenter.definition,
            "device": str(segmenter.device),
        }
        # what QC needs of the card, small enough to hand to the finishers with every input
        self.qc_card = {"definition": segmenter.definition, "qc": segmenter.card.get("qc")}
        self.qc_reads_image = reads_image(self.qc_card, self.options.uncertainty)  # else the input stays here
        self.tally = Tally(len(todo), total, progress_lines)

    def run(self, workers: int) -> RunSummary:
        """Segment every input of `todo` with `workers` reader and finisher processes; then the results table."""
        t_start = time.perf_counter()
        remaining = self.todo
        while remaining:  # another round only after a reader or a finisher process died
            remaining = self.run_round(remaining, workers)
        self.tally.close()
        elapsed = time.perf_counter() - t_start
        rows = collect_results(self.out_dir)
        write_results(rows, self.out_dir)
        write_review(rows, self.out_dir)  # every finished input in the folder: earlier runs and other shards too
        return self.tally.summary(elapsed, rows)

    def run_round(self, inputs: list[Path], workers: int) -> list[Path]:
        """Read, segment and finish `inputs` with new reader and finisher processes; returns the inputs left for
        another round when one of those processes died."""
        with ProcessPoolExecutor(
            max_workers=max(1, workers),
            mp_context=multiprocessing.get_context(self.method),
            initializer=helper_process,
            initargs=(self.method, "finisher"),
        ) as finisher:
            try:
                self.read_and_segment(inputs, workers, finisher)
                self.settle_all()
            except BrokenProcessPool:
                # the readers are gone by now: they held the pool's pipe, and leaving it blocked the pool's shutdown
                waiting, self.pending = self.pending, []
                interrupted = recover_from_finisher_death(waiting, self.handed, self.suspects, self.settle)
            else:
                interrupted = []
        for path in interrupted:  # the pool's finishers are gone now: what they were writing is no one's
            remove_partial_outputs(self.out_dir, self.names[path], self.options)
        return [path for path in inputs if path not in self.handed]

    def read_and_segment(self, inputs: list[Path], workers: int, finisher: ProcessPoolExecutor) -> None:
        """Read `inputs` in `workers` reader processes and segment them. A reader process that dies (killed for
        memory, or a decoder that crashed) fails the inputs it may have held (a rerun retries them); the inputs
        never read are left unhanded, for a new round with new readers. A finisher that dies raises
        BrokenProcessPool once the readers are gone."""
        batches = read_batches(inputs, self.segmenter.size, self.options, self.batch_size, workers, self.method)
        try:
            for items in batches:
                self.submit(items, finisher)
                # settle in input order: what is done at once (prompt progress), the rest when too many are in flight
                while self.pending and (self.pending[0][1].done() or len(self.pending) > 4 * self.batch_size):
                    self.settle(*self.pending.pop(0))
        except ReaderDied as died:
            suspects = [path for path in died.held if path not in self.handed]
            self.handed.update(suspects)
            tqdm.write(
                f"lungseg: a reader process died (too little memory, or a crash decoding an image) while it "
                f"read {len(suspects)} input(s); the rest are read by new readers",
                file=sys.stderr,
            )
            for row in reader_death_errors(suspects, died.reason, self.base):
                self.settle(row)
        finally:
            batches.close()  # the readers leave now, before a dead finisher's pool shuts down

    def submit(self, items: list[dict], finisher: ProcessPoolExecutor) -> None:
        """Settle the unreadable inputs of a batch at once; run the model on the others and hand each output to
        the finisher."""
        good = [it for it in items if "error" not in it]
        for it in items:
            if "error" in it:
                self.settle(
                    {**self.base, "input": str(it["path"]), "status": it.get("status", "error"), "error": it["error"]}
                )
                self.handed.add(it["path"])
        if not good:
            return
        t0 = time.perf_counter()
        inputs = np.stack([it["input"] for it in good])
        inputs, findings = self.segmenter.orient(inputs, [it["image"].orientation_stated for it in good])
        for it, finding in zip(good, findings):
            it["orientation"] = finding
        output = self.segmenter.predict(inputs, self.options.uncertainty)
        inference_ms = (time.perf_counter() - t0) * 1e3 / len(good)
        for k, it in enumerate(good):
            alone = it["path"] in self.suspects  # with nothing else in flight: tells a cause from its company
            if alone:
                self.settle_all()
            name = self.names[it["path"]]
            row = {
                **self.base,
                "input": str(it["path"]),
                "status": "ok",
                "error": "",
                "inference_ms": round(inference_ms, 1),
            }
            del it["input"]
            if self.qc_reads_image:
                it["model_image"] = inputs[k, 0]
            future = finisher.submit(
                finish_and_write,
                it,
                output.item(k),
                self.options,
                self.qc_card,
                output_paths(self.out_dir, name, self.options),
                row,
                record_path(self.out_dir, name),
            )
            self.pending.append((row, future))
            self.handed.add(it["path"])
            if alone:
                self.settle_all()

    def settle_all(self) -> None:
        while self.pending:
            self.settle(*self.pending.pop(0))

    def settle(self, row: dict, future: Future | None = None) -> None:
        """Count one input's outcome (the finisher's row, when it was submitted) and record a failure."""
        if future is not None:
            try:
                row = future.result()
            except Exception as exc:  # this input failed, the batch goes on
                if isinstance(exc, OSError) and exc.errno in FATAL_WRITE_ERRNOS:
                    raise  # a full disk or a read-only folder fails every input: stop (run_segment says why)
                if isinstance(exc, BrokenProcessPool):  # a finisher died: not this input's fault
                    self.pending.insert(0, (row, future))
                    raise
                row.update(status="error", error=f"post-processing or writing failed: {type(exc).__name__}: {exc}")
        if row["status"] != "ok":  # an error, or a skipped non-image object: its row in results.csv
            write_atomic_text(json.dumps(row), record_path(self.out_dir, self.names[Path(row["input"])]))
        self.tally.count(row)
