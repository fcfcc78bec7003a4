"""Shared fixtures. Tests run single-threaded (2-core CI) and find the research data in ../shared when it exists."""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LUNGSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_set(name: str) -> Path:
    folder = SHARED_DATA / name
    if not (folder / "images").is_dir():
        pytest.skip(f"research data set '{name}' not found at {folder} (it lives in ../shared/data on the "
                    "developers' and CI machines and is never distributed)")
    return folder


@pytest.fixture(scope="session")
def jsrt() -> Path:
    return shared_set("jsrt")


@pytest.fixture(scope="session")
def covid_qu_ex() -> Path:
    return shared_set("covid-qu-ex")


@pytest.fixture(scope="session")
def chest_dicom() -> Path:
    from lungseg.samples import chest_dicom as find

    path = find()
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    return path


@pytest.fixture(scope="session")
def segmenter():
    from lungseg.inference import Segmenter

    return Segmenter("unet", device="cpu")
