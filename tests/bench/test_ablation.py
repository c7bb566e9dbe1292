"""bench/ablation.py: the child commands of each variant, and its summary read from the committed
session-25 runs (the README's "What each default stage costs and buys" figures)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("ablation")


def test_each_variant_turns_its_stage_off_in_both_children(bench):
    args = SimpleNamespace(a_seeds=[3552, 3553], b_seeds=[5240], levels="0,3", frames=10,
                           phantoms=2)
    cmd = bench.accuracy_command("lc2_off", args, Path("a.json"))
    assert cmd[cmd.index("--lc2") + 1] == "off" and "--a-seeds" in cmd
    assert cmd[cmd.index("--b-seeds") + 1] == "5240" and cmd[cmd.index("--levels") + 1] == "0,3"
    assert "--lc2" not in bench.accuracy_command("default", args, Path("a.json"))
    assert bench.latency_command("resegment_off", Path("l.json"))[-4:-2] == ["--resegment", "off"]
    # the deformable stage's time is latency.py's other row: no flag of its own there
    lat = bench.latency_command("deformable_off", Path("l.json"))
    assert "--deformable" in lat and "off" not in lat


def _load(name):
    return json.loads((RESULTS / name).read_text())


def test_the_summary_of_the_session_25_runs(bench):
    accuracy = {v: bench.accuracy_of(_load(f"ablation_s25_{v}.json"))
                for v in ("default", "lc2_off", "resegment_off", "seg_prior_off",
                          "deformable_off")}
    latency = {v: [_load(f"latency_s25_ablation_{v}_{r}.json") for r in (1, 2)]
               for v in ("default", "lc2_off", "resegment_off", "seg_prior_off")}
    rows = {r["stage"]: r for r in bench.summarise(accuracy, latency)}
    lc2 = rows["LC2 refinement"]
    assert lc2["b_tre_mm_buys"] == pytest.approx(1.14 - 3.17, abs=0.01)  # lower TRE: negative
    assert lc2["b_dice_buys"] == pytest.approx(0.753 - 0.683, abs=0.001)
    assert lc2["e2e_cost_ms"] == pytest.approx(64.25 - 31.1, abs=0.05)  # medians of two rounds
    deformable = rows["deformable stage"]
    assert deformable["e2e_cost_ms"] == pytest.approx(64.25 - 47.35, abs=0.05)
    assert deformable["b_tre_mm_buys"] > 0  # on family B it raises the TRE (README)
    assert deformable["a_dice_registered_buys"] == pytest.approx(0.979 - 0.958, abs=0.001)
    assert rows["MRI labels as a prior"]["b_lesion_buys"] == pytest.approx(0.374 - 0.328,
                                                                            abs=0.001)
    assert rows["segmentation at the published plane"]["flag"] == "--resegment off"
    # a variant without a latency run has no cost, not a wrong one
    no_latency = bench.summarise(accuracy, {"default": latency["default"]})
    assert "e2e_cost_ms" not in {r["stage"]: r for r in no_latency}["LC2 refinement"]


def test_rounds_below_one_exit_2(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--rounds", "0", "--out", "/nonexistent/x", "--json", "/nonexistent/x.json"])
    assert exc.value.code == 2 and "--rounds 0" in capsys.readouterr().err
