"""Every user error is one line and a non-zero exit status, never a traceback (issue 13): an output folder that
cannot be created or written, a disk that fills up during a run (no partial file left, and a rerun resumes), and a
pipe closed early (`lungseg models | head -1`). `--debug` still shows the traceback."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import require_or_skip

from lungseg.samples import sample_pngs

ENV = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")


def run_cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "lungseg", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
        **kwargs,
    )


def one_line_error(result, text):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lungseg: error: ") and text in lines[0], result.stderr


def test_an_output_folder_that_cannot_be_created_is_one_line():
    result = run_cli("segment", sample_pngs()[0], "-o", "/dev/null/out")
    one_line_error(result, "cannot create the output folder /dev/null/out: Not a directory")
    debug = run_cli("--debug", "segment", sample_pngs()[0], "-o", "/dev/null/out")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "NotADirectoryError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("lungseg: error: cannot create the output folder")


@pytest.fixture
def read_only_folder(tmp_path):
    """(folder, reason): a folder that this process cannot write to, and the strerror to expect. A normal user gets
    a folder of mode 0555; root writes through modes, so as root it is a read-only tmpfs mounted there (a read-only
    share, as hospitals mount them)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        yield folder, "Permission denied"
        os.chmod(folder, 0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        require_or_skip(f"running as root, and a read-only tmpfs cannot be mounted: {mounted.stderr.strip()}")
    try:
        yield folder, "Read-only file system"
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder_is_one_line(read_only_folder):
    folder, reason = read_only_folder
    one_line_error(
        run_cli("segment", sample_pngs()[0], "-o", folder), f"cannot write to the output folder {folder}: {reason}"
    )
    one_line_error(
        run_cli("segment", sample_pngs()[0], "-o", folder / "out"),
        f"cannot create the output folder {folder / 'out'}: {reason}",
    )
    assert not os.listdir(folder)


SMALL_DISK = r'''
"""lungseg on a disk that fills up at the FULL_AT-th file written: that write is cut short, as write(2) leaves a
file when the disk fills, and fails with ENOSPC; so does every later one. The count is shared by the forked
processes through a file."""
import contextlib, errno, os, sys

import lungseg.io.files
import lungseg.batch.run  # noqa: F401  (imports every module that writes)

counter, full_at = sys.argv[1], int(sys.argv[2])
real_atomic_path = lungseg.io.files.atomic_path


@contextlib.contextmanager
def small_disk(path):
    with real_atomic_path(path) as tmp:
        yield tmp
        with open(counter, "ab") as f:
            f.write(b".")
        if os.path.getsize(counter) >= full_at:
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


for module in list(sys.modules.values()):
    if getattr(module, "__name__", "").startswith("lungseg") and getattr(module, "atomic_path", None) \
            is real_atomic_path:
        module.atomic_path = small_disk
from lungseg.cli import main  # noqa: E402

sys.exit(main(sys.argv[3:]))
'''


def test_a_disk_that_fills_up_stops_the_run_with_one_line_and_no_partial_file(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        shutil.copy(sample_pngs()[i % len(sample_pngs())], inputs / f"chest{i}.png")
    out = tmp_path / "out"
    script = tmp_path / "small_disk.py"
    script.write_text(SMALL_DISK)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "written"),
            "8",
            "segment",
            str(inputs),
            "-o",
            str(out),
            "--batch-size",
            "2",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    one_line_error(result, "No space left on device")
    assert f"writing to the output folder {out} failed" in result.stderr and "rerun" in result.stderr
    assert not [p for p in out.rglob("*") if "partial" in p.name], "no partial file may be left"
    records = list((out / ".lungseg").glob("*.json"))
    assert records, "inputs finished before the disk filled up are complete"

    rerun = run_cli("segment", inputs, "-o", out)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{6 - len(records)} of {6 - len(records)} segmented, 0 failed, {len(records)} already done" in rerun.stdout


@pytest.mark.parametrize(
    "writer_fails, free_blocks, expected", [(True, 0, OSError), (True, 1 << 20, RuntimeError), (False, 0, OSError)]
)
def test_a_library_writer_on_a_full_disk_reads_as_enospc(tmp_path, monkeypatch, writer_fails, free_blocks, expected):
    """ITK reports a full disk as a RuntimeError, often without the errno ("couldn't write gzip data"), or not at
    all: it does not check fclose, so a small file can end short, even at 0 bytes, on a real full tmpfs. With the
    file system full, both become OSError(ENOSPC), which stops a batch; with space left, an ITK error stays the
    file's own error. No partial file and no short file is left."""
    import lungseg.io.files
    import lungseg.io.radiograph as io

    def cut_short(image, path, compress):
        Path(path).write_bytes(b"NRRD0004\n" + bytes(1000))
        if writer_fails:
            raise RuntimeError(
                "ITK ERROR: NrrdImageIO: Write: Error writing: [nrrd] _nrrdEncodingGzip_write: "
                "expected to write 1000000 bytes, but only wrote 229376"
            )

    monkeypatch.setattr(io.sitk, "WriteImage", cut_short)
    monkeypatch.setattr(
        lungseg.io.files.os,
        "statvfs",
        lambda _: SimpleNamespace(f_bavail=free_blocks, f_bfree=free_blocks, f_frsize=4096),
    )
    grid = io.Grid((40, 30), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    with pytest.raises(expected) as err:
        io.write_labelmap(np.zeros((30, 40), np.uint8), grid, tmp_path / "label.nrrd")
    assert type(err.value) is expected
    if expected is OSError:
        assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == [], "no partial or short file is left"


def test_a_pipe_closed_early_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader left before the first line: every write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "lungseg", "models"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            timeout=300,
        )
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == "", result.stderr  # 128 + SIGPIPE, as for `cat`
    if shutil.which("bash") and shutil.which("head"):
        piped = subprocess.run(
            ["bash", "-c", f"'{sys.executable}' -m lungseg models --json | head -1"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
        assert piped.returncode == 0 and "Traceback" not in piped.stderr and piped.stderr == "", piped.stderr
        assert piped.stdout.strip() == "["


def test_a_users_model_named_like_a_shipped_one_is_never_chosen_silently(tmp_path):
    """`lungseg export runs/unet --out-dir my-models` writes my-models/unet.json: with LUNGSEG_MODELS_PATH naming
    that folder, `--model unet` would have segmented with the shipped `unet` and ignored the user's. It is one
    line naming both cards and the way out; the card's path picks the user's model."""
    from lungseg.models.cards import read_card

    card = read_card("unet")
    shutil.copy(card["weights_path"], tmp_path / "unet.safetensors")
    shutil.copy(card["card_path"], tmp_path / "unet.json")
    for graph in card["onnx"]["graphs"]:
        shutil.copy(Path(card["card_path"]).parent / graph["file"], tmp_path / graph["file"])
    env = dict(ENV, LUNGSEG_MODELS_PATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "lungseg", "segment", sample_pngs()[0], "-o", tmp_path / "out", "--model", "unet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    one_line_error(result, "model 'unet' is in more than one models folder")
    assert card["card_path"] in result.stderr and f"--model {tmp_path / 'unet.json'}" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nrrd"))
    by_path = subprocess.run(
        [
            sys.executable,
            "-m",
            "lungseg",
            "segment",
            sample_pngs()[0],
            "-o",
            tmp_path / "out",
            "--model",
            tmp_path / "unet.json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert by_path.returncode == 0, by_path.stderr
    assert len(list((tmp_path / "out").glob("*.nrrd"))) == 1


@pytest.mark.parametrize(
    "command, option, value, message",
    [
        ("segment", "--batch-size", "0", "argument --batch-size: 0: give 1 or more"),
        ("segment", "--workers", "-1", "argument --workers: -1: give 0 or more"),
        ("segment", "--batch-size", "four", "argument --batch-size: 'four' is not a whole number"),
        ("fit-qc", "--perturbations", "-1", "argument --perturbations: -1: give 0 or more"),
    ],
)
def test_a_count_out_of_range_is_a_usage_error_not_a_traceback(tmp_path, command, option, value, message):
    """`--batch-size 0` and `--workers -1` reached torch's DataLoader and ended in its traceback."""
    inputs = [sample_pngs()[0], "-o", tmp_path / "out"] if command == "segment" else ["--data", tmp_path]
    result = run_cli(command, *inputs, option, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"lungseg {command}: error: {message}"
    assert not (tmp_path / "out").exists()
