"""bench/latency.py: the regseg command line of each variant, and its argument check."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("latency")


ARGS = SimpleNamespace(device="cpu", threads=1, engine_threads=None, backend="auto",
                       precision="fp32")


@pytest.mark.parametrize("kind, deformable, overlap", [
    ("regseg", "off", "off"), ("regseg+deformable", "async", "off"),
    ("regseg+deformable+overlap", "async", "on")])
def test_each_variant_runs_the_cli_with_its_flags(bench, kind, deformable, overlap):
    from regseg.stream.cli_parser import DEFORMABLE_DEFAULT

    assert DEFORMABLE_DEFAULT == "async"  # the deformable rows run the CLI's default
    cmd = bench.pipeline_command(kind, ARGS, (Path("m.nii"), Path("l.nii")), 1, 2, 10,
                                 Path("s.json"))
    assert cmd[cmd.index("--deformable") + 1] == deformable
    assert cmd[cmd.index("--overlap") + 1] == overlap


@pytest.mark.parametrize("mode", ["on", "async"])
def test_deformable_mode_sets_the_deformable_rows_only(bench, mode):
    args = SimpleNamespace(**vars(ARGS), deformable_mode=mode)
    case = (Path("m.nii"), Path("l.nii"))
    for kind, expected in (("regseg", "off"), ("regseg+deformable", mode)):
        cmd = bench.pipeline_command(kind, args, case, 1, 2, 10, Path("s.json"))
        assert cmd[cmd.index("--deformable") + 1] == expected


def test_overlap_without_deformable_exits_2(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--overlap", "--json", "/nonexistent/x.json"])
    assert exc.value.code == 2
    assert "--overlap compares the deformable chain" in capsys.readouterr().err


def test_lc2_is_passed_to_every_regseg_variant_only_when_given(bench):
    case = (Path("m.nii.gz"), Path("l.nii.gz"))
    plain = bench.pipeline_command("regseg+deformable", ARGS, case, 1, 2, 10, Path("s.json"))
    assert "--lc2" not in plain  # the CLI's own default
    given = SimpleNamespace(**vars(ARGS), lc2="fast")
    cmd = bench.pipeline_command("regseg", given, case, 1, 2, 10, Path("s.json"))
    assert cmd[cmd.index("--lc2") + 1] == "fast"
    naive = bench.pipeline_command("naive", SimpleNamespace(**vars(ARGS), lc2="off",
                                                            naive_threads=2), case, 1, 2, 10,
                                   Path("s.json"))
    assert "--lc2" not in naive
