"""Batch segmentation as a product: bad inputs, hard-but-valid inputs, resume after a kill, shards, lists, QC."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import require_or_skip
from helpers import bad_inputs

from lungseg.batch.workers import START_METHOD_VARIABLE, start_method
from lungseg.errors import LungSegError
from lungseg.inference.labels import LEFT_LUNG, RIGHT_LUNG
from lungseg.qc.rules import quality_flags
from lungseg.samples import sample_pngs

# Every way the batch starts its reader and finisher processes: fork (Linux) and spawn (Windows, macOS), forced here
START_METHODS = ["fork", "spawn"]


def cli_env(method: str | None = None) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    if method:
        env[START_METHOD_VARIABLE] = method
    return env


def run_cli(*args, method=None, **kwargs):
    env = cli_env(method)
    return subprocess.run(
        [sys.executable, "-m", "lungseg", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        **kwargs,
    )


def results(out):
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return {os.path.basename(r["input"]): r for r in csv.DictReader(f)}


def centroid_columns(path):
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).squeeze()
    return np.nonzero(label == RIGHT_LUNG)[1].mean(), np.nonzero(label == LEFT_LUNG)[1].mean(), label.shape[1]


def mirrored_dicom(chest_dicom, path):
    """The real CR stored mirrored: columns run toward the patient's right, and PatientOrientation says so."""
    ds = pydicom.dcmread(chest_dicom)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.PatientOrientation = ["R", "F"]
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def radiograph():
    return sitk.GetArrayFromImage(sitk.ReadImage(str(sample_pngs()[0])))


def make_valid_inputs(folder, radiograph, chest_dicom):
    """Inputs that must all succeed, with the patient's right lung on the image's left."""
    folder.mkdir()
    gray = sitk.GetImageFromArray(radiograph)
    big = sitk.Resample(gray, [2500, 2500], sitk.Transform(), sitk.sitkLinear, (0, 0), [256 / 2500] * 2)
    sitk.WriteImage(sitk.Cast(big, sitk.sitkUInt8), str(folder / "big 2500.png"))
    sitk.WriteImage(sitk.GetImageFromArray(radiograph.astype(np.uint16) * 250), str(folder / "sixteen.png"))
    rgb = np.stack([radiograph] * 3, -1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(folder / "rgb.png"))
    rgba = np.concatenate([rgb, np.full(radiograph.shape + (1,), 255, np.uint8)], -1)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(folder / "rgba.png"))
    sitk.WriteImage(sitk.GetImageFromArray(radiograph), str(folder / "Thorax ü 胸部 x.png"))
    for suffix in (".nrrd", ".nii.gz", ".mha"):
        image = sitk.GetImageFromArray(radiograph.astype(np.int16))
        image.SetSpacing((0.6, 0.5))
        sitk.WriteImage(image, str(folder / f"spaced{suffix.replace('.', '_')}{suffix}"))
    single = sitk.GetImageFromArray(radiograph[None].astype(np.int16))
    single.SetSpacing((0.6, 0.5, 3.0))
    sitk.WriteImage(single, str(folder / "single_slice.nrrd"))
    os.symlink(chest_dicom, folder / "cr_monochrome1.dcm")


def test_bad_and_valid_inputs_in_one_batch(tmp_path, radiograph, chest_dicom):
    good = tmp_path / "inputs"
    make_valid_inputs(good, radiograph, chest_dicom)
    (tmp_path / "bad").mkdir()
    bad = bad_inputs(tmp_path / "bad", radiograph, chest_dicom)
    (tmp_path / "odd").mkdir()  # valid, but only the patient's right half: segmented, and flagged for a look
    one_lung = np.ascontiguousarray(radiograph[:, : radiograph.shape[1] // 2])
    sitk.WriteImage(sitk.GetImageFromArray(one_lung), str(tmp_path / "odd" / "one lung.png"))
    out = tmp_path / "out"
    result = run_cli(
        "segment", good, tmp_path / "bad", tmp_path / "odd", "-o", out, "--batch-size", "3", "--progress-lines"
    )
    assert result.returncode == 1, result.stderr
    rows = results(out)

    for name, problem in bad.items():
        assert rows[name]["status"] == "error", name
        assert problem in rows[name]["error"], (name, rows[name]["error"])
        assert name in result.stderr
    valid = sorted(p.name for p in good.iterdir())
    for name in valid:
        row = rows[name]
        assert row["status"] == "ok", (name, row["error"])
        right, left, width = centroid_columns(row["output"])
        assert right < width / 2 < left, name
        assert row["qc"] == "ok" and row["qc_reasons"] == "", (name, row["qc_reasons"])  # a normal PA radiograph
        assert row["definition"] == "lung-fields"
        assert float(row["inference_ms"]) > 0 and float(row["write_ms"]) > 0
    odd = rows["one lung.png"]
    # one lung and no heart: QC flags it (a missing lung, or, where the orientation classifier calls it mirrored, that)
    assert odd["status"] == "ok" and odd["qc"] == "check", odd["qc_reasons"]
    assert "left lung" in odd["qc_reasons"] or "looks mirrored" in odd["qc_reasons"], odd["qc_reasons"]
    assert rows["spaced_nrrd.nrrd"]["right_area_mm2"] != "" and rows["rgb.png"]["right_area_mm2"] == ""
    out_single = sitk.ReadImage(rows["single_slice.nrrd"]["output"])
    assert out_single.GetDimension() == 3 and out_single.GetSpacing() == pytest.approx((0.6, 0.5, 3.0))
    summary = result.stdout.strip().splitlines()[-1]
    assert f"{len(valid) + 1} of {len(valid) + len(bad) + 1} segmented, {len(bad)} failed" in summary
    assert summary.endswith(
        f"; 1 of the folder's {len(valid) + 1} results flagged by QC to check, review page {out / 'review.html'}"
    ), summary
    progress = {
        line.split(" ", 3)[3]: line.split(" ", 3)[2]
        for line in result.stdout.splitlines()
        if line.startswith("lungseg-progress ")
    }  # input: ok, check (flagged by QC) or error
    assert progress == {
        **{r["input"]: "ok" for n, r in rows.items() if n in valid},
        **{rows[name]["input"]: "error" for name in bad},
        odd["input"]: "check",
    }, progress
    assert len(json.loads((out / "results.json").read_text(encoding="utf-8"))) == len(valid) + len(bad) + 1


def live_children(pid: int) -> set[int]:
    """The processes whose parent is `pid` and that have not exited (Linux's /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue  # gone while listed
        if int(parent) == pid and state != "Z":
            children.add(int(stat.parent.name))
    return children


def batch_helpers(pid: int) -> set[int]:
    """The batch's reader and finisher processes: its children, less the resource tracker that spawn starts."""
    return {
        child for child in live_children(pid) if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()
    }


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("method", START_METHODS)
def test_killed_run_resumes_without_loss_or_partial_files(tmp_path, radiograph, method):
    inputs = tmp_path / "in"
    inputs.mkdir()
    gray = sitk.GetImageFromArray(radiograph)
    big = sitk.Resample(gray, [1024, 1024], sitk.Transform(), sitk.sitkLinear, (0, 0), [0.25, 0.25])
    for i in range(10):
        sitk.WriteImage(sitk.Cast(big, sitk.sitkUInt8), str(inputs / f"case{i:02d}.png"))
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "lungseg",
        "segment",
        str(inputs),
        "-o",
        str(out),
        "--overlays",
        "--batch-size",
        "1",
        "--workers",
        "1",
        "--progress-lines",
    ]  # a reader and a finisher
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=cli_env(method))
    first = proc.stdout.readline()
    assert first.startswith("lungseg-progress 1/10 ok"), first
    helpers = batch_helpers(proc.pid) if Path("/proc/self/stat").exists() else set()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the helpers, handed to another parent, leave once the input at hand is written: the finisher used to wait for
    # work forever, and the reader to flush an image into a pipe no one reads, left behind by every killed batch
    assert len(helpers) == 2 or not Path("/proc/self/stat").exists(), helpers
    deadline = time.monotonic() + 15
    while any(map(running, helpers)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in helpers if running(pid)], "a helper of the killed batch is still running"
    # the finisher may complete the input it held after the main process died: count once every helper is gone
    finished_before = {p.stem for p in (out / ".lungseg").glob("*.json")}
    assert 1 <= len(finished_before) < 10

    result = run_cli("segment", inputs, "-o", out, "--overlays", method=method)
    assert result.returncode == 0, result.stderr
    assert f"{len(finished_before)} already done (skipped)" in result.stdout
    rows = results(out)
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows.values())
    assert not [p for p in out.rglob("*") if "partial" in p.name]
    for row in rows.values():
        assert sitk.ReadImage(row["output"]).GetSize() == (1024, 1024)

    os.remove(rows["case03.png"]["overlay"])  # an incomplete input is redone, the rest skipped
    again = run_cli("segment", inputs, "-o", out, "--overlays", method=method)
    assert "1 of 1 segmented" in again.stdout and "9 already done" in again.stdout
    flagged = sum(r["qc"] == "check" for r in rows.values())  # the folder's, as the review page shows them
    assert f"; {flagged} of the folder's 10 results flagged by QC to check, review page" in again.stdout
    forced = run_cli("segment", inputs, "-o", out, "--overlays", "--overwrite")
    assert "10 of 10 segmented" in forced.stdout


def test_every_batch_output_is_its_own_inputs_segmentation(tmp_path, chest_dicom, segmenter):
    """Each labelmap of a batch run (reader process, model batches, finisher process with several inputs in
    flight) is what `Segmenter.segment` gives for that image alone. The inputs place the lungs differently (each
    radiograph padded on the left by its own amount), so an output that landed on another input could not match."""
    from lungseg.io.radiograph import read_radiograph

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, png in enumerate(sample_pngs()):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
        for pad in (0, 70, 140, 210):
            padded = np.pad(image, ((0, 0), (pad, 0)))
            sitk.WriteImage(sitk.GetImageFromArray(padded), str(inputs / f"sample{i}_pad{pad:03d}.png"))
    os.symlink(chest_dicom, inputs / "cr.dcm")
    out = tmp_path / "out"
    # batch size 1: each input is its own model batch, and up to 4 wait at the finisher at once
    result = run_cli("segment", inputs, "-o", out, "--batch-size", "1", "--workers", "1")
    assert result.returncode == 0, result.stderr
    rows = results(out)
    assert len(rows) == 13
    for name, row in rows.items():
        batch = sitk.GetArrayFromImage(sitk.ReadImage(row["output"])).squeeze()
        alone = segmenter.segment(read_radiograph(inputs / name).pixels).label
        assert batch.shape == alone.shape, name
        assert (batch != alone).mean() < 1e-4, (name, (batch != alone).mean())
        assert int(row["right_area_px"]) == int((batch == RIGHT_LUNG).sum()) > 0, name


def test_shards_cover_inputs_without_overlap_and_lists_of_paths(tmp_path):
    """Three shards run at once, as in a SLURM array, each into its own folder: every input is processed by
    exactly one of them (the sets are disjoint and their union is all inputs)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(9):
        os.symlink(sample_pngs()[i % 3], inputs / f"img{i}.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# two of them, relative to this file\nin/img1.png\nin/img7.png\n")
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    jobs = {
        index: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lungseg",
                "segment",
                str(inputs),
                "-o",
                str(tmp_path / f"shard{index}"),
                "--shard",
                f"{index}/3",
                "--workers",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for index in (1, 2, 3)
    }
    shards = {}
    for index, job in jobs.items():
        stdout, stderr = job.communicate(timeout=900)
        assert job.returncode == 0, stderr
        rows = results(tmp_path / f"shard{index}")
        assert all(row["status"] == "ok" for row in rows.values())
        shards[index] = set(rows)
        assert f"{len(rows)} of {len(rows)} segmented" in stdout, (index, stdout)
    assert sum(len(s) for s in shards.values()) == 9, f"an input was processed by more than one shard: {shards}"
    assert set().union(*shards.values()) == {f"img{i}.png" for i in range(9)}

    listed = run_cli("segment", listing, "-o", tmp_path / "out2", "--workers", "0")
    assert listed.returncode == 0, listed.stderr
    assert sorted(results(tmp_path / "out2")) == ["img1.png", "img7.png"]


def test_in_shard_puts_every_path_in_exactly_one_shard():
    from pathlib import Path

    from lungseg.batch.records import in_shard

    paths = [Path(f"/data/set/case{i:04d}.png") for i in range(600)] + [
        Path(f"relative/Thorax ü 胸部 {i}.dcm") for i in range(60)
    ]
    assert all(in_shard(p, None) for p in paths), "no --shard: every input"
    for count in (1, 2, 3, 7):
        shards = [{p for p in paths if in_shard(p, (index, count))} for index in range(1, count + 1)]
        assert sum(len(s) for s in shards) == len(paths), (count, [len(s) for s in shards])
        assert set().union(*shards) == set(paths), count
        assert min(len(s) for s in shards) > 0.6 * len(paths) / count, ("unbalanced", count, [len(s) for s in shards])
    assert in_shard(paths[5], (2, 3)) == in_shard(Path(str(paths[5])), (2, 3)), "every job agrees"


def test_one_orientation_step_serves_segment_and_evaluate(tmp_path, chest_dicom, segmenter):
    """`Segmenter.segment(display_flips=...)` is the one place the orientation is handled; `evaluate` uses it."""
    from lungseg.evaluation.evaluate import evaluate
    from lungseg.inference.orientation import Corrections
    from lungseg.io.radiograph import read_radiograph

    (tmp_path / "images").mkdir()
    image = read_radiograph(mirrored_dicom(chest_dicom, tmp_path / "images" / "mirrored.dcm"))
    assert image.display_flips == (False, True)
    normal = segmenter.segment(read_radiograph(chest_dicom).pixels).label
    mirrored = segmenter.segment(image.pixels, display_flips=image.display_flips).label
    assert (mirrored == normal[:, ::-1]).mean() > 0.995
    none = Corrections.parse("none")
    ignored = segmenter.segment(image.pixels, corrections=none).label  # with neither step the sides would swap
    assert (ignored[mirrored > 0] != mirrored[mirrored > 0]).mean() > 0.5
    found = segmenter.segment(image.pixels)  # the orientation classifier alone sees the film is mirrored
    assert found.orientation.corrected == "mirrored (from the pixels)"
    assert (found.label == mirrored).mean() > 0.995
    stated = segmenter.segment(image.pixels, display_flips=image.display_flips, orientation_stated=True)
    assert stated.orientation.applied.upright and stated.orientation.reasons == (), "header and pixels agree"

    (tmp_path / "masks").mkdir()
    sitk.WriteImage(
        sitk.GetImageFromArray(((normal[:, ::-1] > 0) * 255).astype(np.uint8)), str(tmp_path / "masks" / "mirrored.png")
    )
    summary = evaluate(tmp_path / "images", tmp_path / "masks", out_dir=tmp_path / "eval", segmenter=segmenter)
    assert summary["images"] == 1 and summary["both_dice"]["mean"] > 0.99


def test_dicom_stored_mirrored_keeps_patient_sides(tmp_path, chest_dicom):
    out = tmp_path / "out"
    result = run_cli("segment", mirrored_dicom(chest_dicom, tmp_path / "mirrored.dcm"), chest_dicom, "-o", out)
    assert result.returncode == 0, result.stderr
    rows = results(out)
    assert rows["mirrored.dcm"]["orientation_corrected"] == "mirrored"
    right, left, width = centroid_columns(rows["mirrored.dcm"]["output"])
    assert left < width / 2 < right, "in a mirrored image the patient's right lung is on the image's right"
    normal = sitk.GetArrayFromImage(sitk.ReadImage(rows["RG1_UNCR.dcm"]["output"])).squeeze()
    mirrored = sitk.GetArrayFromImage(sitk.ReadImage(rows["mirrored.dcm"]["output"])).squeeze()
    assert (normal == mirrored[:, ::-1]).mean() > 0.995


def test_quality_flags_name_their_reason():
    label = np.zeros((100, 100), np.uint8)
    label[20:80, 10:45] = RIGHT_LUNG
    label[20:80, 55:90] = LEFT_LUNG
    assert quality_flags(label) == []
    one = label.copy()
    one[one == LEFT_LUNG] = 0
    assert "left lung missing" in quality_flags(one)
    tiny = label.copy()
    tiny[20:80, 60:90][tiny[20:80, 60:90] == LEFT_LUNG] = 0
    assert any("left lung tiny" in r for r in quality_flags(tiny))
    mirrored = label.copy()
    mirrored[20:80, 10:20] = 0  # right lung clearly smaller than left: typical of a flipped PA view
    assert any("possibly mirrored" in r for r in quality_flags(mirrored))
    assert quality_flags(mirrored, definition="full-extent") == [], "full-extent lungs are often left > right"
    raw = label.copy()
    raw[85:95, 10:40] = RIGHT_LUNG
    raw[2:12, 60:90] = LEFT_LUNG
    assert any("4 large lung components" in r for r in quality_flags(label, raw_label=raw))
    assert any("high uncertainty" in r for r in quality_flags(label, uncertainty=np.full(label.shape, 0.3)))


@pytest.mark.skipif(not Path("/proc/self/comm").exists(), reason="finds the reader process through Linux's /proc")
def kill_a_helper_mid_batch(image, inputs: Path, out: Path, helper: str, method: str):
    """Segment 24 copies of `image`, one at a time with one reader and one finisher, and kill the `helper` ("reader"
    or "finisher") once the first input is done. The run's stdout, stderr and process; a hang is a failure."""
    inputs.mkdir()
    for i in range(24):
        sitk.WriteImage(image, str(inputs / f"case{i:02d}.png"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lungseg",
            "segment",
            str(inputs),
            "-o",
            str(out),
            "--batch-size",
            "1",
            "--workers",
            "1",
            "--progress-lines",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(method),
    )
    first = proc.stdout.readline()
    assert first.startswith("lungseg-progress 1/24 ok"), first
    kind = {
        pid: "reader" if Path(f"/proc/{pid}/comm").read_text().strip() == "lungseg-reader" else "finisher"
        for pid in batch_helpers(proc.pid)
    }
    chosen = [pid for pid, name in kind.items() if name == helper]
    assert len(chosen) == 1, kind
    os.kill(chosen[0], signal.SIGKILL)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the batch hung after its {helper} process died") from None
    return stdout, stderr, proc


@pytest.mark.parametrize("method", START_METHODS)
def test_a_reader_process_that_dies_costs_only_the_inputs_it_held(tmp_path, radiograph, method):
    """A reader killed for memory, or by a decoder that crashes, used to leave the batch waiting forever on an image
    half sent, and its death was taken for the failure of whichever input was being written. The batch now says a
    reader died, records the inputs it was reading (none if it was idle, at most the 2 it reads ahead) as errors
    that say why, reads the rest with new readers, and a rerun completes those inputs."""
    big = sitk.Resample(
        sitk.GetImageFromArray(radiograph), [1024, 1024], sitk.Transform(), sitk.sitkLinear, (0, 0), [0.25, 0.25]
    )
    inputs, out = tmp_path / "in", tmp_path / "out"
    stdout, stderr, proc = kill_a_helper_mid_batch(sitk.Cast(big, sitk.sitkUInt8), inputs, out, "reader", method)
    assert "lungseg: a reader process died" in stderr and "a finisher process died" not in stderr, stderr
    rows = results(out)
    failed = {name: row for name, row in rows.items() if row["status"] != "ok"}
    assert len(rows) == 24 and len(failed) <= 2, failed  # 2 = the batches a reader reads ahead, of 1 image
    assert proc.returncode == (1 if failed else 0), stderr
    for row in failed.values():
        assert row["error"].startswith("not segmented: a reader process died") and "a rerun retries it" in row["error"]
    assert "post-processing or writing failed" not in stderr, "a reader's death is not an input's failure"
    assert f"{24 - len(failed)} of 24 segmented, {len(failed)} failed" in stdout.strip().splitlines()[-1]
    again = run_cli("segment", inputs, "-o", out, method=method)
    assert again.returncode == 0, again.stderr
    assert all(row["status"] == "ok" for row in results(out).values())


CRASHING_READER = """
import os, sys
from pathlib import Path
from lungseg.batch import reader
read = reader.read_input
def crash_on(path, *args):  # a decoder that crashes (or the kernel's OOM killer) on this one input
    if Path(path).name == sys.argv[1]:
        os._exit(-11)
    return read(path, *args)
reader.read_input = crash_on  # the readers are forked, so they run this too
from lungseg.batch.run import run_segment
sys.exit(run_segment([sys.argv[2]], sys.argv[3], batch_size=1, workers=1))
"""


def test_an_input_that_crashes_its_reader_fails_and_the_rest_are_read_again(tmp_path, radiograph):
    """An input whose decoding kills its reader is an error that says why, with at most the one input read beside
    it; new readers read every other input, and the batch exits with status 1."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i in range(8):
        sitk.WriteImage(sitk.GetImageFromArray(radiograph), str(inputs / f"case{i}.png"))
    run = subprocess.run(
        [sys.executable, "-c", CRASHING_READER, "case3.png", str(inputs), str(out)],
        capture_output=True,
        text=True,
        env=cli_env("fork"),
        timeout=120,  # a few seconds when it works; broken (R1), it retries forever
    )
    assert run.returncode == 1, run.stderr
    rows = results(out)
    failed = {name for name, row in rows.items() if row["status"] != "ok"}
    assert len(rows) == 8 and "case3.png" in failed and len(failed) <= 2, rows
    assert rows["case3.png"]["error"].startswith("not segmented: a reader process died")


@pytest.mark.parametrize("method", START_METHODS)
def test_a_finisher_process_that_dies_costs_no_input(tmp_path, radiograph, method):
    """A finisher (a process pool worker) killed for memory used to hang the batch for good: the broken pool's
    shutdown waited on a pipe the reader processes also held. The inputs the pool held are now segmented again
    with new readers and finishers, and the batch completes them all."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    stdout, stderr, proc = kill_a_helper_mid_batch(sitk.GetImageFromArray(radiograph), inputs, out, "finisher", method)
    assert proc.returncode == 0, stderr
    assert "a finisher process died" in stderr and "they are segmented again" in stderr, stderr
    rows = results(out)
    assert len(rows) == 24 and all(row["status"] == "ok" for row in rows.values()), rows
    assert all(Path(row["output"]).exists() for row in rows.values())
    assert not [p for p in out.rglob("*") if "partial" in p.name], "no half-written file is left"


CRASHING_FINISHER = """
import os, sys
from pathlib import Path
from lungseg.batch import run as batch_run
finish = batch_run.finish_and_write
def crash_on(item, *args):  # a native crash (or the kernel's OOM killer) on this one input, every time
    if Path(item["path"]).name == sys.argv[1]:
        os._exit(-11)
    return finish(item, *args)
batch_run.finish_and_write = crash_on  # what BatchRun submits; the finishers are forked, so they run this too
sys.exit(batch_run.run_segment([sys.argv[2]], sys.argv[3], batch_size=2, workers=1))
"""


def test_an_input_that_kills_its_finisher_every_time_becomes_an_error(tmp_path, radiograph):
    """An input that kills its finisher every time is tried again alone, then recorded as an error that says why;
    the inputs held with it are segmented again, one at a time, and the batch exits with status 1."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(10):
        sitk.WriteImage(sitk.GetImageFromArray(radiograph), str(inputs / f"case{i:02d}.png"))
    out = tmp_path / "out"
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", CRASHING_FINISHER, "case04.png", str(inputs), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("they are segmented again, each finished alone") == 1, run.stderr
    rows = results(out)
    failed = {name for name, row in rows.items() if row["status"] != "ok"}
    assert len(rows) == 10 and failed == {"case04.png"}, rows
    assert rows["case04.png"]["error"].startswith(
        "not finished: a finisher process died while it held this input alone"
    ), rows["case04.png"]
    assert "a rerun retries it" in rows["case04.png"]["error"]
    assert "9 of 10 segmented, 1 failed" in run.stdout
    assert not [p for p in out.rglob("*") if "partial" in p.name], "no half-written file is left"


MALLOC_PROBE = """
import ctypes, json, runpy, sys
import torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "python -m lungseg":  # exactly `python -m lungseg ARGS...`, then the probe in the same process
    sys.argv = ["lungseg", *sys.argv[2:]]
    try:
        runpy.run_module("lungseg", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        assert not exc.code, exc.code
elif sys.argv[1] == "keep_freed_memory()":
    from lungseg.memory import keep_freed_memory
    assert keep_freed_memory()
mapped = libc.mallinfo2().hblkhd
x = torch.ones(16 << 20)  # 64 MiB, the size of a large activation
mapped = libc.mallinfo2().hblkhd - mapped
del x
print(json.dumps({"mapped_mib": mapped >> 20, "free_mib": libc.mallinfo2().fordblks >> 20}))
"""


def test_command_line_keeps_freed_memory_for_the_next_forward_pass():
    """In a `python -m lungseg` process a 64 MiB tensor comes from the heap (no fresh mapping) and stays there,
    free for reuse, once freed, so the next forward pass does not fault its pages in again. A plain Python
    process maps it and unmaps it (glibc's default); keep_freed_memory() alone gives the tuned behaviour."""
    if not sys.platform.startswith("linux"):
        require_or_skip("glibc malloc tuning applies on Linux only")
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    modes = {"default": [], "keep_freed_memory()": [], "python -m lungseg": ["models", "--json"]}
    jobs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", MALLOC_PROBE, mode, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for mode, args in modes.items()
    }
    probes = {}
    for mode, job in jobs.items():
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, (mode, stderr)
        probes[mode] = json.loads(stdout.strip().splitlines()[-1])
    assert probes["default"]["mapped_mib"] >= 64 > probes["default"]["free_mib"], probes
    for mode in ("keep_freed_memory()", "python -m lungseg"):
        assert probes[mode]["mapped_mib"] < 64 <= probes[mode]["free_mib"], (mode, probes)


def test_outputs_are_identical_whether_helpers_are_forked_or_spawned(tmp_path, chest_dicom):
    """The same batch, with a reader and a finisher, started the Linux way (fork) and the Windows and macOS way
    (spawn): every output file is the same, byte for byte, and so is every row but its timings."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sample_pngs()[:2]:
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "cr.dcm").write_bytes(Path(chest_dicom).read_bytes())
    outputs = {}
    for method in START_METHODS:
        out = tmp_path / method
        result = run_cli(
            "segment",
            inputs,
            "-o",
            out,
            "--overlays",
            "--uncertainty",
            "--batch-size",
            "2",
            "--workers",
            "1",
            method=method,
        )
        assert result.returncode == 0, result.stderr
        files = {
            p.relative_to(out): p.read_bytes()
            for p in out.rglob("*")
            if p.is_file()
            and p.parent.name != ".lungseg"
            and p.name not in ("results.csv", "results.json", "review.html")
        }
        rows = {
            name: {
                k: v
                for k, v in row.items()
                if not k.endswith("_ms") and k not in ("output", "overlay", "uncertainty_map", "thumbnail")
            }
            for name, row in results(out).items()
        }
        outputs[method] = files, rows
    (fork_files, fork_rows), (spawn_files, spawn_rows) = outputs["fork"], outputs["spawn"]
    assert len(fork_files) == 3 * 4, sorted(fork_files)  # labelmap, overlay, uncertainty map and thumbnail each
    assert fork_files.keys() == spawn_files.keys()
    assert [name for name in fork_files if fork_files[name] != spawn_files[name]] == []
    assert fork_rows == spawn_rows and all(row["status"] == "ok" for row in fork_rows.values())


SPAWN_ONLY_PLATFORM = """
import multiprocessing.context, sys
from lungseg.batch import run as batch_run, workers
for method in ("fork", "forkserver"):  # as on Windows, where multiprocessing has only spawn
    multiprocessing.context._concrete_contexts.pop(method, None)
class WindowsSys:  # what lungseg sees of `sys` says Windows; multiprocessing's own stays the real platform's
    platform = "win32"
    def __getattr__(self, name):
        return getattr(sys, name)
workers.sys = WindowsSys()  # the module that picks the start method
sys.exit(batch_run.run_segment([sys.argv[1]], sys.argv[2], batch_size=1, workers=1))
"""


def test_batch_runs_where_only_spawn_exists(tmp_path):
    """On Windows `multiprocessing` has no fork: the batch used to fail at once with "cannot find context for
    'fork'" and write nothing. Emulated here as the Slicer review did, with a reader and a finisher."""
    env = cli_env()
    env.pop(START_METHOD_VARIABLE, None)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", SPAWN_ONLY_PLATFORM, str(sample_pngs()[0].parent), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rows = results(out)
    assert len(rows) == 3 and all(row["status"] == "ok" for row in rows.values()), rows


def test_start_method_follows_the_platform_and_can_be_forced(monkeypatch):
    monkeypatch.delenv(START_METHOD_VARIABLE, raising=False)
    for platform, method in (("linux", "fork"), ("win32", "spawn"), ("darwin", "spawn")):
        monkeypatch.setattr(sys, "platform", platform)
        assert start_method() == method, platform
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv(START_METHOD_VARIABLE, "spawn")
    assert start_method() == "spawn"
    monkeypatch.setenv(START_METHOD_VARIABLE, "threads")
    with pytest.raises(LungSegError, match="LUNGSEG_START_METHOD=threads"):
        start_method()


def test_a_folder_named_like_a_file_is_a_folder(tmp_path, chest_dicom):
    """`lungseg segment exports/study.dcm/` (a folder holding a CR) used to fail with "not a readable DICOM file
    ([Errno 21] Is a directory)"; with --recursive, a subfolder named like an image is entered, not an input."""
    study = tmp_path / "exports" / "study.dcm"
    study.mkdir(parents=True)
    (study / "IM0001").write_bytes(Path(chest_dicom).read_bytes())  # DICOM files often have no suffix
    result = run_cli("segment", f"{study}{os.sep}", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert [row["status"] for row in results(tmp_path / "out").values()] == ["ok"]
    nested = run_cli("segment", tmp_path / "exports", "--recursive", "-o", tmp_path / "nested")
    assert nested.returncode == 0, nested.stderr
    assert {name: row["status"] for name, row in results(tmp_path / "nested").items()} == {"IM0001": "ok"}


CRASHING_COMMAND = """
import sys
from lungseg import cli
from lungseg.batch import run as batch_run
def crash(*args, **kwargs):
    raise MemoryError("no memory left for the model")
batch_run.segment_inputs = crash
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_crash_has_its_own_exit_status_and_keeps_its_traceback(tmp_path):
    """An unexpected error used to leave with status 1, the status of "some inputs failed", so the Slicer panel
    reported "0 of 0 segmented, 0 failed" for a results file that did not exist."""
    run = subprocess.run(
        [sys.executable, "-c", CRASHING_COMMAND, "segment", str(sample_pngs()[0]), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert run.returncode == 3, (run.returncode, run.stderr)
    assert "Traceback (most recent call last)" in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("lungseg: internal error: MemoryError: no memory left")
