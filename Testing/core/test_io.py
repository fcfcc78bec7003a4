"""Reading every supported format, keeping the pixel grid, DICOM policy, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import bad_inputs, write_image

from lungseg.io.radiograph import ImageReadError, read_radiograph, write_labelmap
from lungseg.samples import sample_pngs

SPACING = (0.143, 0.139)  # (column, row) in ITK order: deliberately anisotropic
ORIGIN = (-12.5, 30.25)


@pytest.fixture(scope="module")
def gray8() -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(sample_pngs()[0])))


def _variants(gray8):
    gray16 = gray8.astype(np.uint16) * 257
    rgb = np.stack([gray8] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full(gray8.shape + (1,), 255, np.uint8)], axis=-1)
    return {
        "gray8.png": (gray8, False, None),
        "gray16.png": (gray16, False, None),
        "rgb.png": (rgb, True, None),
        "rgba.png": (rgba, True, None),
        "gray.jpg": (gray8, False, None),
        "gray16.tif": (gray16, False, None),
        "rgb.bmp": (rgb, True, None),
        "spaced.nrrd": (gray16, False, SPACING),
        "spaced.mha": (gray8, False, SPACING),
        "spaced.nii.gz": (gray8.astype(np.int16) * 100, False, SPACING),
    }


@pytest.mark.parametrize(
    "name",
    [
        "gray8.png",
        "gray16.png",
        "rgb.png",
        "rgba.png",
        "gray.jpg",
        "gray16.tif",
        "rgb.bmp",
        "spaced.nrrd",
        "spaced.mha",
        "spaced.nii.gz",
    ],
)
def test_formats_read_as_gray_and_labelmaps_round_trip(tmp_path, gray8, name):
    array, vector, spacing = _variants(gray8)[name]
    path = tmp_path / name
    reference = write_image(array, path, vector=vector, spacing=spacing, origin=ORIGIN if spacing else None)
    image = read_radiograph(path)

    assert image.shape == gray8.shape
    corr = np.corrcoef(image.pixels.ravel(), gray8.astype(np.float32).ravel())[0, 1]
    assert corr > (0.99 if name.endswith(".jpg") else 0.9999)
    if spacing:
        assert image.spacing == pytest.approx((spacing[1], spacing[0]))
    else:
        assert image.spacing is None, "a screen format without a stated resolution has unknown spacing"

    label = np.zeros(image.shape, np.uint8)
    label[40:200, 20:110], label[40:200, 140:230] = 1, 2
    for suffix in (".nrrd", ".nii.gz", ".mha", ".png"):
        out = tmp_path / f"label{suffix}"
        write_labelmap(label, image.reference, out)
        back = sitk.ReadImage(str(out))
        assert back.GetSize() == reference.GetSize()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label)
        assert back.GetSpacing() == pytest.approx(reference.GetSpacing(), abs=1e-5)
        if suffix != ".png":  # PNG cannot hold an origin
            assert back.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-5)
            assert back.GetDirection() == pytest.approx(reference.GetDirection())
    assert not list(tmp_path.glob(".*partial*")), "temporary files must not survive a write"


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_float_maps_are_written_on_the_reference_grid(tmp_path, gray8, suffix):
    """`write_float_map`: a (rows, columns) map and a (components, rows, columns) map come back as float32 with
    the same values, in the same order, on the input's grid (size, spacing, origin; a single slice stays 3D)."""
    from lungseg.io.radiograph import write_float_map

    rng = np.random.default_rng(0)
    rows, columns = 40, 70  # not square: a transpose cannot pass
    source = tmp_path / f"source{suffix}"
    write_image(gray8[:rows, :columns].astype(np.int16), source, spacing=SPACING, origin=ORIGIN)
    single = tmp_path / "single.nrrd"
    volume = sitk.GetImageFromArray(gray8[None, :rows, :columns].astype(np.int16))
    volume.SetSpacing((*SPACING, 2.5))
    sitk.WriteImage(volume, str(single))
    values = rng.random((rows, columns)).astype(np.float32)
    components = rng.random((3, rows, columns)).astype(np.float64)  # written as float32
    # ITK reads a NIfTI with one slice back as 2D, so the 3D single-slice case is checked in NRRD and MHA only
    for reference_path in (source, single) if suffix != ".nii.gz" else (source,):
        reference = sitk.ReadImage(str(reference_path))
        grid = read_radiograph(reference_path).reference
        for name, array in (("map", values), ("probabilities", components)):
            path = tmp_path / f"{reference_path.stem.split('.')[0]}_{name}{suffix}"
            write_float_map(array, grid, path)
            image = sitk.ReadImage(str(path))
            assert image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkVectorFloat32), path.name
            assert image.GetSize() == reference.GetSize() and image.GetDimension() == reference.GetDimension()
            assert image.GetSpacing() == pytest.approx(reference.GetSpacing())
            assert image.GetOrigin() == pytest.approx(reference.GetOrigin())
            back = sitk.GetArrayFromImage(image).reshape(rows, columns, -1)
            expected = np.moveaxis(array, 0, -1) if array.ndim == 3 else array[..., None]
            assert back.dtype == np.float32 and image.GetNumberOfComponentsPerPixel() == expected.shape[-1]
            np.testing.assert_array_equal(back, expected.astype(np.float32))


def test_single_slice_volume_keeps_its_third_axis(tmp_path, gray8):
    volume = gray8[None].astype(np.int16)
    path = tmp_path / "slice.nrrd"
    direction = (1, 0, 0, 0, -1, 0, 0, 0, 1)
    reference = write_image(volume, path, spacing=(0.2, 0.3, 2.5), origin=(1.0, 2.0, 3.0), direction=direction)
    image = read_radiograph(path)
    assert image.shape == gray8.shape and image.spacing == pytest.approx((0.3, 0.2))

    out = tmp_path / "label.nrrd"
    write_labelmap(np.ones(image.shape, np.uint8), image.reference, out)
    back = sitk.ReadImage(str(out))
    assert back.GetDimension() == 3 and back.GetSize() == reference.GetSize()
    assert back.GetSpacing() == pytest.approx(reference.GetSpacing())
    assert back.GetOrigin() == pytest.approx(reference.GetOrigin())
    assert back.GetDirection() == pytest.approx(direction)


def test_nibabel_nifti_reads_with_its_grid(tmp_path, gray8):
    import nibabel as nib

    affine = np.diag([0.15, 0.15, 1.0, 1.0])
    nib.save(nib.Nifti1Image(gray8.T.astype(np.int16), affine), tmp_path / "nib.nii.gz")
    image = read_radiograph(tmp_path / "nib.nii.gz")
    assert image.shape == gray8.shape
    assert image.spacing == pytest.approx((0.15, 0.15))
    out = tmp_path / "label.nii.gz"
    write_labelmap(np.zeros(image.shape, np.uint8), image.reference, out)
    assert nib.load(out).affine == pytest.approx(nib.load(tmp_path / "nib.nii.gz").affine)


def test_monochrome1_dicom_is_inverted_and_bogus_spacing_is_unknown(chest_dicom):
    raw = pydicom.dcmread(chest_dicom)
    assert raw.PhotometricInterpretation == "MONOCHROME1"
    image = read_radiograph(chest_dicom)
    assert image.photometric == "MONOCHROME1"
    assert image.shape == raw.pixel_array.shape
    corr = np.corrcoef(image.pixels.ravel()[::97], raw.pixel_array.astype(np.float32).ravel()[::97])[0, 1]
    assert corr < -0.999, "MONOCHROME1 must come out inverted (air dark)"
    assert [float(v) for v in raw.PixelSpacing] == [0.0, 0.0]
    assert image.spacing is None and image.pixel_area_mm2 is None


def test_dicom_spacing_from_imager_pixel_spacing_and_monochrome2_not_inverted(tmp_path, chest_dicom):
    ds = pydicom.dcmread(chest_dicom)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.175, 0.168]
    ds.PhotometricInterpretation = "MONOCHROME2"
    path = tmp_path / "mono2.dcm"
    ds.save_as(path)
    image = read_radiograph(path)
    assert image.spacing == pytest.approx((0.175, 0.168))
    corr = np.corrcoef(image.pixels.ravel()[::97], ds.pixel_array.astype(np.float32).ravel()[::97])[0, 1]
    assert corr > 0.999


def test_bad_inputs_raise_clear_errors_naming_the_file(tmp_path, gray8, chest_dicom):
    for name, problem in bad_inputs(tmp_path, gray8, chest_dicom).items():
        with pytest.raises(ImageReadError) as err:
            read_radiograph(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
        assert problem in err.value.problem, (name, err.value.problem)
