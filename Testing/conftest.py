"""Shared fixtures. Tests run single-threaded (2-core CI) and find the research data in ../shared when it exists.

Missing data or optional packages: on a user's machine the tests that need them skip, with the reason. Under
`LUNGSEG_REQUIRE_DATA=1` (set by `.ci/run`) every such skip is a failure instead, so CI cannot go green by
skipping: call `require_or_skip(reason)` or `importorskip(module)` from here, never `pytest.skip` or
`pytest.importorskip` directly. As a safety net, any other skip under the flag is reported as a failure too.

Markers (pytest.ini): `slicer` (every test under Testing/slicer/) and `data` (every test that uses the `jsrt` or
`covid_qu_ex` fixture) are applied here; `data` is explicit on tests that call `shared_set` or read SHARED_DATA
themselves, and `slow` is explicit. Fast subset, no ../shared needed: pytest Testing -m "not data and not slow".
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LUNGSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
REQUIRE_FLAG = "LUNGSEG_REQUIRE_DATA"


def data_required() -> bool:
    """True under LUNGSEG_REQUIRE_DATA=1 (CI): whatever a test needs must be there."""
    return os.environ.get(REQUIRE_FLAG, "").strip().lower() not in ("", "0", "false", "no")


def require_or_skip(reason: str):
    """Skip the calling test (or module) with `reason`, or fail it when LUNGSEG_REQUIRE_DATA=1."""
    if data_required():
        pytest.fail(f"{REQUIRE_FLAG}=1, so this is a failure, not a skip: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def importorskip(modname: str, reason: str | None = None, minversion: str | None = None):
    """`pytest.importorskip`, except that a missing module fails the test under LUNGSEG_REQUIRE_DATA=1."""
    try:
        return pytest.importorskip(modname, minversion=minversion, reason=reason)
    except pytest.skip.Exception as exc:
        require_or_skip(str(exc.msg) if hasattr(exc, "msg") else str(exc))


def pydicom_data_file(name: str) -> str:
    """The path of one of pydicom-data's test files (e.g. RG1_UNCR.dcm, a real chest CR), or a skip naming it."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name)
    except Exception:  # pydicom-data absent
        path = None
    if not path:
        require_or_skip(f"pydicom-data ({name}) is not installed")
    return path


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fail_skips(report) -> None:
    if data_required() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_FLAG}=1, so this is a failure, not a skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skips(outcome.get_result())


SLICER_TESTS = Path(__file__).resolve().parent / "slicer"
DATA_FIXTURES = {"jsrt", "covid_qu_ex"}  # the research data sets of ../shared/data (shared_set)


def pytest_collection_modifyitems(config, items):
    """`slicer` by folder, `data` by the fixtures a test uses (directly or through another fixture)."""
    for item in items:
        if SLICER_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slicer)
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.data)


def shared_set(name: str) -> Path:
    folder = SHARED_DATA / name
    if not (folder / "images").is_dir():
        require_or_skip(
            f"research data set '{name}' not found at {folder} (it lives in ../shared/data on the "
            "developers' and CI machines and is never distributed)"
        )
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
        require_or_skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    return path


@pytest.fixture(scope="session")
def segmenter():
    from lungseg.inference.segmenter import Segmenter

    return Segmenter("unet", device="cpu")
