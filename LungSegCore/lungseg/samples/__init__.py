"""Demo radiographs: three pediatric PNGs shipped here (CC BY 4.0, see ATTRIBUTION.md) and, when the
`pydicom-data` package is installed, its adult chest CR `RG1_UNCR.dcm` (MONOCHROME1)."""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).parent


def sample_pngs() -> list[Path]:
    return sorted(SAMPLES.glob("*.png"))


def chest_dicom() -> Path | None:
    """The real chest CR shipped by pydicom-data, or None where that package is not installed."""
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("RG1_UNCR.dcm")
    except Exception:  # pydicom-data absent or its store unreadable
        return None
    return Path(path) if path else None


def demo_inputs() -> list[Path]:
    dicom = chest_dicom()
    return sample_pngs() + ([dicom] if dicom else [])
