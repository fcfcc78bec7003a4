"""Python dependencies of LungSeg in Slicer's Python, installed on first use after the user agrees.

torch comes from the PyTorch extension (SlicerPyTorch picks the build for the machine's GPU and driver); the other
packages come from pip, resolved against the torch, numpy and SimpleITK that are installed, which are pinned in a
constraints file: pip then picks a MONAI that declares support for that torch (MONAI 1.6 needs torch 2.8 or newer,
and the PyTorch extension installs torch 2.2 on Intel Macs), and it never replaces Slicer's numpy or SimpleITK.
The `lungseg` core package ships inside the extension (see README): it is found, never downloaded.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

import slicer

TORCH_REQUIREMENT = "torch>=2.1"
# the core's runtime dependencies (LungSegCore/pyproject.toml) that Slicer does not ship
REQUIREMENTS = ["monai>=1.4", "safetensors>=0.4", "scikit-image>=0.21", "pydicom>=2.4", "PyYAML>=6",
                "tqdm>=4.60", "scipy>=1.10"]
# provided by Slicer or by the PyTorch extension: never let pip install or replace them
PROTECTED = ["numpy", "SimpleITK", "torch"]


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
        """Requirements (torch first) that are absent or too old in this Python."""
        from packaging.requirements import Requirement

        missing = []
        for text in [TORCH_REQUIREMENT, *REQUIREMENTS]:
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
                "(this may take several minutes and needs the internet):\n\n" + "\n".join(missing),
                "LungSeg: install Python packages"):
            return False
        if missing[0] == TORCH_REQUIREMENT:
            self.installTorch()
            missing = missing[1:]
        if missing:
            self.installPackages(missing)
        importlib.invalidate_caches()
        self.checkRestartNeeded()
        return True

    def checkRestartNeeded(self) -> None:
        """A torch that this Slicer session imported before it was upgraded keeps running the old code."""
        torch = sys.modules.get("torch")
        installed = self._installedVersion("torch")
        if torch is not None and installed and getattr(torch, "__version__", installed).split("+")[0] \
                != installed.split("+")[0]:
            raise RuntimeError(f"PyTorch was updated from {torch.__version__} to {installed} while Slicer was "
                               "running: restart Slicer, then press Apply again.")

    @staticmethod
    def installTorch() -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError as exc:
            raise RuntimeError("LungSeg needs the PyTorch extension: install it from the Extensions Manager, "
                               "restart Slicer and press Apply again.") from exc
        specifier = TORCH_REQUIREMENT.removeprefix("torch")
        logging.info(f"LungSeg: installing PyTorch {specifier} through the PyTorch extension")
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=specifier) is None:
            raise RuntimeError("PyTorch could not be installed; see the Python console for the reason.")

    def installPackages(self, requirements: list[str]) -> None:
        """pip_ensure (Slicer 5.12+) or pip_install, with the installed torch, numpy and SimpleITK pinned."""
        pins = [f"{name}=={self._installedVersion(name)}" for name in PROTECTED if self._installedVersion(name)]
        constraints = Path(tempfile.mkdtemp(prefix="LungSeg-")) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        logging.info(f"LungSeg: installing {', '.join(requirements)} (keeping {', '.join(pins)})")
        try:
            from slicer.packaging import pip_ensure
        except ImportError:
            pip_ensure = None
        if pip_ensure is not None:
            from packaging.requirements import Requirement

            pip_ensure([Requirement(r) for r in requirements], constraints=str(constraints),
                       skip_packages=PROTECTED, prompt_install=False, requester="LungSeg")
            return
        # before 5.12: one pip call, so that the resolver sees the pinned torch when it picks MONAI
        slicer.util.pip_install(["-c", str(constraints), *requirements])
