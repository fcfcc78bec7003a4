"""The inference side on the oldest Python that Slicer ships: Slicer 5.6 and 5.8 have Python 3.9 and numpy 1.26.1,
where pip picks onnxruntime 1.19.2, which runs the shipped graphs' opset. A fresh Python 3.9 venv installs
`./LungSegCore` with numpy pinned as Slicer pins it, and segments the demo radiographs into the same labelmaps,
byte for byte, as this Python does, with every shipped model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, require_or_skip

from lungseg.samples import sample_pngs

SLICER_58_NUMPY = "numpy==1.26.1"
OTHER_MODELS = ("unetpp", "unet-512", "unet-full-extent", "prob_unet")


def python39() -> str:
    """A Python 3.9: LUNGSEG_PYTHON39, pyenv's, or python3.9 on the PATH."""
    pyenv = sorted(Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")).glob("versions/3.9*/bin/python3.9"))
    for candidate in [os.environ.get("LUNGSEG_PYTHON39"), *map(str, pyenv), shutil.which("python3.9")]:
        if (
            candidate
            and subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"], capture_output=True
            ).returncode
            == 0
        ):
            return candidate
    require_or_skip("no Python 3.9 on this machine (set LUNGSEG_PYTHON39 to one)")


@pytest.mark.slow
def test_python39_with_slicers_numpy_segments_like_this_python(tmp_path):
    venv = tmp_path / "py39"
    subprocess.run([python39(), "-m", "venv", str(venv)], check=True)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(SLICER_58_NUMPY + "\n")
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            str(constraints),
            str(REPO / "LungSegCore"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    versions = subprocess.run(
        [str(python), "-c", "import numpy, onnxruntime; print(numpy.__version__, onnxruntime.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert versions[0] == "1.26.1" and versions[1].startswith("1.19."), versions
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the venv's own installed lungseg
    # the default model on every demo film; each other shipped model (its graphs read their weights from its
    # safetensors as ONNX external data, which onnxruntime 1.19 must read too) on one
    runs = [("unet", sample_pngs()[0].parent)] + [(m, sample_pngs()[0]) for m in OTHER_MODELS]
    for model, inputs in runs:
        for name, interpreter in (("py39", python), ("here", Path(sys.executable))):
            run = subprocess.run(
                [str(interpreter), "-m", "lungseg", "segment", str(inputs), "-o", str(tmp_path / model / name)]
                + ["--workers", "1", "--model", model],
                capture_output=True,
                text=True,
                env=env if name == "py39" else dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1"),
                timeout=600,
            )
            assert run.returncode == 0, (model, name, run.stderr[-3000:])
        labelmaps = sorted(p.name for p in (tmp_path / model / "py39").glob("*.nrrd"))
        assert len(labelmaps) == (len(sample_pngs()) if model == "unet" else 1), model
        differ = [
            n
            for n in labelmaps
            if (tmp_path / model / "py39" / n).read_bytes() != (tmp_path / model / "here" / n).read_bytes()
        ]
        assert differ == [], model
