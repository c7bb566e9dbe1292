"""Named models: the registry from names to (config class, model class), and weight loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from regseg.errors import EngineError, InputError
from regseg.models.affine3d import Affine3D, Affine3DConfig
from regseg.models.alignsegnet import AlignSegNet, AlignSegNetConfig
from regseg.models.ascseg import ASCSeg, ASCSegConfig
from regseg.models.biregnet import BiRegNet, BiRegNetConfig
from regseg.models.checkpoint import load_state, read_checkpoint
from regseg.models.plcreg import PLCReg, PLCRegConfig
from regseg.models.simnet import SimNet, SimNetConfig
from regseg.models.warpseg import WarpSeg, WarpSegConfig

#: name -> (config dataclass, model class built from it).
MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "alignsegnet": (AlignSegNetConfig, AlignSegNet),
    # deformable; shipped weights plcreg2d.pt (live) and plcreg3d.pt (offline), see
    # regseg.engines.registration.SHIPPED
    "plcreg": (PLCRegConfig, PLCReg),
    # 2-D TRUS segmentation; shipped weights ascseg.pt (fused) and ascseg_trus.pt (TRUS only)
    "ascseg": (ASCSegConfig, ASCSeg),
    # per-voxel atlas trust for multi-atlas label fusion (engines/label_fusion.py, issue 11)
    "simnet": (SimNetConfig, SimNet),
    # cross-modality MRI <-> 3-D TRUS registration (regseg.crossmodal, issue 11)
    "biregnet": (BiRegNetConfig, BiRegNet),
    # 3-D coarse/fine segmentation; shipped warpseg_prostate.pt, see regseg.engines.warpseg.SHIPPED
    "warpseg": (WarpSegConfig, WarpSeg),
    # learned 3-D affine stage of offline registration; shipped affine3d.pt (engines/affine.py)
    "affine3d": (Affine3DConfig, Affine3D),
}

WEIGHTS_DIR = Path(__file__).parent / "weights"


def _lookup(name: str) -> tuple[type, type[nn.Module]]:
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None


def build_config(name: str, **config: Any) -> Any:
    """The config dataclass of model ``name`` with ``config`` overriding its defaults.

    Raises:
        InputError: unknown model name or config field (the message lists the valid fields).
    """
    config_cls, _ = _lookup(name)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise InputError(f"{name}: unknown config field(s) {unknown}; valid fields: "
                         f"{sorted(fields)}")
    return config_cls(**config)


def build_model(name: str, **config: Any) -> nn.Module:
    """A freshly initialised model ``name``, its config built by :func:`build_config`."""
    _, model_cls = _lookup(name)
    return model_cls(build_config(name, **config))


def default_weights_path(name: str) -> Path:
    """Where the shipped weights of model ``name`` live: ``<package>/models/weights/<name>.pt``."""
    _lookup(name)
    return WEIGHTS_DIR / f"{name}.pt"


def load_model(path_or_name: str | Path) -> nn.Module:
    """Build a model from a checkpoint and load its weights strictly; returned in eval mode.

    Args:
        path_or_name: a checkpoint path, or a registered model name for its shipped weights.
    Raises:
        EngineError: missing/corrupt file, unknown model or config in it, or weights that do not
            fit (each message names the file).
    """
    path = (default_weights_path(str(path_or_name)) if str(path_or_name) in MODELS
            else Path(path_or_name))
    checkpoint = read_checkpoint(path)
    try:
        model = build_model(checkpoint["model"], **checkpoint["config"])
    except InputError as exc:
        raise EngineError(f"{path}: checkpoint names a model this regseg cannot build: "
                          f"{exc}") from exc
    load_state(model, checkpoint["state_dict"], path)
    return model.eval()
