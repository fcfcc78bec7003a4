"""Reading radiographs and writing labelmaps on the input's pixel grid, through SimpleITK (and pydicom for DICOM tags).

- Formats: PNG, JPEG, TIFF, BMP (8/16-bit, gray, RGB, RGBA), DICOM CR/DX, NRRD, NIfTI, MHA (2D or single-slice 3D).
- DICOM: ITK applies rescale slope/intercept and inverts MONOCHROME1, so air is dark for every input.
- Spacing is "known" only where the file states it: DICOM PixelSpacing or ImagerPixelSpacing above zero, any spacing in
  NRRD/NIfTI/MHA, and a PNG/TIFF/JPEG/BMP resolution that is neither ITK's 1.0 default nor a screen DPI.
- Outputs keep the input's size, spacing, origin and direction (and its third axis for single-slice volumes).
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nrrd", ".nhdr", ".nii",
                  ".nii.gz", ".mha", ".mhd")
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
OUTPUT_FORMATS = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "mha": ".mha", "png": ".png"}
MIN_SIDE = 32
# ITK's value for a PNG without a pHYs chunk, and the resolutions of 72, 96 and 300 DPI: not a detector pitch.
SCREEN_SPACINGS_MM = (1.0, 25.4 / 72, 25.4 / 96, 25.4 / 300)


class ImageReadError(ValueError):
    """An input that cannot be segmented; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


@dataclass(frozen=True)
class Grid:
    """The input's pixel grid (2D, or 3D with one slice): what every output is written on. Small and picklable."""
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def image(self, array: np.ndarray, is_vector: bool = False) -> sitk.Image:
        """A SimpleITK image of (rows, columns[, components]) values on this grid."""
        if len(self.size) == 3:
            array = array[None]
        image = sitk.GetImageFromArray(array, isVector=is_vector)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass
class Radiograph:
    path: Path
    pixels: np.ndarray             # (rows, columns) float32 grayscale, air dark
    reference: Grid                # the input grid
    spacing: tuple[float, float] | None  # (row, column) mm, None when unknown
    photometric: str = ""          # DICOM PhotometricInterpretation, else ""
    # DICOM PatientOrientation says the image is stored mirrored (columns run toward the patient's right) or
    # upside down (rows run toward the head): (flip rows, flip columns) that bring it to the standard display.
    display_flips: tuple[bool, bool] = (False, False)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the grid; valid also where the pixels were dropped after preprocessing."""
        return self.reference.size[1], self.reference.size[0]

    @property
    def pixel_area_mm2(self) -> float | None:
        return None if self.spacing is None else self.spacing[0] * self.spacing[1]


def reorient(array: np.ndarray | None, flips: tuple[bool, bool]) -> np.ndarray | None:
    """Flip the last two axes (rows, columns) as `flips` says. A flip is its own inverse, so the same call takes
    stored pixels to the standard display and a labelmap made there back to the stored grid."""
    if array is None or not any(flips):
        return array
    rows, cols = -1 if flips[0] else 1, -1 if flips[1] else 1
    return np.ascontiguousarray(array[..., ::rows, ::cols])


def suffix_of(path: Path | str) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: Path | str) -> str:
    name = Path(path).name
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def is_dicom(path: Path) -> bool:
    if suffix_of(path) in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_pixel_spacing(ds) -> tuple[float, float] | None:
    """(row, column) mm from PixelSpacing, else ImagerPixelSpacing; None when absent or not above zero."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            rows, cols = (float(v) for v in ds.get(tag))
        except (TypeError, ValueError):
            continue
        if rows > 0 and cols > 0:
            return rows, cols
    return None


def stated_spacing(row: float, col: float, path: str | Path) -> tuple[float, float] | None:
    """The spacing of a non-DICOM file if it is a real pixel size: any spacing of NRRD/NIfTI/MHA, and for
    PNG/TIFF/JPEG/BMP one that is neither ITK's 1.0 default nor a screen resolution."""
    if row <= 0 or col <= 0:
        return None
    if suffix_of(path) in VOLUME_SUFFIXES:
        return row, col
    screen = any(abs(row - v) < 1e-4 and abs(col - v) < 1e-4 for v in SCREEN_SPACINGS_MM)
    return None if screen else (row, col)


def display_flips(orientation) -> tuple[bool, bool]:
    """From PatientOrientation (column direction, row direction), e.g. ['L', 'F'] for a standard PA view."""
    try:
        columns, rows = (str(v).upper() for v in orientation)
    except (TypeError, ValueError):
        return False, False
    return rows.startswith("H"), columns.startswith("R")


def _dicom_header(path: Path) -> tuple[tuple[float, float] | None, str, tuple[bool, bool]]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types for broken headers
        raise ImageReadError(path, f"not a readable DICOM file ({exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        # stop_before_pixels stops at the tag, so check the full file only when the header lacks it
        full = pydicom.dcmread(str(path), force=True)
        if "PixelData" not in full:
            raise ImageReadError(path, "DICOM file has no pixel data (PixelData element missing)")
    return dicom_pixel_spacing(ds), str(ds.get("PhotometricInterpretation", "")), \
        display_flips(ds.get("PatientOrientation"))


def _to_gray(image: sitk.Image, path: Path) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    components = image.GetNumberOfComponentsPerPixel()
    if components in (3, 4):  # RGB or RGBA: ITU-R BT.601 luma, alpha dropped
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif components == 2:  # gray + alpha
        array = array[..., 0]
    elif components != 1:
        raise ImageReadError(path, f"unsupported pixel type with {components} components")
    return array.astype(np.float32, copy=False)


def read_radiograph(path: str | Path) -> Radiograph:
    """Read one radiograph; raises ImageReadError with the file and the problem for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")

    spacing, photometric, flips = None, "", (False, False)
    dicom = is_dicom(path)
    if dicom:
        spacing, photometric, flips = _dicom_header(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        if dicom:
            reader.SetImageIO("GDCMImageIO")
        image = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" not in line and line.strip()), first[-1] if first else "")
        raise ImageReadError(path, f"cannot be read as an image (corrupt, truncated or not an image format): "
                                   f"{detail.strip()[:200]}") from exc

    size = image.GetSize()
    if image.GetDimension() == 3:
        if size[2] != 1:
            raise ImageReadError(path, f"is a 3D volume of {size[2]} slices ({size[0]}x{size[1]}x{size[2]}); "
                                       "LungSeg segments 2D radiographs")
    elif image.GetDimension() != 2:
        raise ImageReadError(path, f"has {image.GetDimension()} dimensions; expected a 2D radiograph")
    if min(size[:2]) < MIN_SIDE:
        raise ImageReadError(path, f"is too small ({size[0]}x{size[1]} pixels); a radiograph needs at least "
                                   f"{MIN_SIDE} pixels per side")

    pixels = _to_gray(image, path)
    if pixels.ndim == 3:
        pixels = pixels[0]
    finite = np.isfinite(pixels)
    if not finite.any():
        raise ImageReadError(path, "has no finite pixel values (all NaN or infinite)")
    if not finite.all():
        pixels = np.where(finite, pixels, pixels[finite].min()).astype(np.float32)
    if pixels.min() == pixels.max():
        raise ImageReadError(path, f"has no contrast (every pixel is {pixels.min():g})")

    if not dicom:
        spacing = stated_spacing(float(image.GetSpacing()[1]), float(image.GetSpacing()[0]), path)
    return Radiograph(path=path, pixels=pixels, reference=Grid.of(image), spacing=spacing, photometric=photometric,
                      display_flips=flips)


def read_path_list(list_file: Path) -> list[Path]:
    """A text file of image paths, one per line (# comments); relative paths are relative to the list's folder."""
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


def list_inputs(inputs: list[str | Path], recursive: bool = False) -> list[Path]:
    """Expand files, folders and `.txt` lists of paths into a de-duplicated list of candidate image files."""
    found, seen = [], set()
    for item in inputs:
        item = Path(item)
        if item.is_file() and item.suffix.lower() == ".txt":
            files = read_path_list(item)
        elif item.is_dir() and suffix_of(item) not in IMAGE_SUFFIXES:
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in item.glob(pattern)
                           if not p.name.startswith(".") and (suffix_of(p) in IMAGE_SUFFIXES or
                                                              (p.is_file() and is_dicom(p))))
        else:
            files = [item]
        for f in files:
            key = os.path.abspath(f)  # not resolve(): two links to one file are two inputs
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found


def _on_grid(array: np.ndarray, reference: Grid | sitk.Image, is_vector: bool = False) -> sitk.Image:
    grid = reference if isinstance(reference, Grid) else Grid.of(reference)
    return grid.image(array, is_vector)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary name beside `path` (same suffix); rename it to `path` only if the block succeeds.

    A run killed at any moment leaves either the old file, the complete new one, or a hidden `.partial` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix_of(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def write_atomic_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(rows: list[dict], fields: list[str], path: str | Path) -> None:
    """A CSV of `rows` (keys outside `fields` left out), written atomically."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic_text(buffer.getvalue(), path)


def write_labelmap(label: np.ndarray, reference: Grid | sitk.Image, path: str | Path) -> None:
    """Write a uint8 (rows, columns) labelmap on the reference grid; the format follows the file name."""
    write_atomic(_on_grid(label.astype(np.uint8), reference), Path(path))


def write_float_map(values: np.ndarray, reference: Grid | sitk.Image, path: str | Path) -> None:
    """Write (rows, columns) or (components, rows, columns) float32 values on the reference grid."""
    vector = values.ndim == 3
    array = np.moveaxis(values, 0, -1) if vector else values
    write_atomic(_on_grid(np.ascontiguousarray(array, dtype=np.float32), reference, vector), Path(path))


def display_uint8(pixels: np.ndarray) -> np.ndarray:
    low, high = np.percentile(pixels, (0.5, 99.5))
    return (np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


# RGB per label: right lung green-blue, left lung orange (distinct for common colour blindness)
LABEL_COLOURS = {1: (0, 158, 115), 2: (230, 159, 0)}


def overlay_rgb(pixels: np.ndarray, label: np.ndarray, opacity: float = 0.35) -> np.ndarray:
    """(rows, columns, 3) uint8: the radiograph with each lung filled lightly and outlined in its colour."""
    rgb = np.repeat(display_uint8(pixels)[..., None], 3, axis=2).astype(np.float32)
    lab = sitk.GetImageFromArray(label.astype(np.uint8))
    contour = sitk.LabelContour(lab, fullyConnected=True, backgroundValue=0)
    thickness = max(1, round(max(label.shape) / 400))
    if thickness > 1:
        contour = sitk.GrayscaleDilate(contour, [thickness - 1] * 2)
    edge = sitk.GetArrayFromImage(contour)
    for value, colour in LABEL_COLOURS.items():
        colour = np.array(colour, dtype=np.float32)
        fill = label == value
        rgb[fill] = (1 - opacity) * rgb[fill] + opacity * colour
        rgb[edge == value] = colour
    return rgb.astype(np.uint8)


def write_overlay(pixels: np.ndarray, label: np.ndarray, path: str | Path, opacity: float = 0.35) -> None:
    write_atomic(sitk.GetImageFromArray(overlay_rgb(pixels, label, opacity), isVector=True), Path(path))


def write_case_sheet(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | Path,
                     height: int = 256) -> None:
    """PNG with one row per case: the radiograph, the reference and the prediction (labels 0/1/2), each scaled to
    `height` rows; the order of `cases` is kept (worst first)."""
    from skimage.transform import resize

    rows = []
    for pixels, truth, prediction in cases:
        width = max(1, round(pixels.shape[1] * height / pixels.shape[0]))
        small = resize(pixels.astype(np.float32), (height, width), anti_aliasing=True, preserve_range=True)
        labels = [resize(x, (height, width), order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8)
                  for x in (truth, prediction)]
        gray = np.repeat(display_uint8(small)[..., None], 3, axis=2)
        tiles = [gray, overlay_rgb(small, labels[0]), overlay_rgb(small, labels[1])]
        gap = np.full((height, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    write_atomic(sitk.GetImageFromArray(np.concatenate(rows, axis=0), isVector=True), Path(path))

