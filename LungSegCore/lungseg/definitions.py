"""The project's vocabulary: the label values and the lung definitions a model can follow.

Pure Python, no torch: the Slicer panel reads it before torch is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

# Labels follow the patient's side, never the image's.
BACKGROUND, RIGHT_LUNG, LEFT_LUNG = 0, 1, 2
NUM_CLASSES = 3
IGNORE = 255  # training labels only: pixels (devices, markup) that count neither for nor against a prediction
LABEL_DESCRIPTIONS = {
    BACKGROUND: "background",
    RIGHT_LUNG: "right lung (patient side)",
    LEFT_LUNG: "left lung (patient side)",
}

# The coded terms of the two lungs, the one source for every writer that names them (the DICOM-SEG writer here and the
# Slicer module's segments): Slicer's "3D Slicer General Anatomy list" codes them as category Anatomical Structure, type
# Lung, with the laterality as the type modifier. (coding scheme, code value, code meaning), SNOMED CT.
LUNG_CATEGORY = ("SCT", "123037004", "Anatomical Structure")
LUNG_TYPE = ("SCT", "39607008", "Lung")
LUNG_LATERALITY = {RIGHT_LUNG: ("SCT", "24028007", "Right"), LEFT_LUNG: ("SCT", "7771000", "Left")}
LUNG_SEGMENT_NAMES = {RIGHT_LUNG: "Right lung", LEFT_LUNG: "Left lung"}


@dataclass(frozen=True)
class QcLimits:
    """Plausible ranges of one definition's masks: from the reference masks in ../shared/data (0.5th and 99.5th
    percentiles, widened). The right/left ratio is about 1.2 for lung fields and 0.9 for the full extent."""

    fraction: tuple[float, float]  # lung area as a fraction of the image
    ratio: tuple[float, float]  # right/left lung area
    mirrored_below: float | None  # a ratio below this suggests a mirrored image (None: not decidable)


@dataclass(frozen=True)
class Definition:
    name: str  # as in model cards, configs and `--definition`
    title: str  # for menus
    description: str  # one sentence, for model cards
    qc: QcLimits


DEFINITIONS = {
    d.name: d
    for d in (
        Definition(
            "lung-fields",
            "Lung fields (visible lung, SCR style)",
            "visible lung fields (SCR style): the lung behind the heart and below the diaphragm dome is excluded",
            QcLimits(fraction=(0.08, 0.55), ratio=(0.5, 2.6), mirrored_below=0.75),
        ),
        Definition(
            "full-extent",
            "Full extent (lung behind heart and diaphragm)",
            "full anatomical lung extent, including the retrocardiac lung and the bases",
            QcLimits(fraction=(0.10, 0.70), ratio=(0.45, 1.8), mirrored_below=None),
        ),
    )
}
DEFAULT_DEFINITION = "lung-fields"
