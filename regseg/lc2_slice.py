"""The MRI resliced once per frame over the frame's plane, for the in-plane candidates of the
LC2 search (:mod:`regseg.lc2`, ``Lc2Config.plane_slice``; off: it failed its rule,
bench/results/lc2_predeclared.md addendum 3, and is kept, tested, for a later one)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import lc2_score, spatial


class PlaneSlice:
    """The MRI resliced once on a lattice over a frame's plane and a margin around the frame.

    An in-plane move of the plane moves its sample points within the plane, so the MRI at the moved
    plane is this slice resampled in 2-D (bilinear) instead of the volume resliced in 3-D: one
    3-D reslice per frame instead of one per candidate. The lattice is finer than the working grid
    (``step_px`` frame pixels), so the second interpolation smooths little (tested against the
    volume). ``index_to_frame`` (3, 3): lattice index (x, y, 1) -> frame pixel (i, j, 1).
    """

    def __init__(self, plane: np.ndarray, mri: Tensor, to_normalised: np.ndarray,
                 frame_hw: tuple[int, int], step_px: float, margin_px: tuple[float, float]) -> None:
        h, w = frame_hw
        self.size = (int(math.ceil((w - 1 + 2 * margin_px[0]) / step_px)) + 1,
                     int(math.ceil((h - 1 + 2 * margin_px[1]) / step_px)) + 1)  # (Ws, Hs)
        self.index_to_frame = np.array([[step_px, 0.0, -margin_px[0]],
                                        [0.0, step_px, -margin_px[1]], [0.0, 0.0, 1.0]])
        lift = np.zeros((4, 3))  # lattice (x, y, 1) -> frame pixel (i, j, 0, 1)
        lift[[0, 1, 3]] = self.index_to_frame
        m = torch.as_tensor((to_normalised @ plane @ lift)[:3].T, dtype=torch.float32,
                            device=mri.device)
        yy, xx = torch.meshgrid(torch.arange(self.size[1], dtype=torch.float32, device=mri.device),
                                torch.arange(self.size[0], dtype=torch.float32, device=mri.device),
                                indexing="ij")
        pts = torch.stack([xx, yy, torch.ones_like(xx)], -1)
        grid = (pts @ m).reshape(1, 1, self.size[1], self.size[0], 3)
        self.image = F.grid_sample(mri, grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)[0, 0, 0]  # (Hs, Ws)
        self.frame_to_index = np.linalg.inv(self.index_to_frame)
        # OpenCV resamples on the CPU (faster here; its bilinear weights are quantised to 1/32 of
        # a lattice step, ~0.01 mm): the torch path is what CUDA tensors take
        self._host = (self.image.numpy()
                      if lc2_score.OPENCV_ON_CPU and self.image.device.type == "cpu"
                      else None)

    def lattice_map(self, move: np.ndarray, work_to_frame: np.ndarray) -> np.ndarray | None:
        """(3, 3) working pixel -> lattice index for the plane moved by frame-pixel map ``move``
        (4, 4), or None when the move leaves the plane."""
        off = (abs(move[2, 0]) + abs(move[2, 1]) + abs(move[2, 2] - 1.0) + abs(move[2, 3])
               + abs(move[0, 2]) + abs(move[1, 2]))
        if not off < 1e-6:
            return None
        keep = [0, 1, 3]
        return self.frame_to_index @ (move @ work_to_frame)[np.ix_(keep, keep)]

    def inside(self, a: np.ndarray, hw: tuple[int, int]) -> bool:
        """Whether lattice map ``a`` takes the (H, W) working grid inside the lattice."""
        x = (a[0, 2], a[0, 2] + a[0, 0] * (hw[1] - 1), a[0, 2] + a[0, 1] * (hw[0] - 1),
             a[0, 2] + a[0, 0] * (hw[1] - 1) + a[0, 1] * (hw[0] - 1))
        y = (a[1, 2], a[1, 2] + a[1, 0] * (hw[1] - 1), a[1, 2] + a[1, 1] * (hw[0] - 1),
             a[1, 2] + a[1, 0] * (hw[1] - 1) + a[1, 1] * (hw[0] - 1))
        return min(x) >= 0 and min(y) >= 0 and max(x) <= self.size[0] - 1 and max(
            y) <= self.size[1] - 1

    def sample(self, maps: list[np.ndarray], hw: tuple[int, int]) -> Tensor:
        """(B, H, W) the slice on the (H, W) working grid through each lattice map (bilinear;
        the lattice's corners are its first and last samples)."""
        if self._host is not None:
            out = np.empty((len(maps), *hw), np.float32)
            for a, dst in zip(maps, out, strict=True):
                cv2.warpAffine(self._host, a[:2], (hw[1], hw[0]), dst=dst,
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
            return torch.from_numpy(out)
        to_unit = np.array([[2.0 / (self.size[0] - 1), 0.0, -1.0],
                            [0.0, 2.0 / (self.size[1] - 1), -1.0]])
        t = torch.as_tensor(np.stack([to_unit @ a for a in maps]), dtype=torch.float32,
                            device=self.image.device)[:, :, :, None, None]  # (B, 2, 3, 1, 1)
        dev = self.image.device
        a = torch.arange(hw[1], dtype=torch.float32, device=dev)[None, :]  # working column
        b = torch.arange(hw[0], dtype=torch.float32, device=dev)[:, None]  # working row
        grid = torch.stack([t[:, 0, 0] * a + t[:, 0, 1] * b + t[:, 0, 2],
                            t[:, 1, 0] * a + t[:, 1, 1] * b + t[:, 1, 2]], -1)  # (B, H, W, 2)
        src = self.image[None, None].expand(len(maps), -1, -1, -1)
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=True)[:, 0]


def slice_for_frame(frame_hw: tuple[int, int], plane: np.ndarray, mri: Tensor,
                    world_to_voxel: np.ndarray, grid_mm: float, margin_mm: float) -> PlaneSlice:
    """The :class:`PlaneSlice` of ``plane`` for a frame of ``frame_hw``: lattice step half the
    working pixel of a ``grid_mm`` grid, ``margin_mm`` around the frame."""
    spacing = spatial.plane_spacing(plane)
    f = max(1, int(round(grid_mm / min(spacing))))
    size = (mri.shape[4], mri.shape[3], mri.shape[2])
    to_normalised = spatial.index_to_normalised(size) @ world_to_voxel
    mri = mri if mri.is_floating_point() else mri.float()
    return PlaneSlice(plane, mri, to_normalised, frame_hw, f / 2.0,
                      (margin_mm / spacing[0], margin_mm / spacing[1]))
