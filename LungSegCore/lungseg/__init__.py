"""LungSeg: right and left lung segmentation on 2D chest radiographs.

The public API is importable from here, and imported on first use (PEP 562), so that `import lungseg` stays light:
the Slicer panel imports it before any dependency is installed.

    import lungseg

    image = lungseg.read_radiograph("chest.dcm")
    prediction = lungseg.Segmenter("unet").segment(image.pixels)  # 0 background, 1 right lung, 2 left lung
    lungseg.write_labelmap(prediction.label, image.reference, "chest-lungs.nrrd")

The package, by job: `io` (reading and writing), `models` (cards and shipped weights), `inference` (one radiograph
to its labelmap), `batch` (`lungseg segment`), `qc` (quality control), `evaluation`, `nets` and `training`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {  # public name -> the module that defines it
    "LungSegError": "lungseg.errors",
    "Radiograph": "lungseg.io.radiograph",
    "read_radiograph": "lungseg.io.radiograph",
    "write_labelmap": "lungseg.io.radiograph",
    "list_models": "lungseg.models.cards",
    "Segmenter": "lungseg.inference.segmenter",
    "assess": "lungseg.qc.model",
    "segment_inputs": "lungseg.batch.run",
    "evaluate": "lungseg.evaluation.evaluate",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lungseg' has no attribute '{name}'")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
