"""Multi-resolution registration (issue 18): affine and network on the working grid, the field
upsampled and composed on the fixed image's own (finer) grid, optionally refined there.

The network and the affine stage are replaced by known maps, so what is tested is the composition
on the fine grid (conventions, units, mm) against an independent formulation, and that the
fine-grid refinement recovers a known displacement better than no refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regseg.engines.registration import RegistrationEngine
from regseg.imageio import Volume
from regseg.kernels import trilinear
from regseg.models.checkpoint import save_checkpoint
from regseg.models.plcreg import PLCReg, PLCRegConfig

WORK = (16, 16, 16)  # the tiny model's working grid (K, J, I)
FULL = (32, 32, 32)  # the images' grid: twice as fine over the same extent
SPACING = 1.5  # mm, the fine grid's voxel size


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = PLCRegConfig(ndim=3, size=WORK, channels=(4, 8, 8), heads=2, window=(2, 2, 2))
    return str(save_checkpoint(tmp_path_factory.mktemp("w") / "tiny.pt", "plcreg", PLCReg(cfg),
                               cfg))


def _texture(points_kji: np.ndarray) -> np.ndarray:
    """A smooth image as a function of (fine-grid) voxel position, array order."""
    rng = np.random.default_rng(7)
    centres = rng.uniform(4, 28, (40, 3))
    widths = rng.uniform(2.0, 3.5, 40)
    out = np.zeros(points_kji.shape[:-1])
    for c, w in zip(centres, widths, strict=True):
        out += np.exp(-((points_kji - c) ** 2).sum(-1) / (2 * w * w))
    return out


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                indexing="ij"), -1)  # (*shape, 3), array order


def _volume(data_kji: np.ndarray) -> Volume:
    """(K, J, I) values -> a Volume (I, J, K) of SPACING mm voxels."""
    return Volume(data=np.ascontiguousarray(data_kji.transpose(2, 1, 0)).astype(np.float32),
                  voxel_to_world=np.diag([SPACING] * 3 + [1.0]))


def _work_displacement(points_w: np.ndarray) -> np.ndarray:
    """A smooth known displacement in working-grid voxels at working positions (..., 3)."""
    k, j, i = points_w[..., 0], points_w[..., 1], points_w[..., 2]
    return np.stack([0.8 * np.sin(2 * np.pi * j / 16), 0.6 * np.cos(2 * np.pi * i / 16),
                     0.5 * np.sin(2 * np.pi * k / 16)], -1)


def test_working_grid_map_is_composed_exactly_on_the_fine_grid(weights):
    """affine A and displacement d on the working grid -> the fine grid's map S A S^-1 (x + d)."""
    angle = np.radians(4.0)
    affine_w = np.eye(4)  # array-order working voxels: a small rotation about the centre + shift
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                    [0, np.sin(angle), np.cos(angle)]])
    centre = (np.array(WORK) - 1) / 2
    affine_w[:3, :3] = rot * 1.03
    affine_w[:3, 3] = centre - affine_w[:3, :3] @ centre + np.array([0.5, -0.4, 0.3])
    d_w = _work_displacement(_grid(WORK))  # (*WORK, 3)
    ddf_w = torch.from_numpy(np.moveaxis(d_w, -1, 0).astype(np.float32))[None]

    # the expected fine-grid map, independently: x_f -> x_w (align_corners=False, same extent)
    x_f = _grid(FULL)
    x_w = (x_f + 0.5) * (WORK[0] / FULL[0]) - 0.5
    y_w = (x_w + _work_displacement(x_w)) @ affine_w[:3, :3].T + affine_w[:3, 3]
    y_f = (y_w + 0.5) * (FULL[0] / WORK[0]) - 0.5
    moving = _texture(x_f)
    fixed = _texture(y_f)  # fixed(x) = moving(T x): registering fixed <- moving recovers T

    engine = RegistrationEngine(weights, affine="none")
    engine.affine = lambda f, m: affine_w
    engine.predict = lambda m, f: {"ddf": ddf_w, "field": ddf_w}
    res = engine.register(_volume(fixed), _volume(moving))
    got = np.moveaxis(res.ddf, 0, -1)  # (K, J, I, 3) fine voxels
    want = y_f - x_f
    inner = (slice(3, -3),) * 3  # trilinear upsampling clamps at the outermost half voxels
    assert np.abs(got[inner] - want[inner]).max() < 0.15  # fine voxels (d's interpolation)
    # ddf_mm: (I, J, K, 3) RAS mm of the same displacement
    mm = res.ddf_mm.transpose(2, 1, 0, 3)[..., ::-1]
    assert np.abs(mm[inner] - SPACING * want[inner]).max() < 0.15 * SPACING
    # the fixed-grid affine is S A S^-1 in fine voxels
    assert np.abs(res.affine[:3, :3] - affine_w[:3, :3]).max() < 1e-9
    # and the moving image sampled once through it lands on the fixed one
    moved = res.moved.data.transpose(2, 1, 0)
    assert np.abs(moved - fixed)[inner].mean() < 0.2 * np.abs(moving - fixed)[inner].mean()


def test_fine_grid_refinement_recovers_a_known_displacement(weights):
    """The network says nothing (zero field): refinement steps on the fine grid recover a smooth
    displacement of ~1.5 fine voxels; with none the error stays the displacement itself."""
    full = (24, 24, 24)  # 1.5 x the working grid: any ratio works
    x_f = _grid(full)
    k, j, i = x_f[..., 0], x_f[..., 1], x_f[..., 2]
    true = np.stack([1.2 * np.sin(2 * np.pi * j / 24), 1.0 * np.cos(2 * np.pi * i / 24),
                     0.7 * np.sin(2 * np.pi * k / 24)], -1)
    moving = _texture(x_f)
    fixed = _texture(x_f + true)
    zero = torch.zeros(1, 3, *WORK)
    errors = {}
    for fine_steps in (0, 30):
        torch.manual_seed(0)
        engine = RegistrationEngine(weights, affine="none", refine_fine=fine_steps)
        engine.predict = lambda m, f: {"ddf": zero, "field": zero}
        res = engine.register(_volume(fixed), _volume(moving))
        got = np.moveaxis(res.ddf, 0, -1)
        inner = (slice(3, -3),) * 3
        errors[fine_steps] = float(np.linalg.norm(got - true, axis=-1)[inner].mean())
        assert res.timings_s["refine_fine_s"] >= 0
    assert errors[0] == pytest.approx(float(np.linalg.norm(true, axis=-1)[inner].mean()),
                                      rel=1e-3)
    assert errors[30] < 0.7 * errors[0], errors  # measured 0.64


@pytest.mark.skipif(not trilinear.available(), reason="numba not installed")
def test_a_registration_samples_through_the_compiled_kernels_and_agrees_with_torch(
        weights, monkeypatch):
    """On CPU, register's trilinear samples run the compiled kernels (fast_sampler), and the
    registration agrees with the one through torch's sampler (to rounding, here 1e-3 voxel)."""
    x_f = _grid(FULL)
    moving, fixed = _texture(x_f), _texture(x_f + 0.5)
    calls = []
    original = trilinear.sample

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(trilinear, "sample", counted)
    ddfs = {}
    for fast in (True, False):
        torch.manual_seed(0)
        engine = RegistrationEngine(weights, affine="none", refine=3)
        assert engine.fast_sampler
        engine.fast_sampler = fast
        before = len(calls)
        ddfs[fast] = engine.register(_volume(fixed), _volume(moving)).ddf
        assert (len(calls) > before) == fast
    assert np.abs(ddfs[True] - ddfs[False]).max() < 1e-3
