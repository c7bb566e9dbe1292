"""Probe spatial calibration with an N-wire phantom: wire dots in B-mode -> ImageToProbe.

Frames: ``Image`` in pixels (i = column, j = row, k = 0), ``Probe`` (the probe's marker) and
``Phantom`` in mm; ``image_to_probe`` therefore carries the pixel size (PLUS's convention). Each
frame cuts the three N-wires of the phantom; the middle dot of each N lies on the diagonal wire,
and its distance ratio between the two outer dots fixes where on the diagonal (similar triangles),
so each N gives one point known both in pixels and, through PhantomToTracker and the frame's
ProbeToTracker, in the probe frame. A least-squares fit of those pairs is the calibration.

References:
    Pagoulatos et al., "Calibration and validation of free-hand 3D ultrasound systems based on
    DC magnetic tracking", SPIE 3335, 1998, and Chen et al., "Fully automatic and robust
    ultrasound calibration with N-wire phantoms", IJCARS 2009 (N-wire principle); Carbajal et
    al., IJCARS 2013 and PLUS fCal (phantom fCal 2.0: three N-wires 10 mm apart). The wire
    coordinates below are our own, after fCal 2.0's layout; the dot detector (threshold,
    components, weighted centroids, rows by depth) is our own choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from regseg.errors import InputError


@dataclass(frozen=True)
class NWire:
    """One N in the phantom frame (mm): two parallel wires and the diagonal between them."""

    first: tuple[np.ndarray, np.ndarray]  # (front, back) end points of the first parallel wire
    diagonal: tuple[np.ndarray, np.ndarray]
    last: tuple[np.ndarray, np.ndarray]


def _n(z: float, x0: float, flip: bool) -> NWire:
    a, c = x0, x0 + 30.0
    d0, d1 = (c - 5.0, a + 5.0) if not flip else (a + 5.0, c - 5.0)
    p = lambda x, y: np.array([x, y, z], dtype=np.float64)  # noqa: E731
    return NWire((p(a, 0), p(a, 40)), (p(d0, 0), p(d1, 40)), (p(c, 0), p(c, 40)))


#: Our fCal-2.0-like phantom: three N-wires in planes z = 0, 10, 20 mm, wires along +y (0..40 mm),
#: parallel wires 30 mm apart; the image plane is meant to cut them across (about the x-z plane).
FCAL2_WIRES: tuple[NWire, ...] = (_n(0.0, 30.0, False), _n(10.0, 35.0, True), _n(20.0, 30.0, False))


def middle_point_phantom(wire: NWire, ratio: float) -> np.ndarray:
    """Where the diagonal is cut, given |first dot - middle dot| / |first dot - last dot|.

    The three dots are collinear in the N's plane (the image plane meets it in a line), and the
    ratio of distances along a line is kept by any affine map, so the pixel ratio gives the x of
    the middle dot between the parallel wires; the diagonal then gives its y.
    """
    a, c = wire.first[0], wire.last[0]
    x = a[0] + ratio * (c[0] - a[0])
    d0, d1 = wire.diagonal
    t = (x - d0[0]) / (d1[0] - d0[0])
    return d0 + t * (d1 - d0)


def intersect_wires(image_to_phantom: np.ndarray, wires=FCAL2_WIRES) -> np.ndarray:
    """(3 * len(wires), 2) pixel (i, j) where the image plane cuts each wire (first, diagonal,
    last per N), for ground truth and simulation; NaN where a wire is parallel to the plane."""
    normal = np.cross(image_to_phantom[:3, 0], image_to_phantom[:3, 1])
    origin = image_to_phantom[:3, 3]
    inverse = np.linalg.inv(image_to_phantom)
    out = []
    for wire in wires:
        for p0, p1 in (wire.first, wire.diagonal, wire.last):
            denom = normal @ (p1 - p0)
            if abs(denom) < 1e-12:
                out.append([np.nan, np.nan])
                continue
            hit = p0 + (normal @ (origin - p0)) / denom * (p1 - p0)
            out.append((inverse[:3, :3] @ hit + inverse[:3, 3])[:2])
    return np.asarray(out)


def detect_dots(pixels: np.ndarray, n_rows: int = 3, *, threshold: float | None = None,
                min_area_px: int = 4) -> np.ndarray | None:
    """The N-wire dots of one B-mode frame, (n_rows, 3, 2) pixel (i, j), or None.

    Bright connected blobs (above ``threshold``, default the mean plus 5 standard deviations of
    the frame's non-zero pixels, at least 100) are found; their intensity-weighted centroids are
    the dots. The frame is used only when exactly ``3 * n_rows`` blobs are found; they are split
    into rows by depth (j) and ordered by column (i) in each row.
    """
    img = np.asarray(pixels, dtype=np.float64)
    if threshold is None:
        inside = img[img > 0]
        threshold = max(float(inside.mean() + 5.0 * inside.std()) if inside.size else 100.0, 100.0)
    labels, count = ndimage.label(img > threshold)
    if count == 0:
        return None
    areas = ndimage.sum_labels(np.ones_like(img), labels, np.arange(1, count + 1))
    keep = [k + 1 for k in range(count) if areas[k] >= min_area_px]
    if len(keep) != 3 * n_rows:
        return None
    weight = np.where(labels > 0, img - threshold, 0.0)
    centres = np.array(ndimage.center_of_mass(weight, labels, keep))[:, ::-1]  # (j, i) -> (i, j)
    rows = centres[np.argsort(centres[:, 1])].reshape(n_rows, 3, 2)
    rows = np.stack([row[np.argsort(row[:, 0])] for row in rows])
    # Rows must be separated in depth more than they spread within: else the grouping is a guess.
    spread = np.ptp(rows[:, :, 1], axis=1).max()
    gaps = np.diff(rows[:, :, 1].mean(1))
    if n_rows > 1 and gaps.min() < 2 * spread:
        return None
    return rows


def wire_points(dots: np.ndarray, wires=FCAL2_WIRES) -> tuple[np.ndarray, np.ndarray]:
    """From one frame's dots (rows, 3, 2): the middle dots' pixels (rows, 2) and their phantom
    positions (rows, 3) mm."""
    pixels, phantom = [], []
    for row, wire in zip(dots, wires, strict=True):
        ratio = np.linalg.norm(row[1] - row[0]) / np.linalg.norm(row[2] - row[0])
        pixels.append(row[1])
        phantom.append(middle_point_phantom(wire, ratio))
    return np.asarray(pixels), np.asarray(phantom)


@dataclass(frozen=True)
class ProbeCalibration:
    """What :func:`solve_image_to_probe` found."""

    image_to_probe: np.ndarray  # (4, 4): pixel (i, j, 0, 1) -> probe mm; columns 0, 1 = scales
    pixel_mm: tuple[float, float]  # (column i, row j) size
    residuals_mm: np.ndarray  # (N,) reprojection distances of the inlier points
    inliers: np.ndarray  # (N,) bool

    @property
    def rms_mm(self) -> float:
        return float(np.sqrt(np.mean(self.residuals_mm ** 2)))


def _matrix(x: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    r = Rotation.from_rotvec(x[:3]).as_matrix()
    m[:3, 0], m[:3, 1], m[:3, 2] = r[:, 0] * x[3], r[:, 1] * x[4], r[:, 2]
    m[:3, 3] = x[5:8]
    return m


def solve_image_to_probe(pixels_ij, points_probe, *, reject_k: float = 3.0,
                         floor_mm: float = 0.5) -> ProbeCalibration:
    """ImageToProbe = rotation x diag(sx, sy, 1) + translation from paired points.

    First a linear affine fit of probe = A (i, j, 1) (exact for noiseless data), then the
    constrained 8-parameter model (rotation, two pixel sizes, translation) refined by
    Levenberg-Marquardt from it; points beyond ``max(reject_k * median, floor_mm)`` are dropped
    once and the fit repeated.

    Args:
        pixels_ij: (N, 2) pixel coordinates (i = column, j = row).
        points_probe: (N, 3) the same points in the probe frame, mm.
    Raises:
        InputError: fewer than 6 points, or points on one line in the image.
    """
    uv = np.asarray(pixels_ij, dtype=np.float64)
    xyz = np.asarray(points_probe, dtype=np.float64)
    if uv.ndim != 2 or uv.shape[1] != 2 or xyz.shape != (len(uv), 3) or len(uv) < 6:
        raise InputError(f"probe calibration: {uv.shape} pixels and {xyz.shape} points; (N, 2) "
                         "and (N, 3) with N >= 6 expected (image more frames of the phantom)")
    design = np.column_stack([uv, np.ones(len(uv))])
    if np.linalg.matrix_rank(design) < 3:
        raise InputError("probe calibration: the wire points lie on one line in the image; move "
                         "the probe so that the dots cover the image")
    inliers = np.ones(len(uv), dtype=bool)
    for _ in range(2):
        affine, *_ = np.linalg.lstsq(design[inliers], xyz[inliers], rcond=None)  # (3, 3)
        cu, cv = affine[0], affine[1]
        sx, sy = np.linalg.norm(cu), np.linalg.norm(cv)
        frame = np.column_stack([cu / sx, cv / sy, np.cross(cu, cv)])
        u, _, vt = np.linalg.svd(frame)
        rot = u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt  # nearest rotation
        x0 = np.concatenate([Rotation.from_matrix(rot).as_rotvec(), [sx, sy], affine[2]])

        def residual(x, keep=inliers):
            m = _matrix(x)
            return ((design[keep] @ m[:3, [0, 1, 3]].T) - xyz[keep]).ravel()

        x = optimize.least_squares(residual, x0, method="lm").x
        m = _matrix(x)
        dist = np.linalg.norm(design @ m[:3, [0, 1, 3]].T - xyz, axis=1)
        keep = dist <= max(reject_k * float(np.median(dist)), floor_mm)
        if np.array_equal(keep, inliers) or keep.sum() < 6:
            break
        inliers = keep
    return ProbeCalibration(m, (float(x[3]), float(x[4])), dist[inliers], inliers)


@dataclass(frozen=True)
class WireSamples:
    """Paired points from a tracked N-wire recording (:func:`collect_wire_points`)."""

    pixels_ij: np.ndarray  # (P, 2) middle dots, pixels
    points_probe: np.ndarray  # (P, 3) the same points in the probe frame, mm
    frame_of_point: np.ndarray  # (P,) frame index of each point
    used: np.ndarray  # (N,) bool: frames whose dots were all found


def collect_wire_points(frames, probe_to_tracker, phantom_to_tracker,
                        wires=FCAL2_WIRES) -> WireSamples:
    """Detect the dots in every frame and place the middle ones in the probe frame.

    Args:
        frames: (N, H, W) B-mode frames.
        probe_to_tracker: (N, 4, 4) the probe's tracked pose per frame (None rows: untracked).
        phantom_to_tracker: (4, 4) the phantom's registration (PhantomToTracker, or to Reference
            when the poses are ProbeToReference).
    """
    pix, pts, idx, used = [], [], [], np.zeros(len(frames), dtype=bool)
    for n, (pixels, pose) in enumerate(zip(frames, probe_to_tracker, strict=True)):
        if pose is None:
            continue
        dots = detect_dots(pixels, len(wires))
        if dots is None:
            continue
        uv, phantom = wire_points(dots, wires)
        phantom_to_probe = np.linalg.inv(pose) @ phantom_to_tracker
        pix.append(uv)
        pts.append(phantom @ phantom_to_probe[:3, :3].T + phantom_to_probe[:3, 3])
        idx += [n] * len(uv)
        used[n] = True
    if not pix:
        return WireSamples(np.zeros((0, 2)), np.zeros((0, 3)), np.zeros(0, dtype=int), used)
    return WireSamples(np.concatenate(pix), np.concatenate(pts), np.array(idx), used)


def reprojection_errors_mm(image_to_probe: np.ndarray, samples: WireSamples) -> np.ndarray:
    """(P,) distance between each middle dot mapped by ``image_to_probe`` and its wire point."""
    uv = samples.pixels_ij
    mapped = uv @ image_to_probe[:3, :2].T + image_to_probe[:3, 3]
    return np.linalg.norm(mapped - samples.points_probe, axis=1)
