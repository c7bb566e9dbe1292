"""On-disk cache of built engine artifacts (ONNX files, TensorRT programs), keyed by content.

The key covers everything that changes what a backend builds (../shared/notes/engines.md §6-7:
Holoscan's key misses the model content and MONAI's uses file mtimes, both of which serve stale
engines): a hash of the weights *and* the architecture's config, of the source of the code that
computes the model (:func:`code_hash`), the input shapes, precision,
backend, device (name and compute capability for CUDA) and the versions of every library that
takes part in the build. One entry is a folder ``<root>/<backend>/<key[:20]>/`` holding the
artifact and a ``manifest.json`` with the key's fields, so a person can see why two entries differ.

Integrity: the manifest also records the SHA-256 of every file of the entry, taken when it was
built; a hit re-hashes them (an ONNX file of a few MB hashes in milliseconds). A file changed,
truncated, added or removed since (disk fault, a stray copy, tampering) makes the entry a miss that
is rebuilt, logged once and reported in the engine's info (``cache: "rebuilt: ..."``): a wrong
artifact is never run. An entry written before digests existed is rebuilt the same way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Distributions whose versions enter the key (absent ones are recorded as None).
KEY_LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "torch-tensorrt", "tensorrt")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/regseg/engines`` (``~/.cache/regseg/engines`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "regseg" / "engines"


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's class, config and every state-dict tensor (name, dtype, shape, bytes).

    Buffers count (BatchNorm running statistics change the outputs). Tensors are hashed on the CPU
    in float32-or-native bytes, so the same weights give the same hash on any device.
    """
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    h.update(repr(getattr(model, "config", None)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def code_hash(model: nn.Module) -> str:
    """SHA-256 of the source of the regseg modules that define ``model``'s layers, and of the
    regseg modules those import from (one level: e.g. regseg.spatial's samplers, the velocity
    integration). Weights and config alone miss a change to the code that computes the graph: an
    edited forward would keep serving the graph exported before it. Non-regseg classes (MONAI,
    torch) are covered by their library versions, or not at all (MONAI)."""
    own = {type(m).__module__ for m in model.modules()}
    own = {n for n in own if n.split(".")[0] == "regseg"}
    names = set(own)
    for name in own:
        for value in vars(sys.modules[name]).values():
            origin = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__",
                                                                             None)
            if isinstance(origin, str) and origin.split(".")[0] == "regseg":
                names.add(origin)
    h = hashlib.sha256()
    for name in sorted(names):
        path = getattr(sys.modules.get(name), "__file__", None)
        if path and Path(path).is_file():
            h.update(name.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Installed versions of :data:`KEY_LIBRARIES`, plus Python's and CUDA's (None if absent)."""
    out: dict[str, str | None] = {}
    for dist in KEY_LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = platform.python_version()
    out["cuda"] = torch.version.cuda
    return out


def device_description(device: torch.device) -> str:
    """What a built engine is tied to: CPU architecture, or GPU name and compute capability.

    TensorRT plans are specific to the GPU model (notes/engines.md §1.10), hence the name and
    capability; ONNX files are portable, but a per-device key costs nothing and keeps it simple.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    return f"{device.type}:{platform.machine()}"


def cache_key(model_hash: str, input_shapes: dict[str, tuple[int, ...]], *, precision: str,
              backend: str, device: torch.device, extra: dict[str, Any] | None = None,
              code: str | None = None) -> tuple[str, dict[str, Any]]:
    """The key (hex SHA-256) and the fields it was made from (stored as the manifest).

    Args:
        model_hash: :func:`weights_hash` of the model.
        input_shapes: name -> shape, in the engine's input order.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        backend: the backend name.
        device: where the engine runs.
        extra: backend build options that change the artifact (opset, outputs kept, ...).
        code: :func:`code_hash` of the model (None: not keyed on code).
    """
    fields = {
        "model": model_hash,
        "inputs": {k: list(v) for k, v in input_shapes.items()},
        "precision": precision,
        "backend": backend,
        "device": device_description(device),
        "versions": library_versions(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "extra": extra or {},
    }
    if code is not None:
        fields["code"] = code
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), fields


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in ``folder`` (recursively) but the manifest, by relative path."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == "manifest.json":
            continue
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


class ArtifactCache:
    """Folders of built artifacts under ``root``; counts hits and misses.

    ``fetch(backend, key, fields, filename, build)`` returns the artifact's path: the cached one on
    a hit, else ``build(tmp_path)`` writes it into a private temporary folder that is renamed into
    place, so a crash mid-build or two processes building at once never leave a half-written
    artifact under the key.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0  # entries whose files no longer matched their recorded digests
        #: How the last fetch went: "hit", "miss" or "rebuilt: <why>" (for engine info).
        self.last = ""

    def entry(self, backend: str, key: str) -> Path:
        """The folder of one entry (it may not exist)."""
        return self.root / backend / key[:20]

    def fetch(self, backend: str, key: str, fields: dict[str, Any], filename: str,
              build: Callable[[Path], None]) -> tuple[Path, bool]:
        """Path of the artifact ``filename`` for ``key``, building it on a miss.

        Returns:
            (path, hit): ``hit`` is True when the artifact came from the cache.
        """
        folder = self.entry(backend, key)
        path = folder / filename
        manifest = folder / "manifest.json"
        why = None
        if path.is_file() and manifest.is_file():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, ValueError):
                stored = {}
            if stored.get("key") == key:  # a 20-character prefix collision is not a hit
                why = _digest_mismatch(folder, stored.get("sha256"))
                if why is None:
                    self.hits += 1
                    self.last = "hit"
                    return path, True
                self.rebuilt += 1
                log.warning("engine cache: %s: %s; rebuilding it", folder, why)
        self.misses += 1
        self.last = f"rebuilt: {why}" if why else "miss"
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:20]}.", dir=folder.parent))
        build(tmp / filename)
        (tmp / "manifest.json").write_text(json.dumps(
            {"key": key, **fields, "sha256": file_digests(tmp)}, indent=2, sort_keys=True) + "\n")
        if folder.exists():  # a stale or foreign entry: replace it whole
            _remove_tree(folder)
        try:
            tmp.rename(folder)
        except OSError:  # another process renamed its build in first: use theirs, drop ours
            _remove_tree(tmp)
        return path, False


def _digest_mismatch(folder: Path, recorded: dict[str, str] | None) -> str | None:
    """Why ``folder``'s files differ from the ``recorded`` digests; None when they all match."""
    if not recorded:
        return "no digest recorded (an entry from before digests)"
    found = file_digests(folder)
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was added after the build"
        if found[name] != recorded[name]:
            return (f"{name} changed since it was built (sha256 {found[name][:12]}..., "
                    f"recorded {recorded[name][:12]}...)")
    return None


def _remove_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    folder.rmdir()
