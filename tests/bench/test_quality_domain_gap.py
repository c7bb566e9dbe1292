"""bench/quality_domain_gap.py: its scores, its refusal of evaluation cases, its family-B pairs."""

import numpy as np
import pytest

from regseg.errors import InputError


def test_scores_separability_bias_and_own_threshold(load_bench):
    bench = load_bench("quality_domain_gap")
    tre = np.array([0.5, 1.0, 1.5, 2.0, 6.0, 7.0, 8.0, 9.0, 3.0])
    separated = bench.scores(tre + 3.0, tre)  # biased by +3 mm, still ordered
    assert separated["auc"] == 1.0 and separated["bias_good_mm"] == pytest.approx(3.0)
    assert separated["false_alarm_at_own_95"] == 0.0 and (separated["bad"], separated["good"]) \
        == (4, 4)
    blind = bench.scores(np.full_like(tre, 2.5), tre)  # one value for every pair: no separation
    assert blind["auc"] == pytest.approx(0.5) and blind["false_alarm_at_own_95"] == 1.0
    inverted = bench.scores(10.0 - tre, tre)
    assert inverted["auc"] == 0.0 and inverted["false_alarm_at_own_95"] == 1.0
    none_bad = bench.scores(tre[:4], tre[:4])
    assert np.isnan(none_bad["auc"]) and (none_bad["bad"], none_bad["good"]) == (0, 4)


def test_family_b_evaluation_cases_are_refused_before_any_work(load_bench, capsys):
    bench = load_bench("quality_domain_gap")
    with pytest.raises(InputError, match="5042.*evaluation seeds 5000-5099"):
        bench.check_b_training_seeds([5400, 5042])
    bench.check_b_training_seeds([5200, 5408])  # outside: accepted
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--b-train", "5090-5110"])
    assert exit_.value.code == 2 and "--b-train 5090" in capsys.readouterr().err


def test_family_b_pairs_carry_the_known_error(load_bench):
    bench = load_bench("quality_domain_gap")
    pairs = bench.pairs("B", [5408], frames=2, errors=3, seed=0)
    assert pairs["trus"].shape == (6, 1, 64, 64) and pairs["mri"].shape == (6, 1, 64, 64)
    tre = pairs["tre_mm"].numpy()
    assert np.isfinite(tre).all() and (tre >= 0).all() and len(set(tre.round(3))) == 6
    assert set(pairs["seed"].tolist()) == {5408}
    assert (pairs["mri_labels"] > 0).any()  # the MRI gland is in the perturbed plane's view
    again = bench.pairs("B", [5408], frames=2, errors=3, seed=0)
    assert np.array_equal(again["tre_mm"].numpy(), tre)  # reproducible


def test_mixes_name_known_sources(load_bench):
    bench = load_bench("quality_domain_gap")
    assert bench.parse_mix("A+Arand+B") == ["A", "Arand", "B"]
    assert bench.parse_mix("A+Arand+C") == ["A", "Arand", "C"]  # C: regseg.sim.restyle
    with pytest.raises(ValueError, match="unknown source 'D'"):
        bench.parse_mix("A+D")


def test_run_scores_every_model_on_both_families(load_bench):
    bench = load_bench("quality_domain_gap")
    out = bench.run({"A": [3000], "Arand": [3200], "B": [5200]}, [3732], [5408],
                    mixes=["A", "A+Arand", "B"], frames=2, errors=3, steps=2, progress=False)
    names = [(r["model"], r["test_family"]) for r in out["rows"]]
    assert names == [(m, f) for m in ("shipped", "trained on A", "trained on A+Arand",
                                      "trained on B") for f in ("A", "B")]
    assert all(r["bad"] + r["good"] <= 6 for r in out["rows"])
    for row in out["rows"]:  # the threshold from family A's pairs, the same for both families
        same_model = [r for r in out["rows"] if r["model"] == row["model"]]
        assert len({r["a_threshold_mm"] for r in same_model}) == 1
