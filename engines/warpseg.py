"""WarpSegEngine: a WarpSeg network behind the Engine seam, from a volume to coarse + fine labels.

The network sees a fixed working grid: a box of ``config.fov_mm`` (world mm, RAS axes) centred on
the image's centre, sampled at ``config.size``; its logits are resampled trilinearly back onto the
image's own grid (inside the box; background outside) and turned into labels there, the coarse
argmax first and the fine class within its coarse group
(:func:`regseg.models.warpseg.predict_labels`). The coarse posterior is by default both decoders'
(:func:`regseg.models.warpseg.both_heads_coarse`; ``decode="coarse"``: the coarse head's alone).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regseg import spatial
from regseg.engines.base import Engine, make_engine
from regseg.engines.registration import resample_to_grid
from regseg.imageio import Volume, normalise_intensity
from regseg.models.registry import WEIGHTS_DIR, load_model
from regseg.models.warpseg import WarpSegConfig, both_heads_coarse, channel_argmax, predict_labels

#: ``regseg segment --model NAME`` -> shipped weights file.
SHIPPED = {"warpseg-prostate": "warpseg_prostate.pt", "warpseg-brain": "warpseg_brain.pt",
           "warpseg-prostate-single": "warpseg_prostate_single.pt",
           "warpseg-brain-single": "warpseg_brain_single.pt"}


#: How the engine turns the two decoders into coarse labels (``WarpSegEngine(decode=...)``),
#: chosen on validation data only (mean Dice, coarse / fine, ``coarse`` -> ``both``):
#: warpseg-brain on subjects 42000-42003 groups 0.465 -> 0.605, AAL 0.066 -> 0.083;
#: warpseg-prostate on phantoms 300-303 prostate 0.926 -> 0.928, fine 0.606 -> 0.606.
DECODES = ("both", "coarse")


def shipped_path(name_or_path: str | Path) -> Path:
    """A shipped model name (:data:`SHIPPED`) -> its weights file; a path is passed through."""
    return WEIGHTS_DIR / SHIPPED[str(name_or_path)] if str(name_or_path) in SHIPPED else Path(
        name_or_path)


def working_grid(image: Volume, config: WarpSegConfig) -> np.ndarray:
    """(4, 4) voxel_to_world of the working grid (I, J, K) = ``config.size[::-1]`` over a box of
    ``config.fov_mm`` centred on ``image``'s centre, axes along RAS."""
    shape = np.array(image.data.shape, dtype=np.float64)
    centre = image.voxel_to_world[:3, :3] @ ((shape - 1) / 2) + image.voxel_to_world[:3, 3]
    n = np.array(config.size[::-1], dtype=np.float64)
    spacing = np.array(config.fov_mm) / n
    matrix = np.diag([*spacing, 1.0])
    matrix[:3, 3] = centre - spacing * (n - 1) / 2
    return matrix


def to_working(image: Volume, config: WarpSegConfig) -> np.ndarray:
    """The image on the working grid, intensity-normalised: (D, H, W) float32."""
    data, _ = resample_to_grid(image, tuple(config.size[::-1]), working_grid(image, config))
    return np.ascontiguousarray(normalise_intensity(data).transpose(2, 1, 0))


def labels_to_working(labels: Volume, config: WarpSegConfig, like: Volume) -> np.ndarray:
    """A label map (on ``like``'s grid) on the working grid, nearest: (D, H, W) int64."""
    data, _ = resample_to_grid(Volume(labels.data.astype(np.float32), labels.voxel_to_world),
                               tuple(config.size[::-1]), working_grid(like, config),
                               mode="nearest")
    return np.ascontiguousarray(np.rint(data).astype(np.int64).transpose(2, 1, 0))


def logits_to_image(logits: dict[str, torch.Tensor], image: Volume, config: WarpSegConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Working-grid logits resampled onto ``image``'s grid (trilinear) and labelled there.

    Returns:
        (coarse, fine) uint8 (I, J, K) on ``image``'s grid; background outside the working box.
    """
    work = working_grid(image, config)
    n = np.array(config.size[::-1])
    corners = work[:3, :3] @ np.array([[0, 0, 0], n - 1]).T + work[:3, 3:4]
    to_vox = np.linalg.inv(image.voxel_to_world)
    vox = to_vox[:3, :3] @ corners + to_vox[:3, 3:4]
    lo = np.clip(np.floor(vox.min(1)).astype(int), 0, image.data.shape)
    hi = np.clip(np.ceil(vox.max(1)).astype(int) + 1, 0, image.data.shape)
    crop_v2w = image.voxel_to_world.copy()
    crop_v2w[:3, 3] = image.voxel_to_world[:3, :3] @ lo + image.voxel_to_world[:3, 3]
    crop_to_work = np.linalg.inv(work) @ crop_v2w
    crop_shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    if _axis_aligned(crop_to_work):
        coarse_c, fine_c = _labels_separable(logits, crop_to_work, crop_shape, config)
    else:  # an oblique image grid: sample every voxel's position
        sampled = {name: _grid_resample(v.float().cpu(), crop_to_work, crop_shape)
                   for name, v in logits.items()}
        coarse_c, fine_c = predict_labels(sampled, config)
    coarse = np.zeros(image.data.shape, dtype=np.uint8)
    fine = np.zeros(image.data.shape, dtype=np.uint8)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    coarse[box] = coarse_c[0].numpy().transpose(2, 1, 0)
    fine[box] = fine_c[0].numpy().transpose(2, 1, 0)
    return coarse, fine


def is_aal(config: WarpSegConfig) -> bool:
    """True for a brain model of ``regseg train warpseg --task brain``: 117 fine classes, class k
    the AAL region of id k (1 ``Precentral_L`` .. 116 ``Vermis_10``; 0 background), so its fine
    label map holds AAL ids as they are."""
    return (len(config.fine_names) == 117 and config.fine_names[1] == "Precentral_L"
            and config.fine_names[116] == "Vermis_10")


def stream_labels(coarse: np.ndarray, fine: np.ndarray, config: WarpSegConfig) -> np.ndarray:
    """The label map ``regseg-stream --mri-labels`` takes -- 0 background, 1 prostate, 2 lesion
    (regseg.types) -- from a prostate model's coarse and fine maps.

    Raises:
        ValueError: the model's classes are not the prostate ones (no ``prostate`` coarse class
            or no ``lesion`` fine class).
    """
    if "prostate" not in config.coarse_names or "lesion" not in config.fine_names:
        raise ValueError(f"a prostate model is needed for --mri-labels maps; this one has coarse "
                         f"{list(config.coarse_names)} and fine {list(config.fine_names)}")
    out = (coarse == config.coarse_names.index("prostate")).astype(np.uint8)
    out[(fine == config.fine_names.index("lesion")) & (out == 1)] = 2
    return out


def _axis_aligned(matrix: np.ndarray, tol: float = 1e-6) -> bool:
    """True when a (4, 4) voxel map sends each index axis to the same axis (diagonal linear
    part), so resampling through it separates into three 1-D interpolations."""
    linear = matrix[:3, :3]
    return bool(np.all(np.abs(linear - np.diag(np.diag(linear))) < tol))


def _interp_matrix(scale: float, offset: float, n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) linear-interpolation weights: output index o reads input coordinate
    ``scale * o + offset``, clamped to [0, n_in - 1] (grid_sample's border padding)."""
    u = np.clip(scale * np.arange(n_out) + offset, 0.0, n_in - 1)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (u - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w)
    np.add.at(m, (np.arange(n_out), i1), w)
    return torch.from_numpy(m)


def _interp_matrices(out_to_in: np.ndarray, out_shape: tuple[int, ...], in_shape: tuple[int, ...]
                     ) -> tuple[torch.Tensor, ...]:
    """The (I, J, K) interpolation matrices of an axis-aligned voxel map; shapes (I, J, K)."""
    return tuple(_interp_matrix(out_to_in[a, a], out_to_in[a, 3], out_shape[a], in_shape[a])
                 for a in range(3))


def _apply_separable(x: torch.Tensor, mi: torch.Tensor, mj: torch.Tensor, mk: torch.Tensor
                     ) -> torch.Tensor:
    """(B, C, K, J, I) through the per-axis matrices -> (B, C, len(mk), len(mj), len(mi)), as
    plain matrix products on contiguous views (half the time of einsums): I, then J, then K."""
    b, c, nk, nj, ni = x.shape
    y = x.reshape(-1, ni) @ mi.T  # (b c K J, A)
    y = mj @ y.reshape(b * c * nk, nj, -1)  # (b c K, D, A)
    y = mk @ y.reshape(b * c, nk, -1)  # (b c, E, D A)
    return y.reshape(b, c, mk.shape[0], mj.shape[0], mi.shape[0])


def _separable_resample(x: torch.Tensor, out_to_in: np.ndarray, out_shape: tuple[int, ...]
                        ) -> torch.Tensor:
    """Trilinear resampling of (1, C, K, J, I) onto an axis-aligned grid of ``out_shape``
    (I, J, K) as three matrix products; the same values as :func:`_grid_resample`."""
    return _apply_separable(x, *_interp_matrices(out_to_in, out_shape, x.shape[:1:-1]))


def _labels_separable(logits: dict[str, torch.Tensor], out_to_in: np.ndarray,
                      out_shape: tuple[int, ...], config: WarpSegConfig
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`regseg.models.warpseg.predict_labels` of the logits resampled (separably) onto a
    grid of ``out_shape`` (I, J, K), without resampling every fine class everywhere: the coarse
    labels first, then per coarse group its members' logits only inside the bounding box of
    that group's voxels (the brain's 116 AAL classes: a fraction of the work). The same labels.

    Returns:
        (coarse, fine), each (1, K, J, I) int64.
    """
    fine_logits = logits["fine"].float().cpu()
    mats = _interp_matrices(out_to_in, out_shape, fine_logits.shape[:1:-1])
    coarse = channel_argmax(_apply_separable(logits["coarse"].float().cpu(), *mats))
    groups = np.asarray(config.fine_groups)
    fine = torch.zeros_like(coarse)
    for g in range(config.coarse_classes):
        members = torch.from_numpy(np.flatnonzero(groups == g))
        where = coarse[0] == g
        if len(members) == 1:
            fine[0][where] = members[0]
            continue
        idx = torch.nonzero(where)
        if len(idx) == 0:
            continue
        (k0, j0, i0), (k1, j1, i1) = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
        box = _apply_separable(fine_logits[:, members], mats[0][i0:i1], mats[1][j0:j1],
                               mats[2][k0:k1])[0]  # (members, k, j, i)
        inside = where[k0:k1, j0:j1, i0:i1]
        best = box[:, inside].t().contiguous().argmax(1)  # ties to the lower class
        fine[0, k0:k1, j0:j1, i0:i1][inside] = members[best]
    return coarse, fine


def _grid_resample(x: torch.Tensor, out_to_in: np.ndarray, out_shape: tuple[int, ...]
                   ) -> torch.Tensor:
    """Trilinear resampling of (1, C, K, J, I) at every voxel of a grid of ``out_shape`` (I, J,
    K) through the voxel map ``out_to_in`` (grid_sample, border padding)."""
    to_norm = spatial.index_to_normalised(tuple(x.shape[:1:-1])) @ out_to_in
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in out_shape[::-1]],
                             indexing="ij")
    ijk1 = torch.stack([i, j, k, torch.ones_like(i)], -1)
    grid = (ijk1 @ torch.as_tensor(to_norm[:3].T, dtype=torch.float32))[None]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class WarpSegEngine:
    """Segments 3-D volumes with a WarpSeg checkpoint: ``engine(volume)`` -> (coarse, fine).

    Args:
        weights: a checkpoint path or a shipped name (:data:`SHIPPED`).
        backend, device, threads: as :func:`regseg.engines.base.make_engine` (``auto`` times
            eager and ONNX Runtime here and keeps the fastest that matches).
        decode: ``both`` (default): the coarse labels from the mean of the two decoders' coarse
            probabilities (:func:`regseg.models.warpseg.both_heads_coarse`); ``coarse``: from
            the coarse decoder alone. Chosen on validation data only (:data:`DECODES`).
    """

    def __init__(self, weights: str | Path = "warpseg-prostate", *, backend: str = "eager",
                 device: str = "cpu", threads: int | None = None,
                 decode: str = "both") -> None:
        if decode not in DECODES:
            raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODES)}")
        self.decode = decode
        model = load_model(shipped_path(weights))
        self.config: WarpSegConfig = model.config
        self.engine: Engine = make_engine(model, {"image": (1, 1, *self.config.size)},
                                          backend=backend, device=device, threads=threads)
        self.backend = self.engine.backend
        self.timings_s: dict[str, float] = {}

    def __call__(self, image: Volume) -> tuple[Volume, Volume]:
        """Coarse and fine uint8 label maps on ``image``'s grid."""
        t0 = time.perf_counter()
        x = torch.from_numpy(to_working(image, self.config))[None, None].to(self.engine.device)
        t1 = time.perf_counter()
        out = {k: v.clone() for k, v in self.engine({"image": x}).items()}
        if self.decode == "both":
            out["coarse"] = both_heads_coarse(out, self.config.fine_groups)
        t2 = time.perf_counter()
        coarse, fine = logits_to_image(out, image, self.config)
        t3 = time.perf_counter()
        self.timings_s = {"prepare_s": t1 - t0, "network_s": t2 - t1, "labels_s": t3 - t2,
                          "total_s": t3 - t0}
        return (Volume(coarse, image.voxel_to_world.copy()),
                Volume(fine, image.voxel_to_world.copy()))
