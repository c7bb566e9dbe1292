"""Shared fixtures of the live-chain tests."""

from __future__ import annotations

import dataclasses

import pytest

#: A scanner without tracking error or out-of-plane motion: the pose is the frame's true plane.
STILL = dict(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
             out_of_plane_mm=0.0)


@pytest.fixture(scope="session")
def tracked_still():
    """``make(phantom_seed, scanner_seed, indices) -> (context, frames)``: a family-A phantom's
    context and frames of a still scanner, each tracked at its true plane."""
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner
    from regseg.stream.context import build_context

    def make(phantom_seed: int, scanner_seed: int, indices):
        phantom = make_phantom(phantom_seed)
        context = build_context(phantom.mri, phantom.labels)
        scanner = SimulatedScanner(phantom, ScannerConfig(**STILL), seed=scanner_seed)
        frames = []
        for i in indices:
            f = scanner.frame(i)
            frames.append(dataclasses.replace(f, image_to_reference=f.truth.image_to_mri))
        return context, frames

    return make
