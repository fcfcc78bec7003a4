"""How the extension reaches users: the catalog entry, the "additional module path" install from a checkout, the
Python of the oldest supported Slicer and the demo CR in Sample Data (the README's figures: core/test_docs.py)."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import importorskip, require_or_skip

REPO = Path(__file__).resolve().parents[2]
EXTENSION = REPO / "LungSegExtension"
MODULE = EXTENSION / "LungSeg"
CORE = REPO / "LungSegCore" / "lungseg"


def test_catalog_entry_follows_the_extensions_index_schema():
    """ExtensionsIndex entry, schema v1.0.2 (Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json:
    required $schema, category and scm_url; no other properties than these; scm_type git or local)."""
    entry = json.loads((EXTENSION / "LungSeg.json").read_text())
    allowed = {
        "$schema": str,
        "category": str,
        "scm_url": str,
        "scm_revision": str,
        "scm_type": str,
        "build_dependencies": list,
        "dicom_support_rule": str,
        "build_subdirectory": str,
        "enabled": bool,
        "tier": int,
    }
    assert {"$schema", "category", "scm_url"} <= set(entry) <= set(allowed)
    assert all(isinstance(entry[key], allowed[key]) for key in entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    # the same facts as the extension's CMakeLists.txt
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    # no extension dependency (the PyTorch extension no longer): the wizard's "NA" (Utilities/Templates/Extensions/
    # Default/CMakeLists.txt), and no build_dependencies in the entry
    depends = " ".join(entry.get("build_dependencies", [])) or "NA"
    assert re.search(rf'set\(EXTENSION_DEPENDS "{depends}"\)', cmake) and depends == "NA"
    assert f"set(EXTENSION_BUILD_SUBDIRECTORY {entry['build_subdirectory']})" in cmake


def test_module_found_through_an_additional_module_path_finds_the_core_beside_it(tmp_path):
    """Slicer adds the module's folder to sys.path; with no lungseg installed, the module finds the checkout's
    LungSegCore. The child hides this venv's editable install of lungseg first."""
    script = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ + repr(f)]
sys.path[:] = [p for p in sys.path if "LungSegCore" not in p]
import importlib.util
assert importlib.util.find_spec("lungseg") is None, "lungseg still importable"
sys.path.insert(0, {str(REPO / "Testing" / "slicer" / "support")!r})
import slicer_app
slicer_app.start()
sys.path.insert(0, {str(MODULE)!r})
from LungSegLib.InstallLogic import corePythonPath
print(corePythonPath())
import lungseg.models.cards
print(lungseg.models.cards.__file__)
print(sorted(card["name"] for card in lungseg.models.cards.list_models()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder, module, models = result.stdout.splitlines()[-3:]
    assert Path(folder) == REPO / "LungSegCore" and Path(module).is_relative_to(CORE)
    assert "unet" in models


def python_files() -> list[Path]:
    return sorted([*MODULE.rglob("*.py"), *CORE.rglob("*.py")])


def test_module_and_core_parse_as_python_39():
    """Slicer 5.6 and 5.8 ship Python 3.9: no newer syntax in the module or the bundled core."""
    for path in python_files():
        ast.parse(path.read_text(), str(path), feature_version=(3, 9))
        text = path.read_text()
        if "__future__ import annotations" not in text:  # PEP 604 unions would be evaluated at import time
            assert not re.search(r"(->|:)\s*\w+(\[[^]]*\])?\s*\|\s*\w", text), path


def test_module_and_core_compile_with_python_39():
    # pyenv's shim answers even where 3.9 is not selected: take the interpreter itself
    python = next(iter(sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))), None) or shutil.which(
        "python3.9"
    )
    if python is None:
        require_or_skip("no Python 3.9 interpreter here to compile the files with")
    files = [str(p) for p in python_files()]
    result = subprocess.run(
        [
            str(python),
            "-c",
            "import sys, ast\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')",
            *files,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("version", [(5, 6), (5, 8), (5, 12)], ids=["5.6", "5.8", "5.12"])
def test_demo_cr_in_sample_data_loads_as_a_volume(monkeypatch, tmp_path, version):
    """Sample Data > Chest radiograph: pydicom-data's CR at the commit and SHA-256 that pydicom itself pins, loaded
    as a volume. From Slicer 5.8 a source without a file type goes to the reader that claims the file first, and
    for a .dcm that is the DICOM module's import, which loads nothing (stand-in: slicer/support/SampleData.py)."""
    importorskip("slicer_core", reason="slicer-core is not installed (scripts/setup.sh test)")
    sys.path.insert(0, str(REPO / "Testing" / "slicer" / "support"))
    import slicer_app

    slicer = slicer_app.start()
    import SampleData
    import slicer.parameterNodeWrapper as wrapper

    assert Path(SampleData.__file__).parent == REPO / "Testing" / "slicer" / "support"
    monkeypatch.setattr(wrapper, "SLICER_VERSION", version)
    monkeypatch.setattr(slicer.modules, "sampleDataSources", {}, raising=False)
    monkeypatch.setattr(slicer, "dicomDatabase", None)
    monkeypatch.setattr(SampleData, "CACHE_FOLDER", str(tmp_path))
    connected = []
    monkeypatch.setattr(slicer.app, "connect", lambda signal, slot: connected.append((signal, slot)), raising=False)
    import LungSeg

    LungSeg.LungSeg(types.SimpleNamespace())
    ((signal, slot),) = connected
    assert signal == "startupCompleted()"
    slot()
    ((source,),) = slicer.modules.sampleDataSources.values()
    assert source.sampleName == "LungSegChestCR" and Path(source.thumbnailFileName).is_file()

    import pydicom.data

    pinned = Path(pydicom.data.__file__).parent
    url = json.loads((pinned / "urls.json").read_text())["RG1_UNCR.dcm"]
    digest = json.loads((pinned / "hashes.json").read_text())["RG1_UNCR.dcm"]
    url = url if isinstance(url, str) else url[0]
    assert source.uris == [url] and source.checksums == [f"SHA256:{digest}"]
    from lungseg.samples import chest_dicom

    local = chest_dicom()
    if local is None:
        require_or_skip("pydicom-data is not installed")
    shutil.copy(local, tmp_path / source.fileNames[0])  # as downloaded into Slicer's cache
    try:
        volume = SampleData.SampleDataLogic().downloadSample("LungSegChestCR")
        assert volume.IsA("vtkMRMLScalarVolumeNode"), volume.GetClassName()
        assert volume.GetName() == "LungSegChestCR" and volume.GetStorageNode() is None
        assert slicer.util.arrayFromVolume(volume).shape == (1, 1955, 1841)
    finally:
        slicer.mrmlScene.Clear()


# Slicer 5.6.2's Python packages (SuperBuild/External_python-*.cmake): numpy 1.26.1, scipy 1.11.3; pydicom and
# SimpleITK as it ships them are close enough for the calls the module makes before torch is installed.
SLICER_56_PACKAGES = ["numpy==1.26.1", "scipy==1.11.3", "SimpleITK", "pydicom", "PyYAML"]


def test_torch_free_core_runs_on_the_python_of_slicer_56(tmp_path, chest_dicom):
    """What the module uses before torch is installed (model cards, reading a radiograph, QC, labels, writing) imports
    and runs on Python 3.9 with Slicer 5.6's numpy and scipy. The venv is cached in .venv/py39-slicer56."""
    python = next(iter(sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))), None) or shutil.which(
        "python3.9"
    )
    if python is None:
        require_or_skip("no Python 3.9 interpreter here")
    venv = REPO / ".venv" / "py39-slicer56"
    stamp = venv / (".stamp-" + hashlib.sha1(" ".join(SLICER_56_PACKAGES).encode()).hexdigest()[:10])
    if not stamp.exists():
        subprocess.run([str(python), "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *SLICER_56_PACKAGES,
            ],
            check=True,
            timeout=600,
        )
        stamp.touch()
    script = f"""
import sys
sys.path.insert(0, {str(CORE.parent)!r})
import numpy as np
from lungseg import definitions
from lungseg.io import files
from lungseg.io import radiograph as io
from lungseg.inference import labels
from lungseg.models import cards as models
from lungseg.batch import overlay
from lungseg.qc import rules as qc
radiograph = io.read_radiograph({str(chest_dicom)!r})
label = np.zeros(radiograph.shape, np.uint8)
label[400:1400, 300:800], label[400:1400, 1050:1550] = 1, 2
print(sorted(card["name"] for card in models.list_models()))
flags = qc.quality_flags(label, label, None, "lung-fields")
print(radiograph.shape, flags, labels.lung_areas(label, None)["right_area_px"])
io.write_labelmap(label, radiograph.reference, {str(tmp_path / "label.nrrd")!r})
print(sys.version_info[:2], np.__version__)
"""
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names, read, version = result.stdout.splitlines()[-3:]
    assert "unet" in names and read.startswith("(1955, 1841)") and version.startswith("(3, 9) 1.26.1")
    assert (tmp_path / "label.nrrd").is_file()


# --- the first Apply's pip install, resolved by pip's real resolver ----------------------------------------------
# Slicer's own packages by release (SuperBuild/External_python-*.cmake; see shared/reviews/slicer-module-review-2.md,
# R2): 5.6.2 and 5.8 ship Python 3.9 with numpy 1.26.1 and scipy 1.11.3; 5.10 ships Python 3.12 with numpy 2.0.2;
# 5.12 (and Slicer's HEAD) Python 3.12 with numpy 2.4.6, scipy 1.17.1, SimpleITK 2.5.5, pydicom 3.0.2, pillow 12.2.0.
# Of these only numpy enters the resolution (onnxruntime depends on it); the others are pinned all the same.
SLICER_VERSIONS = {
    "5.6/5.8": ("3.9", {"numpy": "1.26.1", "scipy": "1.11.3"}),
    "5.10": ("3.12", {"numpy": "2.0.2"}),
    "5.12": (
        "3.12",
        {"numpy": "2.4.6", "scipy": "1.17.1", "SimpleITK": "2.5.5", "pydicom": "3.0.2", "Pillow": "12.2.0"},
    ),
}
# pip expands a manylinux_2_28 tag to older glibc tags but not to the legacy manylinux2014 alias: name the friends
LINUX = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# (Slicer, platform tags, onnxruntime that pip must pick: an exact version, ">=1.19" where new releases still come,
# or None where no onnxruntime>=1.19 exists and pip must refuse)
RESOLVER_CASES = [
    ("5.6/5.8", ["win_amd64"], "1.19.2"),  # 1.19.2: the last onnxruntime for Python 3.9
    ("5.6/5.8", LINUX, "1.19.2"),
    ("5.6/5.8", ["macosx_11_0_arm64"], "1.19.2"),  # a universal2 wheel
    ("5.6/5.8", ["macosx_11_0_x86_64"], "1.19.2"),
    ("5.6/5.8", ["macosx_10_15_x86_64"], None),  # only onnxruntime 1.16.3 has a macOS 10.15 wheel
    ("5.10", ["win_amd64"], ">=1.19"),
    ("5.10", LINUX, ">=1.19"),
    ("5.10", ["macosx_14_0_arm64"], ">=1.19"),
    ("5.12", ["win_amd64"], ">=1.19"),
    ("5.12", LINUX, ">=1.19"),
    ("5.12", ["macosx_14_0_arm64"], ">=1.19"),
    ("5.12", ["macosx_13_0_x86_64"], "1.23.2"),  # the last onnxruntime with an Intel-Mac wheel
    ("5.12", ["macosx_10_15_x86_64"], None),  # Python 3.12 on an Intel Mac before macOS 11: none
]


@pytest.fixture(scope="module")
def pypi():
    """pip reaches its index (PyPI, as configured): else a skip, or a failure under LUNGSEG_REQUIRE_DATA=1."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "onnxruntime", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        result = None
    if result is None or result.returncode != 0 or "onnxruntime (" not in result.stdout:
        require_or_skip(
            "PyPI is unreachable: the resolver test needs pip's index "
            f"({result.stderr.strip()[-300:] if result else 'timed out'})"
        )


@pytest.fixture(scope="module")
def install_logic():
    importorskip("slicer_core", reason="slicer-core is not installed (scripts/setup.sh test)")
    sys.path.insert(0, str(REPO / "Testing" / "slicer" / "support"))
    import slicer_app

    slicer_app.start()
    from LungSegLib import InstallLogic

    return InstallLogic


@pytest.mark.parametrize(
    "slicer_version, platforms, expected", RESOLVER_CASES, ids=[f"{s}-{p[0]}" for s, p, _ in RESOLVER_CASES]
)
def test_pip_resolves_onnxruntime_against_slicers_packages(
    pypi, install_logic, tmp_path, slicer_version, platforms, expected
):
    """The first Apply's `pip install` (InstallLogic.pipArguments: the constraints file and the requirements, as
    pip_install gets them before 5.12 and pip_ensure builds them in 5.12) through pip's real resolver, for the
    Python, numpy and platform of each Slicer: onnxruntime resolves, numpy stays Slicer's, no torch or MONAI comes
    along; where no onnxruntime fits, pip refuses and names it."""
    from packaging.specifiers import SpecifierSet

    python, versions = SLICER_VERSIONS[slicer_version]
    arguments = install_logic.pipArguments(install_logic.REQUIREMENTS, versions, tmp_path)
    assert arguments[:2] == ["-c", str(tmp_path / "constraints.txt")]
    assert (tmp_path / "constraints.txt").read_text().split() == [
        f"{name}=={versions[name]}" for name in install_logic.SLICER_PACKAGES if name in versions
    ]
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--report",
        str(report),
        "--python-version",
        python,
        *[option for tag in platforms for option in ("--platform", tag)],
        *arguments,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if expected is None:
        assert result.returncode != 0 and "onnxruntime" in result.stderr, result.stderr[-2000:]
        assert "No matching distribution" in result.stderr or "ResolutionImpossible" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    print(f"Slicer {slicer_version}, Python {python}, {platforms[0]}: onnxruntime {chosen.get('onnxruntime')}")
    assert chosen.get("onnxruntime") in SpecifierSet(expected if expected.startswith(">") else f"=={expected}")
    assert chosen["numpy"] == versions["numpy"]  # Slicer's numpy, never replaced
    for name in install_logic.SLICER_PACKAGES:  # the others do not even enter the resolution
        assert chosen.get(name.lower(), versions.get(name)) == versions.get(name), name
    assert not {"torch", "monai", "torchvision", "safetensors"} & set(chosen), sorted(chosen)
    assert "tqdm" in chosen
