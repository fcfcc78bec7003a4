"""Quality control of one segmentation: every flag comes with its reason.

The plausible areas depend on the model's lung definition; they are part of it (`definitions.QcLimits`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..definitions import DEFAULT_DEFINITION, DEFINITIONS, LEFT_LUNG, RIGHT_LUNG

TINY_LUNG = 0.2  # a lung smaller than this fraction of the other
LARGE_COMPONENT = 0.005  # of the image area, for counting fragments before clean-up
HIGH_UNCERTAINTY = 0.12  # mean uncertainty inside the lungs
FRAGMENTS = "large lung components before clean-up"  # the fragments rule's reason, which a card may turn off


def quality_flags(
    label: np.ndarray,
    raw_label: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    definition: str = DEFAULT_DEFINITION,
    fragments: bool = True,
) -> list[str]:
    """Reasons to look at this segmentation; an empty list means nothing looks wrong.

    `fragments=False` leaves out the fragments rule (more than two large lung components before clean-up): a
    model card whose QC fit found that rule flagging too many of its model's good results turns it off
    (`QualityModel.fragments_rule`); the clean-up's change still enters its predicted quality."""
    limits = DEFINITIONS.get(definition, DEFINITIONS[DEFAULT_DEFINITION]).qc
    reasons = []
    right, left = int(np.count_nonzero(label == RIGHT_LUNG)), int(np.count_nonzero(label == LEFT_LUNG))
    for name, area, other in (("right", right, left), ("left", left, right)):
        if area == 0:
            reasons.append(f"{name} lung missing")
        elif area < TINY_LUNG * other:
            reasons.append(f"{name} lung tiny ({area / max(other, 1):.0%} of the other lung)")
    fraction = (right + left) / label.size
    low, high = limits.fraction
    if not low <= fraction <= high and right and left:
        reasons.append(f"implausible lung area ({fraction:.0%} of the image; expected {low:.0%}-{high:.0%})")
    if right and left:
        ratio = right / left
        low, high = limits.ratio
        if not low <= ratio <= high:
            reasons.append(f"implausible right/left area ratio {ratio:.2f} (expected {low}-{high})")
        elif limits.mirrored_below and ratio < limits.mirrored_below:
            reasons.append(
                f"possibly mirrored image: right/left area ratio {ratio:.2f} is typical of a flipped "
                "radiograph (heart on the image's left)"
            )
    if raw_label is not None and fragments:
        components = 0
        for value in (RIGHT_LUNG, LEFT_LUNG):
            parts, count = ndimage.label(raw_label == value)
            if count:
                sizes = np.bincount(parts.ravel())[1:]
                components += int((sizes > LARGE_COMPONENT * label.size).sum())
        if components > 2:
            reasons.append(f"{components} {FRAGMENTS} (expected 2)")
    if uncertainty is not None and (right or left):
        mean = float(uncertainty[label > 0].mean())
        if mean > HIGH_UNCERTAINTY:
            reasons.append(f"high uncertainty ({mean:.2f} mean inside the lungs; limit {HIGH_UNCERTAINTY})")
    return reasons
