"""WarpSegEngine (eager and ONNX Runtime agree; labels land on the image grid) and the
``regseg segment`` / ``regseg train warpseg`` argument errors (exit 2, a message, no output)."""

import numpy as np
import pytest
import torch

from regseg.cli import main as regseg_main
from regseg.engines.base import make_engine, parity_error
from regseg.engines.warpseg import WarpSegEngine, logits_to_image, stream_labels, working_grid
from regseg.imageio import Volume, save_volume
from regseg.models.checkpoint import save_checkpoint
from regseg.models.warpseg import WarpSeg, WarpSegConfig

SMALL = WarpSegConfig(size=(8, 8, 16), channels=(4, 8), fov_mm=(48.0, 24.0, 24.0))


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "small.pt", "warpseg", WarpSeg(SMALL), SMALL)


def test_onnxrt_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    model = WarpSeg(SMALL).eval()
    shapes = {"image": (1, 1, *SMALL.size)}
    eager = make_engine(model, shapes, backend="eager")
    onnx = make_engine(model, shapes, backend="onnxrt", cache_dir=tmp_path)
    x = {"image": torch.rand(shapes["image"])}
    ref = {k: v.clone() for k, v in eager(x).items()}
    assert max(parity_error(ref, onnx(x)).values()) < 1e-3


def test_engine_labels_are_on_the_image_grid_and_hierarchical(checkpoint):
    rng = np.random.default_rng(0)
    v2w = np.diag([2.0, 2.0, 2.0, 1.0])
    v2w[:3, 3] = [-30.0, -20.0, -15.0]
    image = Volume(rng.random((30, 20, 15)).astype(np.float32), v2w)
    engine = WarpSegEngine(checkpoint)
    coarse, fine = engine(image)
    assert coarse.data.shape == fine.data.shape == image.data.shape
    assert np.array_equal(np.asarray(SMALL.fine_groups)[fine.data], coarse.data)
    # outside the working box (48 x 24 x 24 mm around the centre): background
    centre = v2w[:3, :3] @ (np.array(image.data.shape) - 1) / 2 + v2w[:3, 3]
    assert working_grid(image, SMALL)[:3, 3] == pytest.approx(
        centre - np.array(SMALL.fov_mm) / np.array(SMALL.size[::-1]) * (
            np.array(SMALL.size[::-1]) - 1) / 2)
    assert coarse.data[0].max() == 0 and coarse.data[:, 0].max() == 0


def test_logits_to_image_recovers_a_box():
    """Logits that say 'prostate' in a box of the working grid come back as that box in mm."""
    image = Volume(np.zeros((48, 24, 24), np.float32), np.eye(4))  # 1 mm voxels
    logits = {"coarse": torch.zeros(1, 2, *SMALL.size), "fine": torch.zeros(1, 4, *SMALL.size)}
    logits["coarse"][:, 1, 2:6, 2:6, 4:12] = 10.0
    logits["fine"][:, 2] = 5.0  # transition zone wins inside the gland
    coarse, fine = logits_to_image(logits, image, SMALL)
    gland = coarse == 1
    assert 0.5 * 4 * 4 * 8 * 27 < gland.sum() < 1.5 * 4 * 4 * 8 * 27  # 3 mm voxels -> 1 mm
    assert (fine[gland] == 2).all() and (fine[~gland] == 0).all()
    labels = stream_labels(coarse, fine, SMALL)
    assert set(np.unique(labels)) == {0, 1}


def test_segment_writes_both_maps(checkpoint, tmp_path):
    image = Volume(np.random.default_rng(1).random((30, 20, 15)).astype(np.float32), np.eye(4))
    save_volume(image, tmp_path / "mri.nii.gz")
    out = tmp_path / "seg" / "labels.nii.gz"
    assert regseg_main(["segment", "--model", str(checkpoint), "--mri",
                        str(tmp_path / "mri.nii.gz"), "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "seg" / "labels_zones.nii.gz").is_file()
    assert not list((tmp_path / "seg").glob(".*"))  # no temporary file left


@pytest.mark.parametrize("argv, expect", [
    (["segment", "--model", "warpseg-nope", "--mri", "{mri}", "--out", "{out}"], "--model"),
    (["segment", "--model", "warpseg-unshipped", "--mri", "{mri}", "--out", "{out}"],
     "not shipped"),
    (["segment", "--model", "{ckpt}", "--mri", "{missing}", "--out", "{out}"], "--mri"),
    (["segment", "--model", "{mri}", "--mri", "{mri}", "--out", "{out}"], "checkpoint"),
    (["segment", "--model", "{ckpt}", "--mri", "{mri}", "--out", "{dir}"], "folder"),
    (["train", "warpseg", "--out", "{dir}", "--minutes", "0"], "--minutes"),
    (["train", "warpseg", "--out", "{dir}", "--task", "liver"], "--task"),
])
def test_bad_arguments_exit_2(checkpoint, tmp_path, capsys, monkeypatch, argv, expect):
    from regseg.engines import warpseg

    # a registered model name whose weights file is absent (all real ones are shipped)
    monkeypatch.setitem(warpseg.SHIPPED, "warpseg-unshipped", "warpseg_unshipped.pt")
    save_volume(Volume(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "mri.nii.gz")
    fill = {"mri": tmp_path / "mri.nii.gz", "out": tmp_path / "o.nii.gz", "ckpt": checkpoint,
            "missing": tmp_path / "none.nii.gz", "dir": tmp_path}
    try:
        rc = regseg_main([a.format(**fill) for a in argv])
    except SystemExit as exc:  # argparse's own checks (choices, types) exit from the parser
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_separable_resampling_equals_grid_sample():
    from regseg.engines.warpseg import _grid_resample, _separable_resample

    x = torch.randn(1, 3, 5, 6, 7)
    out_to_in = np.diag([0.45, -0.6, 0.3, 1.0])
    out_to_in[:3, 3] = [-0.4, 5.2, 0.1]
    shape = (17, 11, 19)
    a = _separable_resample(x, out_to_in, shape)
    b = _grid_resample(x, out_to_in, shape)
    assert a.shape == b.shape == (1, 3, 19, 11, 17)
    assert torch.allclose(a, b, atol=1e-5)


def test_both_heads_coarse_averages_the_two_posteriors():
    """Where the coarse head says background weakly and the fine head's prostate classes say
    gland strongly, both heads together call it gland; the coarse head alone does not."""
    from regseg.models.warpseg import both_heads_coarse

    coarse = torch.zeros(1, 2, 1, 1, 2)
    coarse[0, 0] = 0.4  # background slightly ahead: p(background) = 0.60
    fine = torch.zeros(1, 4, 1, 1, 2)
    fine[0, 2, ..., 0] = 6.0  # voxel 0: transition zone, p(prostate) ~ 1.0
    fine[0, 0, ..., 1] = 6.0  # voxel 1: background in both heads
    both = both_heads_coarse({"coarse": coarse, "fine": fine}, SMALL.fine_groups)
    assert both.argmax(1).flatten().tolist() == [1, 0]
    assert coarse.argmax(1).flatten().tolist() == [0, 0]
    p = both.exp()
    assert torch.allclose(p.sum(1), torch.ones(1, 1, 1, 2))
    e6 = float(np.exp(6.0))
    p_coarse, p_fine = 1 / (1 + float(np.exp(0.4))), (e6 + 2) / (e6 + 3)  # p(prostate) per head
    assert p[0, 1, 0, 0, 0] == pytest.approx(0.5 * (p_coarse + p_fine), abs=1e-5)


def test_engine_decode_option(checkpoint):
    image = Volume(np.random.default_rng(2).random((24, 16, 16)).astype(np.float32), np.eye(4))
    coarse_only = WarpSegEngine(checkpoint, decode="coarse")
    both = WarpSegEngine(checkpoint)
    assert both.decode == "both"
    c0, f0 = coarse_only(image)
    c1, f1 = both(image)
    for c, f in ((c0, f0), (c1, f1)):  # the hierarchy holds either way
        assert np.array_equal(np.asarray(SMALL.fine_groups)[f.data], c.data)
    with pytest.raises(ValueError, match="decode"):
        WarpSegEngine(checkpoint, decode="fine")
