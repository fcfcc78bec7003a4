"""Responsiveness of the LungSeg panel under an emulation of Slicer's event loop, on slicer-core and PySide6.

In Slicer the main thread holds Python's GIL while it waits in Qt's event loop (PythonQt never releases it) and
runs Python only in callbacks; `slicer_app.spin_like_slicer` emulates that. Measured, in one fresh process, on
pydicom-data's 1955x1841 chest CR loaded as Slicer's DICOM module loads it:

- first_apply_s: the first Apply of a session after installation: imports onnxruntime and the core's inference
  modules, reads the model card and creates the ONNX Runtime session (graph optimisation included), then segments;
- second_apply_s: the next Apply, until the segments are in the scene;
- longest_stall_not_busy_s: the longest time the event loop did not turn while the panel did not show it was busy;
- longest_stall_busy_s: the same while it showed it was busy (progress bar running, buttons disabled, status text).

Run from the repository root after `scripts/setup.sh test`:  .venv/bin/python scripts/benchmark_slicer.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def record_busy_changes(panel) -> list[tuple[float, bool]]:
    """(time, busy) whenever the panel changes its busy state, from now on; the event loop cannot turn in between."""
    marks = []
    setBusy = panel._setBusy

    def recordingSetBusy(busy, message=""):
        setBusy(busy, message)
        marks.append((time.perf_counter(), panel._busy))

    panel._setBusy = recordingSetBusy
    return marks


# size: one scripted Slicer session, step by step, timed in the order a user meets them
def measure(threads: int = 2) -> dict:
    """Run in a fresh process: the first Apply must import onnxruntime and open the model's session itself, as
    after installation."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the session's intra-op threads (lungseg.inference.runtime)
    assert "onnxruntime" not in sys.modules, "onnxruntime already imported: the first Apply would not pay for it"
    sys.path.insert(0, str(REPO / "Testing" / "slicer" / "support"))
    import slicer_app

    slicer, application = slicer_app.start_gui()
    from lungseg.samples import chest_dicom

    from LungSeg import LungSegWidget

    path = chest_dicom()
    if path is None:
        raise SystemExit("pydicom-data is not installed: it ships the chest CR this benchmark uses")
    volume = slicer_app.load_dicom_volume(path)
    widget = LungSegWidget()
    widget.setup()
    panel = widget.panel
    assert "onnxruntime" not in sys.modules, "the panel's setup imported onnxruntime: the first Apply would not"
    panel.logic.getParameterNode().inputVolume = volume
    panel.logic.getParameterNode().device = "cpu"

    stalls = {"busy": 0.0, "idle": 0.0}
    marks = record_busy_changes(panel)

    def apply() -> float:
        """Click Apply from the event loop and return the seconds until the segments are in the scene."""
        marks.clear()
        start = time.perf_counter()
        panel.ui.applyButton.click()
        end = time.perf_counter()
        assert panel.logic.getParameterNode().outputSegmentation.GetSegmentation().GetNumberOfSegments() == 2
        # the event loop stood still from `start` to `end`: split that time by what the panel showed
        edges = [(start, False), *marks, (end, False)]
        for (t0, busy), (t1, _) in zip(edges, edges[1:]):
            key = "busy" if busy else "idle"
            stalls[key] = max(stalls[key], t1 - t0)
        return end - start

    def idle(seconds: float) -> float:
        """Run the emulated event loop for `seconds`; returns its longest gap between two turns."""
        end = time.perf_counter() + seconds
        return slicer_app.spin_like_slicer(application, lambda: time.perf_counter() >= end, timeout=seconds + 5)

    gaps = [idle(0.5)]
    first = apply()
    gaps.append(idle(0.5))
    second = apply()
    gaps.append(idle(1.0))
    gap = max(gaps)
    widget.cleanup()
    import onnxruntime

    return {
        "image": f"{path.name} {volume.GetImageData().GetDimensions()[:2]}",
        "onnxruntime": onnxruntime.__version__,
        "threads": threads,
        "torch_imported": "torch" in sys.modules or "monai" in sys.modules,  # must stay False
        "first_apply_s": round(first, 2),
        "second_apply_s": round(second, 2),
        "longest_stall_not_busy_s": round(max(stalls["idle"], gap), 3),
        "longest_stall_busy_s": round(stalls["busy"], 2),
    }


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
