"""Render the LungSeg panel after segmenting a shipped sample radiograph: LungSeg-panel.png beside this script is the
README's and the Extensions Index's screenshot.

It runs outside Slicer, on slicer-core (real MRML) and PySide6 offscreen with the stand-ins of Testing/slicer/support,
from the repository root after `scripts/setup.sh test`:

    TQDM_DISABLE=1 .venv/bin/python LungSegExtension/Screenshots/render_panel.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = Path(__file__).resolve().parent / "LungSeg-panel.png"


def render(path: str | Path = SCREENSHOT, width: int = 460, height: int = 660) -> Path:
    sys.path.insert(0, str(REPO / "Testing" / "slicer" / "support"))
    import slicer_app

    slicer, application = slicer_app.start_gui()
    from lungseg.samples import sample_pngs

    from LungSeg import LungSegWidget

    slicer_app.load_volume(sample_pngs()[0], "chest-PA")
    moduleWidget = LungSegWidget()
    moduleWidget.setup()
    panel = moduleWidget.panel
    panel.ui.applyButton.click()  # segments before it returns
    if not panel.logic.lastSummary:
        raise RuntimeError(f"the segmentation failed: {panel.ui.statusLabel.text()}")
    moduleWidget.parent.resize(width, height)
    moduleWidget.parent.show()
    application.processEvents()
    path = Path(path)
    if not moduleWidget.parent.grab().save(str(path)):
        raise OSError(f"could not write {path}")
    moduleWidget.parent.hide()
    moduleWidget.cleanup()
    return path


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    print(render())
