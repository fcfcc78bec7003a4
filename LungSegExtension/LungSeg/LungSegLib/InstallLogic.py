"""Python dependencies of LungSeg in Slicer's Python, installed on first use after the user agrees.

The core runs its models on ONNX Runtime, so the first Apply installs only `onnxruntime` (with its small
dependencies: protobuf, flatbuffers, sympy, coloredlogs) and `tqdm` when it is absent. Everything else the core needs
at inference (numpy, scipy, SimpleITK, pydicom, Pillow) ships with Slicer; their installed versions are pinned in a
constraints file, so pip resolves against them and never replaces them. No PyTorch, no MONAI: those are only for
training (the core's `[train]` extra).
The `lungseg` core package ships inside the extension (see README): it is found, never downloaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import slicer

# the core's inference dependencies (LungSegCore/pyproject.toml) that Slicer does not ship; onnxruntime 1.19.2 is
# the newest for Python 3.9 (Slicer 5.6 and 5.8). highdicom (only for `--format dicom-seg`, which the panel does
# not offer) is left out: it needs pydicom 3, which Slicer 5.6-5.10 do not ship.
REQUIREMENTS = ["onnxruntime>=1.19", "tqdm>=4.60"]
# shipped by Slicer (SuperBuild/External_python-{numpy,scipy,SimpleITK,dicom-requirements}.cmake): pinned to the
# installed versions, never installed or replaced by LungSeg
SLICER_PACKAGES = ["numpy", "scipy", "SimpleITK", "pydicom", "Pillow"]


def corePythonPath() -> Path:
    """The folder that holds the `lungseg` package: beside LungSeg.py in an installed extension, LungSegCore/ in a
    source checkout used as an additional module path."""
    spec = importlib.util.find_spec("lungseg")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent
    checkout = Path(__file__).resolve().parents[3] / "LungSegCore"
    if (checkout / "lungseg" / "__init__.py").is_file():
        sys.path.append(str(checkout))
        return checkout
    raise RuntimeError("the lungseg core package is missing from this LungSeg installation; reinstall the extension")


def constraintPins(versions: dict) -> list[str]:
    """`name==version` for each of Slicer's packages that is installed with a PEP 440 version (pip refuses a
    constraints file with another); `versions` maps a distribution name to its installed version or None."""
    from packaging.version import InvalidVersion, Version

    pins = []
    for name in SLICER_PACKAGES:
        version = versions.get(name)
        if not version:
            continue
        try:
            Version(version)
        except InvalidVersion:
            logging.warning(f"LungSeg: {name} {version} is not a PEP 440 version; it is not pinned")
            continue
        pins.append(f"{name}=={version}")
    return pins


def pipArguments(requirements: list[str], versions: dict, folder: str | Path) -> list[str]:
    """The arguments of `pip install` for `requirements`: `-c <constraints>` (written into `folder`, pinning
    Slicer's packages at `versions`) and the requirements, as one resolution."""
    constraints = Path(folder) / "constraints.txt"
    constraints.write_text("".join(pin + "\n" for pin in constraintPins(versions)))
    return ["-c", str(constraints), *requirements]


class InstallLogic:
    def __init__(self, doAskConfirmation: bool = True):
        self.doAskConfirmation = doAskConfirmation

    @staticmethod
    def _installedVersion(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def missingRequirements(self) -> list[str]:
        """Requirements that are absent or too old in this Python."""
        from packaging.requirements import Requirement

        missing = []
        for text in REQUIREMENTS:
            requirement = Requirement(text)
            version = self._installedVersion(requirement.name)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                missing.append(text)
        return missing

    def ensureDependencies(self) -> bool:
        """Make the core importable with its dependencies; False if the user declined the installation."""
        corePythonPath()
        missing = self.missingRequirements()
        if not missing:
            return True
        if self.doAskConfirmation and not slicer.util.confirmOkCancelDisplay(
            "LungSeg needs these Python packages, which will be installed into Slicer's Python now "
            "(a download of about 15-30 MB; it needs the internet):\n\n" + "\n".join(missing),
            "LungSeg: install Python packages",
        ):
            return False
        self.installPackages(missing)
        importlib.invalidate_caches()
        stillMissing = self.missingRequirements()
        if stillMissing:  # e.g. pip_ensure skips installing in Slicer's testing mode
            raise RuntimeError(self.failureMessage(stillMissing))
        self.checkRestartNeeded()
        return True

    def checkRestartNeeded(self) -> None:
        """An onnxruntime that this Slicer session imported before pip upgraded it keeps running the old code."""
        runtime = sys.modules.get("onnxruntime")
        installed = self._installedVersion("onnxruntime")
        if runtime is not None and installed and getattr(runtime, "__version__", installed) != installed:
            raise RuntimeError(
                f"ONNX Runtime was updated from {runtime.__version__} to {installed} while Slicer "
                "was running: restart Slicer, then press Apply again."
            )

    @staticmethod
    def failureMessage(missing: list[str]) -> str:
        return (
            f"LungSeg could not install {', '.join(missing)} into Slicer's Python {platform.python_version()} "
            f"on {platform.system()} {platform.machine()}: pip found no version that fits this Python and "
            "system together with the numpy, scipy, SimpleITK, pydicom and Pillow that Slicer ships (or the "
            "download failed). pip's own message is in the Python console."
        )

    def installPackages(self, requirements: list[str]) -> None:
        """One pip resolution of `requirements` with Slicer's packages pinned: `slicer.packaging.pip_ensure`
        (Slicer 5.12+), else `slicer.util.pip_install`. Never `skip_packages`, which installs each package with
        `--no-deps` and so bypasses the constraints (packaging.py, Slicer 5.12)."""
        versions = {name: self._installedVersion(name) for name in SLICER_PACKAGES}
        arguments = pipArguments(requirements, versions, tempfile.mkdtemp(prefix="LungSeg-"))
        constraints = arguments[1]
        logging.info(
            f"LungSeg: installing {', '.join(requirements)} "
            f"(keeping {', '.join(constraintPins(versions)) or 'nothing pinned'})"
        )
        try:
            from slicer.packaging import pip_ensure
        except ImportError:
            pip_ensure = None
        try:
            if pip_ensure is not None:
                # LungSeg asked already, and checkRestartNeeded says what a restart is for
                pip_ensure(
                    requirements,
                    constraints=constraints,
                    prompt_install=False,
                    prompt_restart=False,
                    requester="LungSeg",
                )
            else:
                slicer.util.pip_install(arguments)
        except subprocess.CalledProcessError as error:
            importlib.invalidate_caches()
            raise RuntimeError(self.failureMessage(self.missingRequirements() or requirements)) from error
