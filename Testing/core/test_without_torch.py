"""Inference without PyTorch: with `torch` and `monai` unimportable in every process (a `sitecustomize` on the path,
so spawned readers and finishers get it too), the command line segments into every output format, with overlays,
probabilities and uncertainty, with a single network, an ensemble and the probabilistic U-Net, evaluates against
masks and fits QC; and the Python API segments. Every import of either that was tried is logged and fails the test.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lungseg.samples import sample_pngs

BLOCKER = '''
import importlib.abc, os, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    """torch and MONAI cannot be imported here; every try is logged."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai"):
            with open(os.environ["LUNGSEG_BLOCKED_LOG"], "a") as log:
                log.write(f"{name} (pid {os.getpid()})\\n")
            raise ImportError(f"{name} is unimportable in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
'''


@pytest.fixture
def no_torch(tmp_path):
    """Run `python ARGS...` with torch and MONAI unimportable; returns (run, log of blocked imports)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "blocked.log"
    env = dict(
        os.environ,
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
        LUNGSEG_BLOCKED_LOG=str(log),
        PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )

    def run(*args, method=None, check=0):
        extra = {"LUNGSEG_START_METHOD": method} if method else {}
        result = subprocess.run(
            [sys.executable, *map(str, args)], capture_output=True, text=True, env={**env, **extra}, timeout=600
        )
        assert result.returncode == check, result.stderr[-3000:]
        return result

    run.log = log
    return run


def rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return {Path(r["input"]).name: r for r in csv.DictReader(f)}


def test_the_blocker_blocks(no_torch):
    result = no_torch("-c", "import torch", check=1)
    assert "unimportable in this test" in result.stderr and "torch" in no_torch.log.read_text()


@pytest.mark.parametrize("fmt, method", [("nrrd", "spawn"), ("nii.gz", "fork"), ("mha", "fork"), ("png", "fork")])
def test_segment_writes_every_output_without_torch(tmp_path, no_torch, chest_dicom, fmt, method):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(sample_pngs()[0], inputs)
    shutil.copy(chest_dicom, inputs / "cr.dcm")
    out = tmp_path / "out"
    no_torch(
        "-m",
        "lungseg",
        "segment",
        inputs,
        "-o",
        out,
        "--format",
        fmt,
        "--overlays",
        "--uncertainty",
        "--save-probabilities",
        "--workers",
        "1",
        method=method,
    )
    found = rows(out)
    assert len(found) == 2 and all(r["status"] == "ok" and r["qc"] for r in found.values()), found
    for row in found.values():
        for key in ("output", "overlay", "probabilities", "uncertainty_map", "thumbnail"):
            assert Path(row[key]).is_file(), (key, row[key])
    assert (out / "review.html").is_file()
    assert not no_torch.log.exists(), no_torch.log.read_text()


@pytest.mark.parametrize("model", ["prob_unet", "unet-full-extent"])
def test_dicom_seg_latent_samples_and_ensembles_without_torch(tmp_path, no_torch, chest_dicom, model):
    out = tmp_path / "out"
    no_torch(
        "-m",
        "lungseg",
        "segment",
        chest_dicom,
        "-o",
        out,
        "--model",
        model,
        "--uncertainty",
        "--format",
        "dicom-seg",
        "--workers",
        "0",
    )
    (row,) = rows(out).values()
    assert row["status"] == "ok" and row["output"].endswith(".dcm") and float(row["uncertainty_mean"]) > 0, row
    assert not no_torch.log.exists(), no_torch.log.read_text()


def test_evaluate_fit_qc_and_the_python_api_without_torch(tmp_path, no_torch, jsrt):
    data = tmp_path / "set"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
    for name in sorted(os.listdir(jsrt / "images"))[:12]:  # JSRT train images: the shipped models trained on them
        shutil.copy(jsrt / "images" / name, data / "images")
        shutil.copy(jsrt / "masks" / name, data / "masks")
    no_torch(
        "-m", "lungseg", "evaluate", "--images", data / "images", "--masks", data / "masks", "-o", tmp_path / "eval"
    )
    assert len((tmp_path / "eval" / "evaluation.csv").read_text().splitlines()) == 13
    report = tmp_path / "qc.json"  # fitted on JSRT val, which the shipped models never trained on
    no_torch(
        "-m",
        "lungseg",
        "fit-qc",
        "--model",
        "unet",
        "--data",
        jsrt,
        "--split",
        "val",
        "--perturbations",
        "1",
        "--report",
        report,
    )
    assert report.is_file()
    api = no_torch(
        "-c",
        "import lungseg, sys; image = lungseg.read_radiograph(sys.argv[1]); "
        "model = lungseg.Segmenter('unet'); p = model.segment(image.pixels); "
        "print(sorted(set(p.label.ravel().tolist())), lungseg.assess(p, model).qc)",
        sample_pngs()[0],
    )
    assert api.stdout.split("]")[0] == "[0, 1, 2" and api.stdout.strip().endswith(("ok", "check"))
    assert not no_torch.log.exists(), no_torch.log.read_text()
