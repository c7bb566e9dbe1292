"""What bench/gpu_check.sh ran on: GPU, driver-side CUDA, torch and the optional packages.

``python bench/gpu_env.py OUT.json`` writes it (and prints it); it needs no GPU to run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from pathlib import Path

import torch


def describe() -> dict:
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "packages": {name: importlib.util.find_spec(name) is not None
                     for name in ("monai", "nibabel", "onnxruntime", "triton", "cupy",
                                  "torch_tensorrt", "pyigtl", "zmq", "nilearn")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="JSON to write")
    args = p.parse_args(argv)
    env = describe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
