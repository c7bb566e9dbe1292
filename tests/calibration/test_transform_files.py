"""Transform and markups files: round trips, and Slicer's reading of what we write (LPS)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from regseg.calibration import markups, transforms_io
from regseg.errors import InputError


def _a_to_b(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    m[:3, 3] = rng.normal(0, 40, 3)
    return m


@pytest.mark.parametrize("name", ["t.tfm", "t.txt", "t.xml", "t.h5"])
def test_round_trip(tmp_path, name):
    if name.endswith(".h5"):
        pytest.importorskip("SimpleITK")
    m = _a_to_b()
    path = transforms_io.write_transform(tmp_path / name, m, from_name="Reference",
                                         to_name="MRI")
    back = transforms_io.read_transform(path, from_name="Reference", to_name="MRI")
    assert np.allclose(back, m, atol=1e-9)


@pytest.mark.parametrize("name", ["t.tfm", "t.h5"])
def test_itk_file_read_as_slicer_does_maps_known_points(tmp_path, name):
    """Slicer reads an ITK file as LPS and resampling (parent b -> child a): through ITK's own
    reader, a point of frame b (LPS) must land on the point of frame a it corresponds to."""
    sitk = pytest.importorskip("SimpleITK")
    a_to_b = _a_to_b(1)
    path = transforms_io.write_transform(tmp_path / name, a_to_b)
    itk = sitk.ReadTransform(str(path))
    lps = np.array([-1.0, -1.0, 1.0])
    for p_a in np.random.default_rng(2).normal(0, 50, (5, 3)):
        p_b = a_to_b[:3, :3] @ p_a + a_to_b[:3, 3]
        assert np.allclose(itk.TransformPoint(tuple(p_b * lps)), p_a * lps, atol=1e-6)


def test_reads_a_slicer_style_composite_with_a_centre(tmp_path):
    """An affine with a non-zero centre inside a CompositeTransform header (Slicer/ANTs style)."""
    sitk = pytest.importorskip("SimpleITK")
    t = sitk.AffineTransform(3)
    t.SetMatrix(Rotation.from_euler("z", 20, degrees=True).as_matrix().ravel().tolist())
    t.SetTranslation((3.0, -4.0, 5.0))
    t.SetCenter((10.0, 20.0, -30.0))
    path = tmp_path / "centred.tfm"
    sitk.WriteTransform(sitk.CompositeTransform([t]), str(path))
    a_to_b = transforms_io.read_transform(path)
    p_b = np.array([5.0, 6.0, 7.0])
    p_a = np.array(t.TransformPoint(tuple(p_b * [-1, -1, 1]))) * [-1, -1, 1]
    assert np.allclose(a_to_b[:3, :3] @ p_a + a_to_b[:3, 3], p_b, atol=1e-6)


def test_plus_xml_keeps_the_rest_of_a_config_and_reads_the_inverse(tmp_path):
    config = tmp_path / "PlusDeviceSet.xml"
    config.write_text('<PlusConfiguration version="2.1"><DataCollection StartupDelaySec="1"/>'
                      '<CoordinateDefinitions><Transform From="Image" To="Probe" Matrix="1 0 0 0 '
                      '0 1 0 0 0 0 1 0 0 0 0 1"/></CoordinateDefinitions></PlusConfiguration>')
    m = _a_to_b(3)
    m[:3, :2] *= 0.2  # ImageToProbe carries the pixel size
    transforms_io.write_transform(config, m, from_name="Image", to_name="Probe", error_mm=0.42)
    defs = transforms_io.read_plus_transforms(config)
    assert np.allclose(defs[("Image", "Probe")]["matrix"], m) and defs[("Image", "Probe")][
        "error"] == "0.4200"
    assert "DataCollection" in config.read_text()
    inverse = transforms_io.read_transform(config, from_name="Probe", to_name="Image")
    assert np.allclose(inverse @ m, np.eye(4), atol=1e-9)
    with pytest.raises(InputError, match="no Transform From='Stylus'"):
        transforms_io.read_transform(config, from_name="Stylus", to_name="Probe")


def test_bad_files_are_refused_with_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.tfm"
    bad.write_text("#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\n"
                   "Parameters: 1 2 3\nFixedParameters: 0\n")
    with pytest.raises(InputError, match="BSplineTransform_double_3_3 with 3 parameters"):
        transforms_io.read_transform(bad)
    text = tmp_path / "m.txt"
    text.write_text("1 0 0\n0 1 0\n")
    with pytest.raises(InputError, match="m.txt"):
        transforms_io.read_transform(text)
    singular = tmp_path / "s.txt"
    singular.write_text("1 0 0 0\n0 0 0 0\n0 0 1 0\n0 0 0 1\n")
    with pytest.raises(InputError, match="singular"):
        transforms_io.read_transform(singular)


@pytest.mark.parametrize("name", ["marks.mrk.json", "marks.fcsv"])
def test_markups_round_trip_in_ras_written_as_lps(tmp_path, name):
    points = np.array([[10.0, -20.5, 30.25], [1.0, 2.0, 3.0], [-5.0, 0.0, 7.5]])
    path = markups.write_landmarks(tmp_path / name, ["apex", "base", "F-3"], points)
    back = markups.read_landmarks(path)
    assert back.labels == ["apex", "base", "F-3"] and np.allclose(back.points_ras, points)
    assert "LPS" in path.read_text()


def test_legacy_fcsv_in_ras_and_pairing_by_label(tmp_path):
    old = tmp_path / "old.fcsv"
    old.write_text("# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n"
                   "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                   "vtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,b,,\n"
                   "vtkMRMLMarkupsFiducialNode_1,4,5,6,0,0,0,1,1,1,0,a,,\n")
    marks = markups.read_landmarks(old)
    assert np.allclose(marks.points_ras, [[1, 2, 3], [4, 5, 6]])
    other = markups.Landmarks(["a", "b"], np.array([[40.0, 50, 60], [10.0, 20, 30]]))
    labels, p, q = markups.pair_landmarks(marks, other, "old", "other")
    assert labels == ["b", "a"] and np.allclose(q, [[10, 20, 30], [40, 50, 60]])
    with pytest.raises(InputError, match="has 2 landmarks and other 1"):
        markups.pair_landmarks(marks, markups.Landmarks(["x"], np.zeros((1, 3))), "old", "other")
