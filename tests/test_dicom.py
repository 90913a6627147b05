"""DICOM input (the `dicom` extra): pixel values against the DICOM formulas, the sources, patient
grouping, refusals, and the core install without pydicom.

Files come from pydicom's own test data shipped in its wheel (`get_testdata_file(..., download=False)`,
never the ones it would download) and from datasets the tests write with pydicom.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import vsi

pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from vision_si.config import DataConfig, DicomConfig, SplitConfig, config_from_dict  # noqa: E402
from vision_si.data import load_csv, load_imagefolder, load_images, make_splits  # noqa: E402
from vision_si.data.decode import decode_image  # noqa: E402
from vision_si.data.images import cache_folder  # noqa: E402
from vision_si.data.splits import split_groups  # noqa: E402
from vision_si.errors import ConfigError, DataError  # noqa: E402


def shipped(name: str) -> str:
    """A test file inside pydicom's wheel; one it would have to download is a test bug, not a skip."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped with pydicom"
    return path


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12,
                patient: str | None = "P1", slope: float | None = None, intercept: float | None = None,
                center: float | None = None, width: float | None = None, preamble: bool = True) -> Path:
    """A single-frame DICOM file with these stored values (pydicom sets Rows, Columns, bits, samples)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    if patient is not None:
        ds.PatientID = patient
    ds.set_pixel_data(pixels, photometric, bits)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def ramp(shape=(8, 8), top=4095, dtype=np.uint16) -> np.ndarray:
    return np.linspace(0, top, int(np.prod(shape))).round().astype(dtype).reshape(shape)


def linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), output in [0, 1]."""
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


# --------------------------------------------------------------------------- pixel values


def test_12_bit_rescale_and_file_window_follow_the_dicom_formulas(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=2.0, intercept=-1024.0, center=500.0, width=2000.0)
    got = decode_image(path)[:, :, 0]
    hu = stored * 2.0 - 1024.0  # modality transform first
    np.testing.assert_allclose(got, linear_window(hu, 500.0, 2000.0), atol=1e-6)
    assert got.min() == 0.0 and got.max() == 1.0  # the window clips both ends of this ramp


def test_without_a_window_the_stored_bit_range_is_the_scale(tmp_path):
    stored = ramp(top=3000)
    got = decode_image(write_dicom(tmp_path / "a.dcm", stored, bits=12))[:, :, 0]
    np.testing.assert_allclose(got, stored / 4095.0, atol=1e-6)  # 12 bits hold 0..4095, not 0..3000
    assert decode_image(write_dicom(tmp_path / "b.dcm", stored, bits=12),
                        dicom=DicomConfig("minmax")).max() == 1.0


def test_manual_window_from_the_config_replaces_the_files(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0, center=2000.0, width=100.0)
    got = decode_image(path, dicom=DicomConfig("manual", center=40.0, width=400.0))[:, :, 0]
    np.testing.assert_allclose(got, linear_window(stored - 1024.0, 40.0, 400.0), atol=1e-6)
    bits = decode_image(path, dicom=DicomConfig("bits"))[:, :, 0]
    np.testing.assert_allclose(bits, stored / 4095.0, atol=1e-6)  # rescale moves the range with the values


def test_a_voi_lut_in_the_file_is_applied(tmp_path):
    path = write_dicom(tmp_path / "lut.dcm", np.array([[0, 1], [2, 3]], np.uint16), bits=12)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]  # 4 entries, first stored value 0, 8-bit output
    item.add_new("LUTData", "US", [0, 10, 200, 255])
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    got = decode_image(path)[:, :, 0]
    np.testing.assert_allclose(got, np.array([[0, 10], [200, 255]]) / 255.0, atol=1e-6)


def test_monochrome1_is_inverted_to_monochrome2(tmp_path):
    stored = ramp()
    m2 = decode_image(write_dicom(tmp_path / "m2.dcm", stored, center=1000.0, width=1500.0))
    m1 = decode_image(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", center=1000.0,
                                  width=1500.0))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0, 0] == 1.0  # the lowest stored value is white in MONOCHROME1


def test_16_bit_signed_shipped_file_and_its_compressed_copy_decode_alike():
    plain = decode_image(shipped("MR_small.dcm"))
    rle = decode_image(shipped("MR_small_RLE.dcm"))  # RLE Lossless: pydicom decodes it on its own
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    assert plain.shape == (64, 64, 1) and plain.dtype == np.float32
    np.testing.assert_array_equal(plain, rle)
    want = linear_window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(plain[:, :, 0], want, atol=1e-6)


def test_rgb_and_ybr_files_are_three_channels_scaled_by_their_bits():
    rgb = decode_image(shipped("SC_rgb_small_odd.dcm"))
    ds = pydicom.dcmread(shipped("SC_rgb_small_odd.dcm"))
    np.testing.assert_allclose(rgb, ds.pixel_array / 255.0, atol=1e-6)
    path = shipped("SC_ybr_full_422_uncompressed.dcm")
    ybr = decode_image(path)
    assert ybr.shape == (100, 100, 3)
    # YBR is converted to RGB, not read as if its luma and chroma planes were red, green and blue
    raw = pydicom.pixels.pixel_array(path, raw=True) / 255.0
    assert np.abs(ybr - raw).max() > 0.2
    np.testing.assert_allclose(ybr, pydicom.pixels.convert_color_space(
        pydicom.pixels.pixel_array(path, raw=True), "YBR_FULL", "RGB") / 255.0, atol=1e-6)
    gray = decode_image(shipped("SC_rgb_small_odd.dcm"), channels=1)
    assert gray.shape == (3, 3, 1)


def test_a_file_without_the_preamble_is_read_by_its_extension(tmp_path):
    path = write_dicom(tmp_path / "raw.dcm", ramp(), preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(decode_image(path)[:, :, 0], ramp() / 4095.0, atol=1e-6)


# --------------------------------------------------------------------------- refusals


def test_compressed_file_without_a_decoder_names_the_file_and_the_missing_package():
    from pydicom.pixels import get_decoder

    path = shipped("MR_small_jpeg_ls_lossless.dcm")
    uid = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    if get_decoder(uid).is_available:
        pytest.skip("a JPEG-LS decoder (gdcm, pylibjpeg-libjpeg or pyjpegls) is installed here")
    with pytest.raises(DataError) as exc:
        decode_image(path)
    msg = str(exc.value)
    assert "MR_small_jpeg_ls_lossless.dcm" in msg and "JPEG-LS" in msg
    assert "pylibjpeg" in msg and "gdcm" in msg


def test_jpeg_2000_decodes_through_an_installed_decoder():
    arr = decode_image(shipped("MR_small_jp2klossless.dcm"))  # Pillow (a core dependency) decodes it
    np.testing.assert_array_equal(arr, decode_image(shipped("MR_small.dcm")))


@pytest.mark.parametrize(("name", "needle"), [
    ("SC_rgb_rle_2frame.dcm", "multi-frame DICOM (2 frames)"),
    ("rtplan.dcm", "without pixel data"),
    ("MR_truncated.dcm", "cannot decode"),
])
def test_unusable_dicom_files_are_one_error_naming_the_file(name, needle):
    with pytest.raises(DataError, match="multi-frame|pixel data|decode") as exc:
        decode_image(shipped(name))
    assert name in str(exc.value) and needle in str(exc.value)


def test_window_keys_are_validated():
    with pytest.raises(ConfigError, match="data.dicom.window.*manual needs"):
        config_from_dict({"data": {"dicom": {"window": "manual", "center": 40}}})
    with pytest.raises(ConfigError, match="data.dicom.center/width.*only with data.dicom.window: manual"):
        config_from_dict({"data": {"dicom": {"center": 40, "width": 400}}})
    with pytest.raises(ConfigError, match="data.dicom.width"):
        config_from_dict({"data": {"dicom": {"window": "manual", "center": 40, "width": 0.5}}})
    with pytest.raises(ConfigError, match="data.dicom.window.*'level'"):
        config_from_dict({"data": {"dicom": {"window": "level"}}})
    with pytest.raises(ConfigError, match="group_by.*DICOM keyword"):
        config_from_dict({"data": {"split": {"group_by": "dicom:Patient ID"}}})
    cfg = config_from_dict({"data": {"dicom": {"window": "manual", "center": -600, "width": 1500}}})
    assert (cfg.data.dicom.center, cfg.data.dicom.width) == (-600.0, 1500.0)


# --------------------------------------------------------------------------- sources and splits


def dicom_folder(root: Path, patients_per_class: int = 6, images_per_patient: int = 2) -> Path:
    """root/<class>/<patient>_<k>.dcm; the classes differ in brightness, every patient in one class."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("benign", "malignant")):
        for p in range(patients_per_class):
            for k in range(images_per_patient):
                pixels = (rng.integers(0, 1500, (12, 12)) + 2000 * c).astype(np.uint16)
                write_dicom(root / cls / f"p{c}{p}_{k}.dcm", pixels, patient=f"patient-{c}-{p}")
    return root


def test_imagefolder_and_csv_read_dicom_like_any_image(tmp_path):
    root = dicom_folder(tmp_path / "folder", patients_per_class=2)
    (root / "benign" / "extra.png").parent.mkdir(exist_ok=True)
    from conftest import write_image

    write_image(root / "benign" / "extra.png", 5)  # PNG and DICOM side by side
    table = load_imagefolder(root, progress=False)
    assert table.classes == ["benign", "malignant"] and table.class_counts().tolist() == [5, 4]
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=16, cache_dir=str(tmp_path / "cache"))
    x = load_images(table, range(len(table)), cfg)
    assert x.shape == (9, 1, 16, 16) and x.min() >= 0 and x.max() <= 1
    dcm = [i for i, s in enumerate(table.sources) if s.endswith(".dcm")]
    means = [x[i].mean() for i in dcm]
    assert min(means[4:]) > max(means[:4])  # malignant files are brighter: the pixels are really read

    # csv: a DICOM path without an extension is recognised by its DICM marker
    no_ext = root / "malignant" / "IM0001"
    no_ext.write_bytes((root / "malignant" / "p10_0.dcm").read_bytes())
    (root / "labels.csv").write_text("path,label\nmalignant/IM0001,m\nbenign/p00_0.dcm,b\nbenign/p00_1.dcm,b\n")
    csv_table = load_csv(root / "labels.csv", progress=False)
    np.testing.assert_array_equal(csv_table.load(csv_table.ids.index("malignant/IM0001")),
                                  table.load(table.ids.index("malignant/p10_0.dcm")))


def test_the_config_window_reaches_the_source_and_the_cache_key(tmp_path):
    root = tmp_path / "w"
    write_dicom(root / "a" / "x.dcm", ramp(), center=100.0, width=50.0)
    default = load_imagefolder(root, progress=False).load(0)
    manual = DicomConfig("manual", center=2000.0, width=4000.0)
    windowed = load_imagefolder(root, progress=False, dicom=manual).load(0)
    assert default.mean() > 0.9 and 0.4 < windowed.mean() < 0.6
    cfg = DataConfig(cache_dir=str(tmp_path / "c"))
    assert cache_folder(cfg, 1) != cache_folder(DataConfig(cache_dir=str(tmp_path / "c"), dicom=manual), 1)
    assert "dicom" not in cache_folder(cfg, 1).name  # default windows keep the existing cache entries


def test_patient_id_groups_keep_every_patient_in_one_split(tmp_path):
    root = dicom_folder(tmp_path / "folder", patients_per_class=8, images_per_patient=3)
    table = load_imagefolder(root, progress=False)
    split_cfg = SplitConfig(group_by="dicom:PatientID", test_fraction=0.25, val_fraction=0.25)
    groups = split_groups(table, split_cfg)
    assert len(set(groups)) == 16 and groups[0].startswith("patient-")
    splits = make_splits(table, split_cfg, seed=3)
    by_patient: dict[str, set[str]] = {}
    for g, s in zip(groups, splits, strict=True):
        by_patient.setdefault(g, set()).add(str(s))
    assert all(len(s) == 1 for s in by_patient.values()), by_patient
    assert set(splits) == {"train", "val", "test"}
    # plain stratified splitting of the same files does put some patient in two splits
    plain = make_splits(table, SplitConfig(test_fraction=0.25, val_fraction=0.25), seed=3)
    assert any(len({str(plain[i]) for i, g2 in enumerate(groups) if g2 == g}) > 1 for g in set(groups))


def test_grouping_by_a_missing_or_unknown_attribute_is_refused(tmp_path):
    root = dicom_folder(tmp_path / "folder", patients_per_class=2)
    write_dicom(root / "benign" / "anonymous.dcm", ramp(), patient=None)
    table = load_imagefolder(root, progress=False)
    with pytest.raises(DataError, match="1 DICOM file.*no PatientID.*anonymous.dcm"):
        split_groups(table, SplitConfig(group_by="dicom:PatientID"))
    with pytest.raises(ConfigError, match="'PatientsID' is not a DICOM keyword; did you mean PatientID"):
        split_groups(table, SplitConfig(group_by="dicom:PatientsID"))


# --------------------------------------------------------------------------- the core install


def test_a_dcm_without_pydicom_exits_2_with_the_install_hint(tmp_path, capsys, monkeypatch):
    root = dicom_folder(tmp_path / "folder", patients_per_class=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "nodicom", "output_dir": str(tmp_path / "runs"),
                                      "data": {"source": "imagefolder", "root": str(root), "image_size": 16,
                                               "on_bad_image": "skip", "cache_dir": str(tmp_path / "cache")},
                                      "generate": {"preset": "tiny"}}))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now fails as on a core install
    code, err = vsi(capsys, "run", config, "--quiet")
    assert code == 2
    assert "p00_0.dcm" in err and "pydicom" in err and "pip install -e '.[dicom]'" in err
    assert not any((tmp_path / "runs").glob("*"))  # a new run stopped by bad input leaves nothing
