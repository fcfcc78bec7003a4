"""Reading radiographs and writing labelmaps on the input's pixel grid, through SimpleITK (and pydicom for DICOM tags).

- Formats: PNG, JPEG, TIFF, BMP (8/16-bit, gray, RGB, RGBA), DICOM CR/DX, NRRD, NIfTI, MHA (2D or single-slice 3D).
- DICOM: ITK applies rescale slope/intercept and inverts MONOCHROME1, so air is dark for every input.
- Spacing is "known" only where the file states it: DICOM PixelSpacing or ImagerPixelSpacing above zero, any spacing in
  NRRD/NIfTI/MHA, and a PNG/TIFF/JPEG/BMP resolution that is neither ITK's 1.0 default nor a screen DPI.
- Outputs keep the input's size, spacing, origin and direction (and its third axis for single-slice volumes).
- Size: the header's pixel count is checked against a limit before any pixel is decoded (a 1.5 MB PNG can declare
  40000x40000 pixels, 1.6 GB once decoded). DICOM objects that hold no image (reports, presentation states, DICOMDIR,
  segmentations) raise `NotAnImageError`, which a batch records as skipped rather than failed.

Finding inputs and atomic writing are `files.py`; overlays and case sheets are `overlay.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import LungSegError
from .files import atomic_path, is_dicom, raise_if_out_of_space, suffix_of

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
OUTPUT_FORMATS = {
    "nrrd": ".nrrd",
    "nii.gz": ".nii.gz",
    "mha": ".mha",
    "png": ".png",
    "dicom-seg": ".seg.dcm",
}  # DICOM inputs only, written by dicomseg.py
MIN_SIDE = 32
# ITK's value for a PNG without a pHYs chunk, and the resolutions of 72, 96 and 300 DPI: not a detector pitch.
SCREEN_SPACINGS_MM = (1.0, 25.4 / 72, 25.4 / 96, 25.4 / 300)
# The largest radiographs are about 20 Mpx (a 43x43 cm detector at 100 um is 4300x4300; a 35x43 cm plate at 87.5 um is
# 4020x4892); mammograms reach 23 Mpx and stitched long-leg or spine images about 30 Mpx. 50 Mpx admits all of them,
# and keeps the float32 working copy of one image at 200 MB.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageReadError(LungSegError):
    """An input that cannot be segmented; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


class NotAnImageError(ImageReadError):
    """A DICOM object that holds no image (a structured report, a presentation state, a DICOMDIR, a segmentation):
    nothing to segment, so a batch skips it instead of counting a failure."""


@dataclass(frozen=True)
class Grid:
    """The input's pixel grid (2D, or 3D with one slice): what every output is written on. Small and picklable."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
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
    pixels: np.ndarray | None  # (rows, columns) float32 grayscale, air dark
    reference: Grid  # the input grid
    spacing: tuple[float, float] | None  # (row, column) mm, None when unknown
    photometric: str = ""  # DICOM PhotometricInterpretation, else ""
    # DICOM PatientOrientation says the image is stored mirrored (columns run toward the patient's right) or
    # upside down (rows run toward the head): (flip rows, flip columns) that bring it to the standard display.
    display_flips: tuple[bool, bool] = (False, False)
    orientation_stated: bool = False  # PatientOrientation says how a frontal film lies: it wins over the pixels

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


def patient_axes(orientation) -> tuple[str, str]:
    """(column direction, row direction) of PatientOrientation, upper case, e.g. ("L", "F") for a standard PA view;
    ("", "") when absent or malformed."""
    try:
        columns, rows = (str(v).upper() for v in orientation)
    except (TypeError, ValueError):
        return "", ""
    return columns, rows


def states_orientation(orientation) -> bool:
    """Whether PatientOrientation gives the frontal axes: columns toward the patient's left or right, rows toward the
    head or the feet (what `display_flips` reads)."""
    columns, rows = patient_axes(orientation)
    return columns[:1] in ("L", "R") and rows[:1] in ("H", "F")


def display_flips(orientation) -> tuple[bool, bool]:
    """(flip rows, flip columns) from PatientOrientation, e.g. ['L', 'F'] for a standard PA view."""
    columns, rows = patient_axes(orientation)
    return rows.startswith("H"), columns.startswith("R")


def non_image_object(ds) -> str | None:
    """The name of the SOP class of a DICOM object that holds no image (e.g. "Basic Text SR Storage", "Media Storage
    Directory Storage" for a DICOMDIR, "Segmentation Storage"); None for an image, or a SOP class pydicom does not
    know."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    if not uid:
        return None
    uid = UID(str(uid))
    return uid.name if uid.type == "SOP Class" and "Image Storage" not in uid.name else None


def check_pixel_count(
    path: Path | str, columns: int, rows: int, frames: int = 1, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> None:
    """ImageReadError when a header declares more than `max_pixels` pixels (None: no limit): before decoding."""
    count = int(columns) * int(rows) * max(1, int(frames))
    if max_pixels is not None and count > max_pixels:
        size = f"{columns}x{rows}" + (f"x{frames} frames" if frames > 1 else "")
        raise ImageReadError(
            path,
            f"declares {size} pixels ({count / 1e6:.1f} Mpx), above the limit of "
            f"{max_pixels / 1e6:g} Mpx; refused before decoding (a decompression bomb or not a "
            "radiograph; raise --max-pixels if it is a real image)",
        )


def image_dicom_header(path: Path | str):
    """The header (no pixels) of a DICOM file that holds an image; NotAnImageError for a DICOM object that holds
    none (a report, a DICOMDIR, a SEG), which a batch skips, and ImageReadError for an unreadable file."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types for broken headers
        raise ImageReadError(path, f"not a readable DICOM file ({exc})") from exc
    kind = non_image_object(ds)
    if kind:
        raise NotAnImageError(path, f"not an image: a DICOM {kind} object")
    return ds


def dicom_header(
    path: Path, max_pixels: int | None = None
) -> tuple[tuple[float, float] | None, str, tuple[bool, bool], bool]:
    """(spacing or None, PhotometricInterpretation, display flips, whether PatientOrientation states the film's
    orientation) of a DICOM file; NotAnImageError for an object that
    holds no image, ImageReadError for a file that is no readable DICOM image or declares more than `max_pixels`."""
    import pydicom

    ds = image_dicom_header(path)
    try:
        rows, columns, frames = int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        rows = columns = frames = 0
    check_pixel_count(path, columns, rows, frames, max_pixels)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        # stop_before_pixels stops at the tag, so check the full file only when the header lacks it
        full = pydicom.dcmread(str(path), force=True)
        if "PixelData" not in full:
            raise ImageReadError(path, "DICOM file has no pixel data (PixelData element missing)")
    return (
        dicom_pixel_spacing(ds),
        str(ds.get("PhotometricInterpretation", "")),
        display_flips(ds.get("PatientOrientation")),
        states_orientation(ds.get("PatientOrientation")),
    )


def gray_pixels(array: np.ndarray, components: int, path: Path | str) -> np.ndarray:
    """float32 gray values of an array whose last axis holds `components` values per pixel (when above 1)."""
    if components in (3, 4):  # RGB or RGBA: ITU-R BT.601 luma, alpha dropped
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif components == 2:  # gray + alpha
        array = array[..., 0]
    elif components != 1:
        raise ImageReadError(path, f"unsupported pixel type with {components} components")
    return array.astype(np.float32, copy=False)


def radiograph_from_array(
    array: np.ndarray,
    path: Path | str,
    components: int = 1,
    reference: Grid | None = None,
    spacing: tuple[float, float] | None = None,
    photometric: str = "",
    display_flips: tuple[bool, bool] = (False, False),
    orientation_stated: bool = False,
) -> Radiograph:
    """Check pixels and make them a model-ready radiograph: the one place where this happens, for files
    (`read_radiograph`) and for arrays that another program loaded (the Slicer module).

    Args:
        array: (rows, columns) or (1, rows, columns), with a trailing axis of `components` values when above 1,
            with air dark (MONOCHROME1 already inverted).
        path: the file or volume name that error messages give.
        components: values per pixel: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA.
        reference: the grid outputs are written on; by default a unit grid of the array's shape.
        spacing: (row, column) pixel size in mm when it is known to be real, else None.
        photometric: DICOM PhotometricInterpretation, or "".
        display_flips: (flip rows, flip columns) that bring the stored pixels to the standard display.
        orientation_stated: the file's header states how the film lies (then the pixels do not overrule it).

    Returns:
        The Radiograph, with non-finite pixels set to the lowest finite value.

    Raises:
        ImageReadError: a volume of several slices, a tiny image, no finite pixels, or no contrast.
    """
    pixels = checked_pixels(gray_pixels(np.asarray(array), components, path), path)
    if reference is None:
        rows, columns = pixels.shape
        reference = Grid((columns, rows), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    return Radiograph(
        path=Path(path),
        pixels=pixels,
        reference=reference,
        spacing=spacing,
        photometric=photometric,
        display_flips=display_flips,
        orientation_stated=orientation_stated,
    )


def checked_pixels(pixels: np.ndarray, path: Path | str) -> np.ndarray:
    """(rows, columns) gray pixels, non-finite values set to the lowest finite one; ImageReadError for a volume of
    several slices, a tiny image, no finite pixels or no contrast."""
    if pixels.ndim == 3:
        if pixels.shape[0] != 1:
            depth, rows, columns = pixels.shape
            raise ImageReadError(
                path, f"is a 3D volume of {depth} slices ({columns}x{rows}x{depth}); LungSeg segments 2D radiographs"
            )
        pixels = pixels[0]
    elif pixels.ndim != 2:
        raise ImageReadError(path, f"has {pixels.ndim} dimensions; expected a 2D radiograph")
    rows, columns = pixels.shape
    if min(rows, columns) < MIN_SIDE:
        raise ImageReadError(
            path, f"is too small ({columns}x{rows} pixels); a radiograph needs at least {MIN_SIDE} pixels per side"
        )
    finite = np.isfinite(pixels)
    if not finite.any():
        raise ImageReadError(path, "has no finite pixel values (all NaN or infinite)")
    if not finite.all():
        pixels = np.where(finite, pixels, pixels[finite].min()).astype(np.float32)
    if pixels.min() == pixels.max():
        raise ImageReadError(path, f"has no contrast (every pixel is {pixels.min():g})")
    return pixels


def read_radiograph(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Radiograph:
    """Read one radiograph; raises ImageReadError with the file and the problem for anything unusable, and for an
    image whose header declares more than `max_pixels` pixels (None: no limit), before decoding it."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")

    spacing, photometric, flips, stated = None, "", (False, False), False
    dicom = is_dicom(path)
    if dicom:
        spacing, photometric, flips, stated = dicom_header(path, max_pixels)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        if dicom:
            reader.SetImageIO("GDCMImageIO")
        reader.ReadImageInformation()  # the header only: the size is checked before any pixel is decoded
        size = reader.GetSize()
        check_pixel_count(path, size[0], size[1], int(np.prod(size[2:])), max_pixels)
        image = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" not in line and line.strip()), first[-1] if first else "")
        raise ImageReadError(
            path, f"cannot be read as an image (corrupt, truncated or not an image format): {detail.strip()[:200]}"
        ) from exc

    if image.GetDimension() not in (2, 3):
        raise ImageReadError(path, f"has {image.GetDimension()} dimensions; expected a 2D radiograph")
    if not dicom:
        spacing = stated_spacing(float(image.GetSpacing()[1]), float(image.GetSpacing()[0]), path)
    return radiograph_from_array(
        sitk.GetArrayFromImage(image),
        path,
        image.GetNumberOfComponentsPerPixel(),
        Grid.of(image),
        spacing,
        photometric,
        flips,
        stated,
    )


def inverted_against_file(pixels: np.ndarray, path: Path | str) -> bool | None:
    """Whether `pixels`, an image that another reader loaded from the DICOM file `path`, have the opposite
    polarity of LungSeg's own reading of that file (air dark, MONOCHROME1 inverted). Readers differ here: Slicer's
    GDCM approach inverts MONOCHROME1 as ITK does, its DCMTK fallback does not. None when the two cannot be
    compared (the file is unreadable or has another shape)."""
    try:
        reference = read_radiograph(path).pixels
    except ImageReadError:
        return None
    if reference.shape != pixels.shape:
        return None
    step = max(1, reference.size // 250_000)  # a subsample decides the sign as well as every pixel
    correlation = np.corrcoef(pixels.ravel()[::step], reference.ravel()[::step])[0, 1]
    return bool(correlation < 0)


def _on_grid(array: np.ndarray, reference: Grid | sitk.Image, is_vector: bool = False) -> sitk.Image:
    grid = reference if isinstance(reference, Grid) else Grid.of(reference)
    return grid.image(array, is_vector)


def write_atomic(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:  # ITK's message may lack the errno: a full disk must still read as one
            raise_if_out_of_space(tmp, exc)
            raise


def write_labelmap(label: np.ndarray, reference: Grid | sitk.Image, path: str | Path) -> None:
    """Write a uint8 (rows, columns) labelmap on the reference grid; the format follows the file name."""
    write_atomic(_on_grid(label.astype(np.uint8), reference), Path(path))


def write_float_map(values: np.ndarray, reference: Grid | sitk.Image, path: str | Path) -> None:
    """Write (rows, columns) or (components, rows, columns) float32 values on the reference grid."""
    vector = values.ndim == 3
    array = np.moveaxis(values, 0, -1) if vector else values
    write_atomic(_on_grid(np.ascontiguousarray(array, dtype=np.float32), reference, vector), Path(path))
