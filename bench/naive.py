"""The naive baseline: the live chain as a newcomer would write it, for side-by-side benchmarks.

pyigtl's OpenIGTLinkClient (its own thread, ``wait_for_message`` polling with 10 ms sleeps),
then MONAI's GlobalNet (affine) + LocalNet (deformable) + UNet (segmentation) at the frame's full
256 x 256, eager fp32, one call after another, the MRI resliced with the label volume converted
to float on every frame, an overlay blended in numpy and sent back with pyigtl's
OpenIGTLinkServer. Random weights: only the time is measured, and time does not depend on the
values. Run as its own process by bench/latency.py, or import :func:`build_naive_nets`.

    python bench/naive.py --mri case.nii.gz --mri-labels labels.nii.gz \
        --source-port 18944 --serve-port 18945 --max-frames 100 --stats-json out/naive.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def build_naive_nets(size: int = 256) -> dict[str, nn.Module]:
    """MONAI GlobalNet, LocalNet and UNet, 2-D, sized as in MONAI's own 2-D tutorials.

    GlobalNet/LocalNet follow MONAI's MedNIST registration tutorial (16 initial channels, depth 3);
    the UNet is MONAI's common 2-D segmentation configuration (16..128 channels, 2 residual units).
    """
    from monai.networks.blocks import Warp
    from monai.networks.nets import GlobalNet, LocalNet, UNet

    return {
        "globalnet": GlobalNet(image_size=(size, size), spatial_dims=2, in_channels=2,
                               num_channel_initial=16, depth=3).eval(),
        "localnet": LocalNet(spatial_dims=2, in_channels=2, out_channels=2,
                             num_channel_initial=16, extract_levels=(0, 1, 2, 3)).eval(),
        "unet": UNet(spatial_dims=2, in_channels=2, out_channels=3, channels=(16, 32, 64, 128),
                     strides=(2, 2, 2), num_res_units=2).eval(),
        "warp": Warp(mode="bilinear", padding_mode="border"),
        "warp_nearest": Warp(mode="nearest", padding_mode="border"),
    }


def process(nets: dict[str, nn.Module], pixels: np.ndarray, pose: np.ndarray, mri, labels,
            world_to_voxel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One frame, the newcomer's way: (labels (H, W) uint8, overlay (H, W, 3) uint8)."""
    from regseg import spatial

    hw = pixels.shape
    with torch.no_grad():
        trus = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None, None].to(mri.device)
        mri_plane = spatial.reslice(mri, world_to_voxel, pose, hw)
        label_plane = spatial.reslice(labels, world_to_voxel, pose, hw, mode="nearest").float()
        ddf = nets["globalnet"](torch.cat([mri_plane, trus], dim=1))
        moved = nets["warp"](mri_plane, ddf)
        moved_labels = nets["warp_nearest"](label_plane, ddf)
        ddf2 = nets["localnet"](torch.cat([moved, trus], dim=1))
        moved = nets["warp"](moved, ddf2)
        moved_labels = nets["warp_nearest"](moved_labels, ddf2)
        logits = nets["unet"](torch.cat([trus, moved], dim=1))
        seg = logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
    overlay = np.stack([pixels] * 3, axis=-1)
    overlay[seg == 1] = (0.6 * overlay[seg == 1] + [0, 100, 0]).astype(np.uint8)
    overlay[seg == 2] = (0.6 * overlay[seg == 2] + [100, 0, 0]).astype(np.uint8)
    overlay[moved_labels[0, 0].cpu().numpy() > 0, 2] = 255
    return seg, overlay


def main(argv: list[str] | None = None) -> int:
    import pyigtl

    from regseg.imageio import load_labels, load_mri, normalise_intensity
    from regseg.planes import volume_tensor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mri", required=True)
    ap.add_argument("--mri-labels", required=True)
    ap.add_argument("--source-port", type=int, required=True)
    ap.add_argument("--serve-port", type=int, required=True)
    ap.add_argument("--max-frames", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: the naive chain on the same GPU")
    ap.add_argument("--stats-json", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    mri_vol = load_mri(args.mri)
    mri = volume_tensor(normalise_intensity(mri_vol.data), args.device)
    labels = volume_tensor(load_labels(args.mri_labels, like=mri_vol).data.astype(np.uint8),
                           args.device)
    world_to_voxel = np.linalg.inv(mri_vol.voxel_to_world)
    nets = {k: v.to(args.device) for k, v in build_naive_nets(256).items()}
    server = pyigtl.OpenIGTLinkServer(port=args.serve_port, local_server=True)
    client = pyigtl.OpenIGTLinkClient(host="127.0.0.1", port=args.source_port)
    processing_ms: list[float] = []
    try:
        while len(processing_ms) < args.max_frames:
            message = client.wait_for_message("Image_Reference", timeout=30)
            if message is None:
                break
            start = time.perf_counter()
            pixels = np.ascontiguousarray(message.image.reshape(message.image.shape[-2:]))
            _, overlay = process(nets, pixels, np.asarray(message.ijk_to_world_matrix), mri,
                                 labels, world_to_voxel)
            processing_ms.append((time.perf_counter() - start) * 1e3)
            server.send_message(pyigtl.ImageMessage(overlay[None], device_name="Overlay",
                                                    timestamp=message.timestamp,
                                                    ijk_to_world_matrix=message.ijk_to_world_matrix),
                                wait=True)
    finally:
        client.stop()
        server.stop()
    Path(args.stats_json).write_text(json.dumps({"frames": len(processing_ms),
                                                 "processing_ms": processing_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
