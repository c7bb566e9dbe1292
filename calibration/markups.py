"""3D Slicer markups (landmarks): ``.mrk.json`` and the legacy ``.fcsv``, read and written in RAS.

Slicer 5 writes both in LPS by default (``"coordinateSystem": "LPS"``, ``# CoordinateSystem =
LPS``); older ``.fcsv`` say ``0`` (RAS) or ``1`` (LPS). We return RAS mm and write LPS, as Slicer
does. Formats: https://slicer.readthedocs.io/en/latest/developer_guide/modules/markups.html and
the markups JSON schema (``markups-schema-v1.0.3.json``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regseg.calibration.transforms_io import write_atomic
from regseg.errors import InputError

_FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
          "Resources/Schema/markups-schema-v1.0.3.json#")


@dataclass(frozen=True)
class Landmarks:
    labels: list[str]
    points_ras: np.ndarray  # (N, 3) mm


def _system(value: str, path: Path) -> np.ndarray:
    v = str(value).strip().upper()
    if v in ("RAS", "0"):
        return np.ones(3)
    if v in ("LPS", "1"):
        return _FLIP
    raise InputError(f"{path}: coordinate system {value!r}; RAS or LPS expected")


def _read_json(path: Path) -> Landmarks:
    expected = "markups[0].controlPoints[].position (3 numbers each) expected"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        markup = doc["markups"][0]
        points = markup["controlPoints"]
        if not isinstance(markup, dict) or not isinstance(points, list) or not all(
                isinstance(p, dict) for p in points):
            raise TypeError("markups[0] or its controlPoints are not JSON objects")
        sign = _system(markup.get("coordinateSystem", "LPS"), path)
        units = markup.get("coordinateUnits", "mm")
        if units != "mm":
            raise InputError(f"{path}: coordinateUnits {units!r}; mm expected")
        labels = [str(p.get("label", f"F-{n + 1}")) for n, p in enumerate(points)]
        for label, p in zip(labels, points, strict=True):
            status = p.get("positionStatus", "defined")
            if status != "defined":
                raise InputError(f"{path}: control point {label!r} has positionStatus "
                                 f"{status!r}; every point placed ('defined') expected. Place "
                                 "or delete it in Slicer.")
            if not isinstance(p["position"], list) or len(p["position"]) != 3:
                raise InputError(f"{path}: control point {label!r} position "
                                 f"{str(p['position'])[:80]}; {expected}")
        xyz = np.array([[float(v) for v in p["position"]] for p in points], dtype=np.float64)
    except InputError:
        raise
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply; {expected}") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError) as exc:
        raise InputError(f"{path}: not a Slicer markups JSON with control points ({exc!r}); "
                         f"{expected}") from None
    return Landmarks(labels, xyz.reshape(-1, 3) * sign)


def _read_fcsv(path: Path) -> Landmarks:
    sign, columns = _FLIP, None  # Slicer >= 4.11 default: LPS
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc}); a UTF-8 .fcsv is expected") from None
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip() == "CoordinateSystem":
                sign = _system(value, path)
            elif key.strip() == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(line)
    columns = columns or ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock",
                          "label", "desc", "associatedNodeID"]
    labels, xyz = [], []
    for n, row in enumerate(csv.reader(io.StringIO("\n".join(rows)))):
        record = dict(zip(columns, row, strict=False))
        try:
            xyz.append([float(record[k]) for k in ("x", "y", "z")])
        except (KeyError, ValueError):
            raise InputError(f"{path}: point {n + 1} {row!r}; numbers in columns x, y, z "
                             "expected") from None
        labels.append(record.get("label") or f"F-{n + 1}")
    return Landmarks(labels, np.array(xyz, dtype=np.float64).reshape(-1, 3) * sign)


def read_landmarks(path: str | os.PathLike) -> Landmarks:
    """Landmarks in RAS mm from ``.mrk.json``/``.json`` or ``.fcsv``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(".json"):
        marks = _read_json(path)
    elif name.endswith(".fcsv"):
        marks = _read_fcsv(path)
    else:
        raise InputError(f"{path}: not a markups file name; .mrk.json or .fcsv expected")
    if not np.isfinite(marks.points_ras).all():
        raise InputError(f"{path}: a landmark position is not a finite number")
    return marks


def write_landmarks(path: str | os.PathLike, labels, points_ras) -> Path:
    """Write landmarks as Slicer does (LPS): ``.mrk.json`` or ``.fcsv`` by the name."""
    xyz = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3) * _FLIP
    labels = list(labels)
    name = str(path).lower()
    if name.endswith(".fcsv"):
        lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = LPS",
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for n, (label, p) in enumerate(zip(labels, xyz, strict=True)):
            writer.writerow([f"vtkMRMLMarkupsFiducialNode_{n}", *(repr(float(v)) for v in p),
                             0, 0, 0, 1, 1, 1, 0, label, "", ""])
        return write_atomic(path, "\n".join(lines) + "\n" + out.getvalue())
    if not name.endswith(".json"):
        raise InputError(f"{path}: not a markups file name; .mrk.json or .fcsv expected")
    points = [{"id": str(n + 1), "label": label, "position": [float(v) for v in p],
               "positionStatus": "defined"} for n, (label, p) in enumerate(zip(labels, xyz,
                                                                                strict=True))]
    doc = {"@schema": SCHEMA, "markups": [{"type": "Fiducial", "coordinateSystem": "LPS",
                                           "coordinateUnits": "mm", "controlPoints": points}]}
    return write_atomic(path, json.dumps(doc, indent=2) + "\n")


def pair_landmarks(a: Landmarks, b: Landmarks, what_a: str, what_b: str
                   ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pair two landmark sets: by label when both have the same set of unique labels, else by
    order (then the counts must match). Returns (labels, points of a, points of b)."""
    if len(set(a.labels)) == len(a.labels) and set(a.labels) == set(b.labels):
        index = {label: n for n, label in enumerate(b.labels)}
        return a.labels, a.points_ras, b.points_ras[[index[label] for label in a.labels]]
    if len(a.labels) != len(b.labels):
        raise InputError(f"{what_a} has {len(a.labels)} landmarks and {what_b} "
                         f"{len(b.labels)}; the same landmarks in both (paired by label or "
                         "order) are expected")
    return a.labels, a.points_ras, b.points_ras
