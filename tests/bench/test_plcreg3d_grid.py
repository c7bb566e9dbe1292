"""bench/plcreg3d_grid.py: one forward pass of the 3-D recipe's model per grid, timed, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import plcreg3d_grid  # noqa: E402


def test_rows_per_grid_and_backend_with_the_ratio_to_the_coarsest(tmp_path, capsys):
    out = tmp_path / "grid.json"
    rc = plcreg3d_grid.main(["--spacing", "6.5", "5.0", "--backend", "eager", "--repeats", "2",
                             "--threads", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["size"] for r in rows] == [[24, 32, 24], [32, 48, 32]]  # (K, J, I), multiples of 8
    assert all(r["backend"] == "eager" and r["median_s"] > 0 and len(r["times_s"]) == 2
               for r in rows)
    assert rows[0]["vs_coarsest"] == 1.0
    assert rows[1]["vs_coarsest"] == round(rows[1]["median_s"] / rows[0]["median_s"], 2)
    assert "s / pair" in capsys.readouterr().out


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert plcreg3d_grid.main(["--repeats", "0", "--json", str(tmp_path / "x.json")]) == 2
    assert plcreg3d_grid.main(["--spacing", "-1", "--json", str(tmp_path / "x.json")]) == 2
    assert "--spacing" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
