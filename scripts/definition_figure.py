#!/usr/bin/env python
"""Side-by-side overlays of the best lung-field and full-extent models on one radiograph, for the README.

.venv/bin/python scripts/definition_figure.py [IMAGE] [-o LungSegCore/docs/lung-definitions.png]
"""

import argparse

import numpy as np
import SimpleITK as sitk

from lungseg.batch.overlay import overlay_rgb
from lungseg.inference.preprocess import resize
from lungseg.inference.segmenter import Segmenter
from lungseg.io.radiograph import read_radiograph
from lungseg.models.cards import best_model
from lungseg.samples import chest_dicom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", nargs="?", default=str(chest_dicom()))
    parser.add_argument("-o", "--output", default="LungSegCore/docs/lung-definitions.png")
    parser.add_argument("--width", type=int, default=420, help="width of each panel in pixels")
    args = parser.parse_args()
    image = read_radiograph(args.image)
    panels = []
    for definition in ("lung-fields", "full-extent"):
        label = Segmenter(best_model(definition), "cpu").segment(image.pixels, display_flips=image.display_flips).label
        rgb = overlay_rgb(image.pixels, label)
        size = (round(rgb.shape[0] * args.width / rgb.shape[1]), args.width)
        channels = resize(np.moveaxis(rgb, -1, 0).astype(np.float32), size, antialias=True)
        panels.append(np.moveaxis(np.clip(np.rint(channels), 0, 255).astype(np.uint8), 0, -1))
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(np.concatenate([panels[0], gap, panels[1]], 1), isVector=True), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
