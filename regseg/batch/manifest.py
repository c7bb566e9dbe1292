"""The manifest of a batch job: one case per CSV row or JSONL line, checked before any work.

A case is a flat ``{column: value}`` dict with a unique ``name`` (its output folder). Paths in
file columns are relative to the manifest's own folder (as ``regseg register --pairs`` reads
them), so a manifest travels with its data. Structural faults (no header, a missing required
value, a duplicate or unsafe name, a bad JSON line) stop the job before it starts (exit 2, the
line named); a file that is missing or unreadable is found per case at run time, recorded in the
results and skipped, so one bad case never ends a job of thousands.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from regseg.errors import InputError

Case = dict[str, str]
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: What the job itself writes in its output folder: no case may take these names.
RESERVED = ("logs", "results.jsonl", "results.jsonl.tmp", "summary.json")


def _rows_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise InputError(f"{path}: empty CSV; a header line with the column names is "
                             "expected first")
        rows = []
        for n, row in enumerate(reader):
            line = n + 2  # the header is line 1
            if None in row:  # DictReader puts the fields beyond the header under None
                raise InputError(f"{path} line {line}: {len(row) - 1 + len(row[None])} fields, "
                                 f"more than the header's {len(row) - 1}")
            rows.append((line, row))
    return rows


def _rows_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {line}: not JSON ({exc.msg} at column {exc.colno}); "
                             "one JSON object per line is expected") from None
        except RecursionError:
            raise InputError(f"{path} line {line}: JSON nested too deeply; one flat object per "
                             "line is expected") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} line {line}: a JSON {type(row).__name__}; one object per "
                             'line is expected, e.g. {"fixed": "a.nii.gz", "moving": "b.nii.gz"}')
        rows.append((line, row))
    return rows


def read_manifest(path: str | Path, required: tuple[str, ...], file_columns: tuple[str, ...]
                  ) -> list[Case]:
    """The cases of a ``.csv`` or ``.jsonl`` manifest, in order, paths resolved.

    Args:
        required: columns every case must fill.
        file_columns: columns that hold paths (resolved against the manifest's folder).
    Returns:
        cases as ``{column: str}`` with ``name`` always set (``case00000``... when absent).
    Raises:
        InputError: unreadable manifest, unknown suffix, no cases, a missing required value,
            a duplicate or unsafe name; the message names the file, the line and the value.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found (a .csv with a header, or .jsonl)")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise InputError(f"{path}: manifest suffix {suffix or '(none)'!r}; .csv or .jsonl "
                         "is expected")
    try:
        rows = _rows_csv(path) if suffix == ".csv" else _rows_jsonl(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read the manifest ({exc}); UTF-8 text is expected"
                         ) from None
    if not rows:
        raise InputError(f"{path}: no cases; one case per row (columns {list(required)})")
    cases: list[Case] = []
    lines: dict[str, int] = {}
    for n, (line, row) in enumerate(rows):
        missing = [c for c in required if not str(row.get(c) or "").strip()]
        if missing:
            raise InputError(f"{path} line {line}: no value for {missing} (row {row}); every "
                             f"case needs {list(required)}. Nothing was run.")
        case = {str(k): str(v).strip() for k, v in row.items() if v is not None and str(v)}
        case["name"] = case.get("name") or f"case{n:05d}"
        name = case["name"]
        if not SAFE_NAME.match(name):
            raise InputError(f"{path} line {line}: name {name!r} cannot name an output folder; "
                             "use letters, digits, '.', '_' and '-' (not first)")
        if name in RESERVED:
            raise InputError(f"{path} line {line}: name {name!r} is taken by the job's own "
                             f"outputs ({', '.join(RESERVED)}); rename the case")
        if name in lines:
            raise InputError(f"{path} line {line}: name {name!r} is used on line {lines[name]} "
                             "too; names name the output folders and must differ")
        lines[name] = line
        for column in file_columns:
            if case.get(column):
                p = Path(case[column]).expanduser()
                case[column] = str(p if p.is_absolute() else path.parent / p)
        cases.append(case)
    return cases


def case_digest(job: str, case: Case, options: dict[str, Any]) -> str:
    """What a case's outputs were made from (its row and the job's options), as sha256 hex:
    a finished case whose recorded digest differs is run again."""
    text = json.dumps({"job": job, "case": case, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
