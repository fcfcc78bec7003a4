"""Decompression bombs and huge images (issue 13): the size comes from the header, and an image above the pixel limit
is refused before any large allocation; real radiographs of 4892x4020 16-bit pixels still segment."""

from __future__ import annotations

import csv
import os
import resource
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import pydicom_data_file, require_or_skip

from lungseg.io.radiograph import DEFAULT_MAX_PIXELS, ImageReadError, read_radiograph
from lungseg.samples import sample_pngs

BOMB_SIDE = 40000  # 1.6 Gpx: 1.6 GB decoded as 8-bit gray, 6.4 GB as float32
BIG_ROWS, BIG_COLUMNS = 4892, 4020


def bomb_png(path, width=BOMB_SIDE, height=BOMB_SIDE, rows_per_block=32):
    """A valid 8-bit gray PNG of width x height zeros, 1.6 MB on disk: its zlib stream repeats one fully flushed
    deflate block of `rows_per_block` zero rows (filter byte and pixels), so it is written in milliseconds."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = raw.compress(b"\0" * ((width + 1) * rows_per_block)) + raw.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(height, rows_per_block)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    end = tail.compress(b"\0" * ((width + 1) * rest)) + tail.flush()
    adler = (((width + 1) * height % 65521) << 16) | 1  # Adler-32 of that many zero bytes
    idat = b"\x78\xda" + block * full + end + struct.pack(">I", adler)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
    return path


def test_the_bomb_png_is_a_valid_png():
    """The generator's output decodes (checked on a small one, whose zlib stream is built the same way)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = bomb_png(Path(folder) / "small.png", 300, 200, rows_per_block=16)
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == (300, 200) and sitk.GetArrayFromImage(image).max() == 0


def chest_cr():
    return pydicom_data_file("RG1_UNCR.dcm")


def big_radiograph(path):
    """The real CR upsampled to 4892 rows x 4020 columns of 16-bit pixels (39 MB), with a detector spacing."""
    ds = pydicom.dcmread(chest_cr())
    source = sitk.GetImageFromArray(ds.pixel_array.astype(np.float32))
    big = sitk.Resample(
        source,
        [BIG_COLUMNS, BIG_ROWS],
        sitk.Transform(),
        sitk.sitkLinear,
        (0, 0),
        [ds.Columns / BIG_COLUMNS, ds.Rows / BIG_ROWS],
    )
    ds.PixelData = np.round(sitk.GetArrayFromImage(big)).astype(np.uint16).tobytes()
    ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit = BIG_ROWS, BIG_COLUMNS, 16, 15
    ds.ImagerPixelSpacing = [0.0875, 0.0875]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path)
    return path


def dicom_bomb(path):
    """A DICOM header that declares 65535 x 65535 pixels over a few bytes of pixel data."""
    ds = pydicom.dcmread(chest_cr(), stop_before_pixels=True)
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\0" * 64
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def nrrd_bomb(path):
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 40000 40000\nencoding: raw\n\n" + b"\0" * 64)
    return path


def max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.mark.parametrize("make, name", [(bomb_png, "bomb.png"), (dicom_bomb, "bomb.dcm"), (nrrd_bomb, "bomb.nrrd")])
def test_header_size_is_checked_before_decoding(tmp_path, make, name):
    path = make(tmp_path / name)
    before, t0 = max_rss_mb(), time.perf_counter()
    with pytest.raises(ImageReadError, match="refused before decoding") as err:
        read_radiograph(path)
    seconds = time.perf_counter() - t0
    assert "Mpx" in err.value.problem and f"limit of {DEFAULT_MAX_PIXELS / 1e6:g} Mpx" in err.value.problem
    assert max_rss_mb() - before < 100, "the pixels must not be allocated"
    assert seconds < 2.0, seconds


def test_the_limit_admits_real_radiographs_and_can_be_changed(tmp_path):
    from lungseg.batch.reader import read_input
    from lungseg.cli import parser

    assert BIG_ROWS * BIG_COLUMNS < DEFAULT_MAX_PIXELS
    cr = chest_cr()  # 1955 x 1841 = 3.6 Mpx
    assert "above the limit of 1 Mpx" in read_input(cr, 256, False, max_pixels=1_000_000)["error"]
    assert "error" not in read_input(cr, 256, False, max_pixels=None)
    args = parser().parse_args(["segment", "x", "-o", "y", "--max-pixels", "5e6"])
    assert args.max_pixels == 5_000_000
    assert parser().parse_args(["segment", "x", "-o", "y"]).max_pixels == DEFAULT_MAX_PIXELS


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc/PID/task/TID/children (cheaper than scanning all of /proc)."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
        except OSError:  # the process or thread just ended
            continue
    return tree


def rss_and_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes from /proc/PID/smaps_rollup; (0, 0) for a process that just ended."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def run_measured(args, env):
    """Run a command and poll its process tree every 20 ms: the peak of the summed PSS and of the summed RSS."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"pss": 0, "rss": 0, "processes": 0}
    while process.poll() is None:
        tree = process_tree(process.pid)
        memory = [rss_and_pss(pid) for pid in tree]
        peak["rss"] = max(peak["rss"], sum(m[0] for m in memory))
        peak["pss"] = max(peak["pss"], sum(m[1] for m in memory))
        peak["processes"] = max(peak["processes"], len(tree))
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr, peak


def test_bombs_and_huge_radiographs_in_one_batch_with_two_workers(tmp_path):
    """3 bombs of 40000x40000 and 3 real radiographs (the CR, its 4892x4020 16-bit upsampling, a pediatric PNG),
    with 2 workers: the real ones finish, the bombs fail alone, and the whole process tree stays under 1.5 GB.

    Measured: the peak of the PSS summed over the command's process tree (the model process, 2 DataLoader workers,
    2 writer processes). PSS counts a page shared by n processes as 1/n in each, so the sum is the memory the tree
    occupies. The RSS sum is printed too: it counts every page that the forked workers share copy-on-write with the
    model process once per process, so it exceeds the memory in use (about 2.1 GB here with no bomb decoded at all).
    """
    if not os.path.exists("/proc/self/smaps_rollup") or not os.path.exists(f"/proc/{os.getpid()}/task"):
        require_or_skip("measuring a process tree's memory needs Linux /proc (smaps_rollup)")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        bomb_png(inputs / f"bomb{i}.png")
    os.symlink(chest_cr(), inputs / "cr.dcm")
    big_radiograph(inputs / "big16.dcm")
    os.symlink(sample_pngs()[0], inputs / "child.png")
    out = tmp_path / "out"
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    status, stdout, stderr, peak = run_measured(
        [sys.executable, "-m", "lungseg", "segment", str(inputs), "-o", str(out), "--workers", "2"], env
    )
    seconds = time.perf_counter() - t0
    print(
        f"bomb batch: peak PSS sum {peak['pss'] / 2**20:.0f} MiB, peak RSS sum {peak['rss'] / 2**20:.0f} MiB, "
        f"{peak['processes']} processes, {seconds:.1f} s"
    )
    assert status == 1, stderr
    assert "3 of 6 segmented, 3 failed" in stdout
    assert peak["processes"] >= 3, "the workers were measured"
    assert peak["pss"] < 1.5e9, peak
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = {os.path.basename(r["input"]): r for r in csv.DictReader(f)}
    for i in range(3):
        assert rows[f"bomb{i}.png"]["status"] == "error"
        assert "declares 40000x40000 pixels" in rows[f"bomb{i}.png"]["error"]
        assert "refused before decoding" in rows[f"bomb{i}.png"]["error"]
    for name in ("cr.dcm", "big16.dcm", "child.png"):
        assert rows[name]["status"] == "ok", rows[name]["error"]
    big = sitk.GetArrayFromImage(sitk.ReadImage(rows["big16.dcm"]["output"])).squeeze()
    normal = sitk.GetArrayFromImage(sitk.ReadImage(rows["cr.dcm"]["output"])).squeeze()
    assert big.shape == (BIG_ROWS, BIG_COLUMNS)
    assert float(rows["big16.dcm"]["right_area_mm2"]) > 0  # ImagerPixelSpacing 0.0875 mm
    # the same anatomy at 2.5x the resolution: sampled back onto the CR's grid, the lungs agree
    r = (np.arange(normal.shape[0]) * BIG_ROWS / normal.shape[0]).astype(int)
    c = (np.arange(normal.shape[1]) * BIG_COLUMNS / normal.shape[1]).astype(int)
    sampled = big[np.ix_(r, c)]
    for value in (1, 2):
        dice = 2 * ((sampled == value) & (normal == value)).sum() / ((sampled == value).sum() + (normal == value).sum())
        assert dice > 0.95, (value, dice)
