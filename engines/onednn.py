"""Convolutions through oneDNN on CPU, where torch's own choice falls back to its slow kernels.

torch picks a CPU convolution kernel by heuristics; for the small 3-D feature maps of our networks
(e.g. 16 -> 16 channels at 24 x 32 x 24, or one input channel at 48 x 64 x 48) this torch build
chooses ``slow_conv3d`` (im2col + matmul), which measured 4-10x slower here than oneDNN's
``mkldnn_convolution`` on the same tensors (session 12: 22.2 vs 2.4 ms, 8.5 vs 1.5 ms, 13.8 vs
3.0 ms on 2 cores; equal to 2e-6). :func:`prefer_onednn` routes a model's convolutions to oneDNN
for float32 inference on CPU and leaves everything else (gradients, autocast, CUDA, ONNX export)
to torch's own path. 2-D convolutions are left alone: there torch's choice was as fast or faster
(PLCReg 2-D at 64 x 64: 23.2 ms as torch chose, 27.0 ms all through oneDNN; AlignSegNet at 128 x
128: 16.3 vs 17.7 ms).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def available() -> bool:
    """Whether this torch build has oneDNN (``torch.backends.mkldnn``) for CPU convolutions."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.aten,
                                                                    "mkldnn_convolution")


class OneDNNConv3d(nn.Conv3d):
    """An ``nn.Conv3d`` whose float32 CPU inference runs oneDNN's convolution; everything else
    (gradients, autocast, CUDA, tracing and export) runs ``nn.Conv3d``'s own. :func:`prefer_onednn`
    turns a model's convolutions into it in place (a class change: parameters, state dict, copies
    and pickles behave as before)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling()):
            return super().forward(x)
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), self.weight, self.bias,
                                                 list(self.padding), list(self.stride),
                                                 list(self.dilation), self.groups)


def prefer_onednn(model: nn.Module) -> int:
    """Route ``model``'s zero-padded 3-D convolutions to oneDNN for float32 CPU inference, in
    place (each becomes a :class:`OneDNNConv3d`; parameters and state dict untouched). Returns how
    many were routed now (0 where this torch has no oneDNN; a second call routes none again)."""
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is nn.Conv3d and module.padding_mode == "zeros"
                and not isinstance(module.padding, str)):
            module.__class__ = OneDNNConv3d
            count += 1
    return count
