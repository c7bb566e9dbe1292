"""Regenerate the README's measured tables from the JSON the benches wrote, instead of typing them.

A generated table sits between two markers in the Markdown::

    <!-- table src="bench/results/latency.json" rows="results" where="quick=true"
         cols="name=variant | p50_ms=p50 ms:.1f | ratio_p50_vs_naive=× naive:.1f" -->
    ... (written by this script) ...
    <!-- /table -->

- ``src``: one or more JSON files (comma separated), relative to the repository root.
- ``rows``: where the rows are in each file: a dotted key path to a list of objects (default
  ``results``, what ``bench/common.write_json`` writes), to an object of objects (a row per key,
  the key as ``name``), or ``.`` for the whole file as one row (a ``--stats-json`` summary).
- ``cols``: ``|``-separated ``key=header[:format]``; a key may be dotted into nested objects
  (``latency_ms.p50``); a key starting with ``/`` is a path from the file's top in which
  ``{name}`` stands for the row's name (``/seconds_per_volume.{name}``). ``label=TEXT`` in
  ``labels`` (``|``-separated, one per file) adds a first column naming each file's rows.
- ``meta``: optional dotted key path to the object holding ``machine``, ``date`` and ``command``
  when they are not at the top (a weights JSON's calibration section, say).
- ``pivot``: optional ``"ROW,COLUMN,VALUE"``: long rows (one per ROW and COLUMN value) become
  one row per ROW (as ``name``) with a column per COLUMN value (``cols`` names them: ``3=3 mm``).
- ``where``: optional ``key=value`` / ``key!=value`` filters (``,``-separated, all must hold) on
  the rows; ``key=a|b`` matches either value.

Below each table the script writes which machine, when and by what command each source was
measured (the JSON's ``machine``, ``date``, ``load_average`` and ``command``, which
``bench/common.write_json`` records), so a reader can tell a stale table from a fresh one.
``--check`` exits 1 if the README differs from what the JSON gives (a test runs it), so a number
typed into a generated table is caught.

    python bench/readme_tables.py README.md            # rewrite the tables in place
    python bench/readme_tables.py README.md --check    # exit 1 if any table is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table (?P<attrs>.*?)-->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


class TableError(ValueError):
    """A marker that cannot be rendered: names the attribute, the value and what was expected."""


def parse_attrs(text: str) -> dict[str, str]:
    """``key="value"`` pairs of a marker (shell-style quoting)."""
    attrs = {}
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise TableError(f"table marker {text[:80]!r}: {exc} (key=\"value\" pairs "
                         "expected)") from None
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise TableError(f"table marker attribute {token!r}: key=\"value\" expected")
        attrs[key] = value
    for key in ("src", "cols"):
        if key not in attrs:
            raise TableError(f"table marker {text.strip()!r}: no {key}= attribute")
    return attrs


def dig(obj: Any, path: str) -> Any:
    """``obj`` followed along a dotted key path (``.`` is ``obj`` itself); None when absent."""
    if path in ("", "."):
        return obj
    if isinstance(obj, dict) and path in obj:  # a key with dots in it ("12.5")
        return obj[path]
    for key in path.split("."):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and key.lstrip("-").isdigit():
            obj = obj[int(key)]
        else:
            return None
    return obj


def lookup(data: Any, row: dict, key: str) -> Any:
    """A column's value: ``key`` dotted into the row, or, starting with ``/``, into the whole file
    with ``{name}`` replaced by the row's name (``/hd95_mm.{name}``: results a bench keyed by
    method in several objects)."""
    if key.startswith("/"):
        return dig(data, key[1:].replace("{name}", str(row.get("name"))))
    return dig(row, key)


def pivot(rows: list[dict], spec: str) -> list[dict]:
    """Long rows to wide ones: ``spec`` ``"ROW,COLUMN,VALUE"`` (keys of each row) gives one row
    per ROW value (as ``name``, first-seen order) holding VALUE under the COLUMN value's text
    (``3.0`` -> ``"3"``, ``12.5`` -> ``"12.5"``)."""
    keys = [k.strip() for k in spec.split(",")]
    if len(keys) != 3:
        raise TableError(f"pivot={spec!r}: \"row,column,value\" keys expected")
    wide: dict[Any, dict] = {}
    for row in rows:
        column = dig(row, keys[1])
        text = format(column, "g") if isinstance(column, float) else str(column)
        wide.setdefault(dig(row, keys[0]), {})[text] = dig(row, keys[2])
    return [{"name": name, **values} for name, values in wide.items()]


def cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec and isinstance(value, int | float):
        return format(value, spec)
    return str(value).replace("|", "\\|")  # a pipe would end the Markdown cell


def _matches(row: dict, where: str) -> bool:
    for clause in filter(None, (c.strip() for c in where.split(","))):
        negate = "!=" in clause
        key, _, want = clause.partition("!=" if negate else "=")
        got = dig(row, key.strip())
        text = json.dumps(got) if isinstance(got, bool) else str(got)
        if (text in [w.strip() for w in want.split("|")]) == negate:
            return False
    return True


def render(attrs: dict[str, str], root: Path = ROOT) -> str:
    """The Markdown of one table (rows, then its provenance lines)."""
    cols = []
    for spec in attrs["cols"].split("|"):
        key, sep, rest = spec.strip().partition("=")
        if not sep:
            raise TableError(f"cols entry {spec.strip()!r}: key=header[:format] expected")
        header, _, fmt = rest.partition(":")
        cols.append((key.strip(), header.strip(), fmt.strip()))
    sources = [s.strip() for s in attrs["src"].split(",") if s.strip()]
    labels = attrs["labels"].split("|") if "labels" in attrs else None
    if labels is not None and len(labels) != len(sources):
        raise TableError(f"labels has {len(labels)} entries for {len(sources)} src files")
    header = ([attrs.get("label_header", "")] if labels else []) + [h for _, h, _ in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for n, src in enumerate(sources):
        path = root / src
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TableError(f"{src}: cannot read the table's JSON ({exc})") from None
        rows = dig(data, attrs.get("rows", "results"))
        if isinstance(rows, dict) and rows and all(isinstance(v, dict) for v in rows.values()):
            rows = [{"name": k, **v} for k, v in rows.items()]  # {method: {...}}: a row each
        rows = [rows] if isinstance(rows, dict) else rows
        if not isinstance(rows, list):
            raise TableError(f"{src}: rows={attrs.get('rows', 'results')!r} is not a list of "
                             "objects in it")
        if "pivot" in attrs:
            rows = pivot(rows, attrs["pivot"])
        for row in (r for r in rows if _matches(r, attrs.get("where", ""))):
            cells = ([labels[n].strip()] if labels else []) + [cell(lookup(data, row, k), f)
                                                               for k, _, f in cols]
            lines.append("| " + " | ".join(cells) + " |")
        meta = dig(data, attrs.get("meta", "."))
        meta = meta if isinstance(meta, dict) else {}
        machine = meta.get("machine") or "machine not recorded"
        date = meta.get("date") or "date not recorded"
        command = meta.get("command")
        load = meta.get("load_average")
        load_text = (f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
                     "(1 / 5 / 15 min)" if isinstance(load, list) and len(load) == 3 else "")
        notes.append(f"`{src}`: {machine}, {date}{load_text}"
                     + (f", `{command}`" if command else ""))
    return "\n".join(lines) + "\n\n" + "".join(f"<sub>{n}</sub><br>\n" for n in notes)


def regenerate(text: str, root: Path = ROOT) -> str:
    def one(match: re.Match) -> str:
        return match.group(1) + render(parse_attrs(match.group("attrs")), root) + match.group(4)
    return BLOCK.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("markdown", type=Path, nargs="+",
                   help="the Markdown files (README.md docs/*.md)")
    p.add_argument("--check", action="store_true", help="exit 1 if a table is out of date")
    args = p.parse_args(argv)
    stale = 0
    for path in args.markdown:
        try:
            text = path.read_text()
            new = regenerate(text)
        except (OSError, TableError) as exc:
            print(f"readme_tables: error: {path}: {exc}", file=sys.stderr)
            return 2
        count = len(BLOCK.findall(text))
        if args.check:
            if new != text:
                print(f"readme_tables: {path}: generated tables are out of date; run "
                      f"python bench/readme_tables.py {path}", file=sys.stderr)
                stale += 1
            else:
                print(f"{path}: {count} generated table(s) up to date")
            continue
        path.write_text(new)
        print(f"{path}: {count} generated table(s) rewritten")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
