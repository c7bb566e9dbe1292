"""Training samples from the simulated scanner: model inputs built as the live path builds them.

A sample is one simulated frame on the model grid: the TRUS image, the MRI and its labels resliced
at the *tracked* plane (``regseg.planes``, exactly as ``regseg.stream`` does per frame), the true
labels, the true in-plane correction theta, and both 4x4 plane matrices for the TRE. Sample sets
are generated once per parameter set and cached compactly (uint8 / float16) on disk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from regseg import planes, spatial
from regseg.errors import InputError
from regseg.imageio import normalise_intensity
from regseg.metrics import true_theta

#: Bump when what a sample holds or how it is built changes: old caches are then ignored.
DATA_VERSION = 1

#: ``open_scanner(phantom_seed, scanner_seed) -> (phantom, scanner)``: what generates the frames.
OpenScanner = Callable[[int, int], tuple[Any, Any]]


def open_simulated_scanner(phantom_seed: int, scanner_seed: int) -> tuple[Any, Any]:
    """The built-in phantom case ``phantom_seed`` and a simulated scanner looking at it."""
    # Imported here: the scanner is the heaviest module of regseg and only data generation needs it.
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner

    phantom = make_phantom(phantom_seed)
    return phantom, SimulatedScanner(phantom, ScannerConfig(), seed=scanner_seed)


def open_randomised_scanner(phantom_seed: int, scanner_seed: int) -> tuple[Any, Any]:
    """Phantom case ``phantom_seed`` with randomised anatomy, seen by a randomised scanner.

    The draw (:func:`regseg.sim.randomise.randomise`) is seeded by both seeds, so the same
    pair gives the same case and scanner.
    """
    from regseg.sim.phantom import make_phantom
    from regseg.sim.randomise import randomise
    from regseg.sim.scanner import SimulatedScanner

    case = randomise(np.random.default_rng([int(phantom_seed), int(scanner_seed), 0x5A]))
    phantom = make_phantom(phantom_seed, options=case.phantom)
    return phantom, SimulatedScanner(phantom, case.scanner, seed=scanner_seed)


def open_randomised_stack_scanner(phantom_seed: int, scanner_seed: int) -> tuple[Any, Any]:
    """:func:`open_randomised_scanner`'s case, its MRI half the time a thick, oblique T2 stack.

    The case and scanner are exactly those of :func:`open_randomised_scanner` (same seeds); the
    stack (:func:`regseg.sim.mri_stack.draw_stack`) is drawn from its own generator, and only the
    MRI side (the returned phantom's ``mri`` and ``labels``) is resampled: the scanner renders,
    and takes its truth from, the isotropic phantom.
    """
    from regseg.sim.mri_stack import acquire_stack, draw_stack

    phantom, scanner = open_randomised_scanner(phantom_seed, scanner_seed)
    stack = draw_stack(np.random.default_rng([int(phantom_seed), int(scanner_seed), 0x57AC]))
    return (phantom if stack is None else acquire_stack(phantom, stack)), scanner


def open_restyled_scanner(phantom_seed: int, scanner_seed: int) -> tuple[Any, Any]:
    """:func:`open_randomised_scanner`'s case and poses, its frames re-rendered in a style drawn
    per case (:mod:`regseg.sim.restyle`: another appearance than family A's B-mode model)."""
    from regseg.sim.restyle import RestyledScanner

    phantom, scanner = open_randomised_scanner(phantom_seed, scanner_seed)
    return phantom, RestyledScanner(scanner, scanner_seed)


#: Frame sources whose sample sets may be cached on disk, by the name in the cache key.
CACHEABLE_SCANNERS: dict[str, OpenScanner] = {
    "plain": open_simulated_scanner, "randomised": open_randomised_scanner,
    "randomised-stack": open_randomised_stack_scanner, "restyled": open_restyled_scanner}


@dataclass
class SampleSet:
    """N samples on an (h, w) model grid, stored compactly; :meth:`batch` makes model inputs."""

    trus: Tensor  # (N, 1, h, w) float16 in [0, 1]
    mri: Tensor  # (N, 1, h, w) float16 in [0, 1], MRI at the tracked plane
    mri_labels: Tensor  # (N, 1, h, w) uint8 label values of the MRI at the tracked plane
    labels: Tensor  # (N, h, w) uint8 true labels of the frame, nearest-resampled
    theta: Tensor  # (N, 2, 3) float32 true in-plane correction (regseg.metrics.true_theta)
    tracked_image_to_mri: Tensor  # (N, 4, 4) float64
    true_image_to_mri: Tensor  # (N, 4, 4) float64
    phantom_seed: Tensor  # (N,) int64
    frame_hw: tuple[int, int]  # the first sample's; frame_hws holds each sample's
    frame_hws: Tensor | None = None  # (N, 2) int64 (H, W) per sample; None: all frame_hw

    def __post_init__(self) -> None:
        if self.frame_hws is None:
            self.frame_hws = torch.tensor([list(self.frame_hw)] * len(self.trus),
                                          dtype=torch.long).reshape(-1, 2)

    def sample_hw(self, i: int) -> tuple[int, int]:
        """Frame (H, W) of sample ``i`` (frames may differ in size under randomisation)."""
        return int(self.frame_hws[i, 0]), int(self.frame_hws[i, 1])

    def __len__(self) -> int:
        return self.trus.shape[0]

    def batch(self, index: Tensor | Sequence[int]) -> dict[str, Tensor]:
        """Model-ready float32 tensors for the samples ``index``.

        Returns:
            ``trus``, ``mri`` (B, 1, h, w); ``mri_labels`` (B, 2, h, w) one-hot as
            ``regseg.planes.mri_inputs`` gives them; ``labels`` (B, h, w) int64; ``label_maps``
            (B, 2, h, w) the same one-hot maps of the true labels; ``theta`` (B, 2, 3).
        """
        index = torch.as_tensor(index, dtype=torch.long)
        labels = self.labels[index].long()
        return {
            "trus": self.trus[index].float(),
            "mri": self.mri[index].float(),
            "mri_labels": planes.labels_onehot(self.mri_labels[index]),
            "labels": labels,
            "label_maps": planes.labels_onehot(labels[:, None]),
            "theta": self.theta[index].float(),
        }

    def save(self, path: str | Path) -> None:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["frame_hw"] = list(self.frame_hw)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        torch.save(data, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> SampleSet:
        data = torch.load(path, map_location="cpu", weights_only=True)
        data["frame_hw"] = tuple(data["frame_hw"])
        return cls(**data)

    @classmethod
    def concat(cls, sets: Sequence[SampleSet]) -> SampleSet:
        if not sets:
            raise InputError("SampleSet.concat: no sample sets to concatenate")
        merged = {f.name: torch.cat([getattr(s, f.name) for s in sets])
                  for f in fields(cls) if f.name != "frame_hw"}
        return cls(**merged, frame_hw=sets[0].frame_hw)


def mri_tensors(phantom: Any) -> tuple[Tensor, Tensor, np.ndarray]:
    """A case's MRI and labels as the live path holds them.

    Returns:
        mri (1, 1, K, J, I) float32 in [0, 1] (``normalise_intensity``), labels (1, 1, K, J, I)
        uint8, and world_to_voxel (4, 4).
    """
    mri = torch.from_numpy(normalise_intensity(phantom.mri.data).transpose(2, 1, 0).copy())
    labels = torch.from_numpy(np.ascontiguousarray(phantom.labels.data.transpose(2, 1, 0)))
    return mri[None, None], labels[None, None], spatial.invert(phantom.mri.voxel_to_world)


def frame_sample(frame: Any, mri: Tensor, labels: Tensor, world_to_voxel: np.ndarray,
                 size: tuple[int, int]) -> dict[str, Tensor]:
    """One simulated frame on the model grid (the fields of :class:`SampleSet`, batch of 1)."""
    frame_hw = tuple(frame.pixels.shape)
    trus = planes.trus_input(torch.from_numpy(np.ascontiguousarray(frame.pixels)), size)
    mri_plane, lab_onehot = planes.mri_inputs(mri, labels, world_to_voxel,
                                              frame.image_to_reference, frame_hw, size)
    truth = torch.from_numpy(np.ascontiguousarray(frame.truth.labels))[None, None].float()
    # nearest-exact picks the frame pixel whose centre is nearest the model pixel's centre
    # (align_corners=False geometry, as everywhere in regseg).
    truth = F.interpolate(truth, size=size, mode="nearest-exact")[:, 0].to(torch.uint8)
    theta = true_theta(frame.image_to_reference, frame.truth.image_to_mri, frame_hw)
    return {
        "trus": trus.half(),
        "mri": mri_plane.half(),
        "mri_labels": (lab_onehot[:, :1] + lab_onehot[:, 1:]).to(torch.uint8),
        "labels": truth,
        "theta": torch.from_numpy(theta).float()[None],
        "tracked_image_to_mri": torch.from_numpy(np.asarray(frame.image_to_reference,
                                                            np.float64))[None],
        "true_image_to_mri": torch.from_numpy(np.asarray(frame.truth.image_to_mri,
                                                         np.float64))[None],
        "frame_hws": torch.tensor([list(frame_hw)], dtype=torch.long),
    }


def generate_samples(phantom_seeds: Sequence[int], frames_per_phantom: int, *,
                     size: tuple[int, int], seed: int = 0,
                     open_scanner: OpenScanner = open_simulated_scanner,
                     progress: bool = True, desc: str = "frames") -> SampleSet:
    """Render ``frames_per_phantom`` random frames of every phantom seed.

    Args:
        phantom_seeds: the cases; keep training and validation seeds apart.
        frames_per_phantom: random frames (poses, tracking errors, deformations) per case.
        size: model grid (h, w).
        seed: seeds the scanners and frame draws, together with each phantom seed.
        open_scanner: ``(phantom_seed, scanner_seed) -> (phantom, scanner)``; the simulated
            scanner by default, a stand-in in tests.
    """
    rows: list[dict[str, Tensor]] = []
    # One thread: rendering is many small tensor ops, where a second thread costs more in
    # synchronisation than it gains (measured 25 ms vs 30-250 ms per frame on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bar = tqdm(total=len(phantom_seeds) * frames_per_phantom, desc=desc, disable=not progress,
               unit="frame", leave=False)
    frame_hw = None
    try:
        for phantom_seed in phantom_seeds:
            phantom, scanner = open_scanner(int(phantom_seed),
                                            int(seed * 100_003 + phantom_seed))
            mri, labels, world_to_voxel = mri_tensors(phantom)
            rng = np.random.default_rng([int(seed), int(phantom_seed)])
            for _ in range(frames_per_phantom):
                frame = scanner.random_frame(rng)
                frame_hw = frame_hw or tuple(frame.pixels.shape)
                row = frame_sample(frame, mri, labels, world_to_voxel, size)
                row["phantom_seed"] = torch.tensor([int(phantom_seed)])
                rows.append(row)
                bar.update()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    if frame_hw is None:
        raise InputError("generate_samples: no frames requested (no phantom seeds or "
                         "frames_per_phantom = 0)")
    merged = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
    return SampleSet(**merged, frame_hw=frame_hw)


def cached_samples(cache_dir: str | Path | None, phantom_seeds: Sequence[int],
                   frames_per_phantom: int, *, size: tuple[int, int], seed: int = 0,
                   open_scanner: OpenScanner = open_simulated_scanner,
                   progress: bool = True, desc: str = "frames") -> SampleSet:
    """:func:`generate_samples`, loaded from ``cache_dir`` when the same set was made before.

    The cache key covers every argument that changes the samples plus :data:`DATA_VERSION`;
    a custom ``open_scanner`` (a test stand-in) is never cached. ``cache_dir=None`` disables it.
    """
    names = [k for k, v in CACHEABLE_SCANNERS.items() if v is open_scanner]
    cacheable = cache_dir is not None and bool(names)
    if cacheable:
        fields_ = {"v": DATA_VERSION, "seeds": [int(s) for s in phantom_seeds],
                   "n": frames_per_phantom, "size": list(size), "seed": seed}
        if names[0] != "plain":  # plain keys stay as they were, so old caches still load
            fields_["scanner"] = names[0]
        key = json.dumps(fields_)
        path = Path(cache_dir) / f"samples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            return SampleSet.load(path)
    samples = generate_samples(phantom_seeds, frames_per_phantom, size=size, seed=seed,
                               open_scanner=open_scanner, progress=progress, desc=desc)
    if cacheable:
        samples.save(path)
    return samples
