"""bench/readme_tables.py: the README's measured tables come from JSON, with machine and date."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import readme_tables  # noqa: E402

MARKER = ('<!-- table src="r/a.json,r/b.json" labels="run A|run B" label_header="run" '
          'where="quick=true" cols="name=variant | p50_ms=p50 ms:.1f | ok=ok" -->\n')


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "r").mkdir()
    for name, p50 in (("a", 12.345), ("b", 7.0)):
        (tmp_path / "r" / f"{name}.json").write_text(json.dumps({
            "command": f"python bench/x.py --{name}", "machine": "CPU X (2 cores)",
            "date": "2026-11-30 15:00 UTC",
            "results": [{"name": "fast", "p50_ms": p50, "quick": True, "ok": True},
                        {"name": "full", "p50_ms": 99.0, "quick": False, "ok": None}]}))
    return tmp_path


def test_renders_rows_filters_labels_and_provenance(tree):
    text = readme_tables.regenerate(MARKER + "stale\n<!-- /table -->\n", tree)
    assert "| run A | fast | 12.3 | yes |" in text and "| run B | fast | 7.0 | yes |" in text
    assert "full" not in text and "stale" not in text  # filtered; old body replaced
    assert "`r/a.json`: CPU X (2 cores), 2026-11-30 15:00 UTC, `python bench/x.py --a`" in text
    assert readme_tables.regenerate(text, tree) == text  # idempotent


def test_check_fails_on_a_typed_number(tree):
    readme = tree / "README.md"
    readme.write_text(readme_tables.regenerate(MARKER + "<!-- /table -->\n", tree))
    typed = readme.read_text().replace("12.3", "9.9")
    assert readme_tables.regenerate(typed, tree) != typed


def test_bad_marker_names_what_is_wrong(tree):
    with pytest.raises(readme_tables.TableError, match="No closing quotation"):
        readme_tables.regenerate('<!-- table src="r/a.json -->\n<!-- /table -->', tree)
    with pytest.raises(readme_tables.TableError, match="no cols= attribute"):
        readme_tables.regenerate('<!-- table src="r/a.json" -->\n<!-- /table -->', tree)
    with pytest.raises(readme_tables.TableError, match="r/missing.json"):
        readme_tables.regenerate('<!-- table src="r/missing.json" cols="a=b" -->\n'
                                 '<!-- /table -->', tree)


def test_the_readme_tables_are_what_their_json_gives():
    """Every generated table in README.md and docs/*.md matches its committed JSON."""
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs, "docs/*.md not found"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_tables.py"),
                          str(ROOT / "README.md"), *map(str, docs), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("up to date") == 1 + len(docs)


def test_an_object_of_objects_gives_a_row_per_key(tree):
    (tree / "r" / "m.json").write_text(json.dumps({"mni": {"regseg": {"dice": 0.81},
                                                           "ants": {"dice": 0.8}}}))
    text = readme_tables.regenerate('<!-- table src="r/m.json" rows="mni" '
                                    'cols="name=method | dice=Dice:.2f" -->\n<!-- /table -->',
                                    tree)
    assert "| regseg | 0.81 |" in text and "| ants | 0.80 |" in text
    text = readme_tables.regenerate('<!-- table src="r/m.json" rows="mni" where="name!=ants" '
                                    'cols="name=method | dice=Dice:.2f" -->\n<!-- /table -->',
                                    tree)
    assert "| regseg | 0.81 |" in text and "ants" not in text.split("-->", 1)[1]


def test_a_pipe_in_a_value_stays_inside_its_cell(tree):
    (tree / "r" / "p.json").write_text(json.dumps({"results": [{"metric": "|lag error| ms"}]}))
    text = readme_tables.regenerate('<!-- table src="r/p.json" cols="metric=metric" -->\n'
                                    '<!-- /table -->', tree)
    row = next(line for line in text.splitlines() if "lag error" in line)
    assert row == "| \\|lag error\\| ms |"  # an escaped pipe: still one cell


def test_the_load_average_a_json_records_is_shown_with_its_table(tree):
    data = json.loads((tree / "r" / "a.json").read_text())
    data["load_average"] = [3.94, 2.5, 1.04]
    (tree / "r" / "a.json").write_text(json.dumps(data))
    text = readme_tables.regenerate(MARKER + "<!-- /table -->\n", tree)
    assert ("`r/a.json`: CPU X (2 cores), 2026-11-30 15:00 UTC, load average 3.9 / 2.5 / 1.0 "
            "(1 / 5 / 15 min), `python bench/x.py --a`") in text
    assert "`r/b.json`: CPU X (2 cores), 2026-11-30 15:00 UTC, `python" in text  # none recorded


def test_write_json_records_the_load_average(tmp_path):
    import common

    common.write_json(tmp_path / "x.json", "x", [{"name": "a"}], argv=[])
    load = json.loads((tmp_path / "x.json").read_text())["load_average"]
    assert isinstance(load, list) and len(load) == 3 and all(v >= 0 for v in load)


def test_meta_names_where_the_provenance_is(tree):
    (tree / "r" / "w.json").write_text(json.dumps({
        "command": "python train.py", "cal": {"command": "python calibrate.py", "date": "D1",
                                              "rows": {"k1": {"t": 2.5}, "k2": {"t": 1.8}}}}))
    marker = ('<!-- table src="r/w.json" rows="cal.rows" meta="cal" '
              'cols="name=chain | t=t:.1f" -->\n')
    text = readme_tables.regenerate(marker + "<!-- /table -->\n", tree)
    assert "| k1 | 2.5 |" in text and "| k2 | 1.8 |" in text
    assert "`r/w.json`: machine not recorded, D1, `python calibrate.py`" in text


def test_a_slash_key_reads_the_rows_method_from_another_object(tree):
    (tree / "r" / "m.json").write_text(json.dumps({
        "dice": {"a": {"coarse": 0.9}, "b": {"coarse": 0.8}},
        "seconds": {"a": 1.5, "b": 40.0}}))
    marker = ('<!-- table src="r/m.json" rows="dice" cols="name=method | coarse=Dice:.2f | '
              '/seconds.{name}=s:.1f | /missing.{name}=x" -->\n')
    text = readme_tables.regenerate(marker + "<!-- /table -->\n", tree)
    assert "| a | 0.90 | 1.5 | – |" in text and "| b | 0.80 | 40.0 | – |" in text


def test_where_takes_alternatives(tree):
    marker = ('<!-- table src="r/a.json" where="name=fast|full" cols="name=variant" -->\n'
              '<!-- /table -->\n<!-- table src="r/a.json" where="name!=fast|full" '
              'cols="name=variant" -->\n<!-- /table -->\n')
    first, second = readme_tables.regenerate(marker, tree).split("<!-- /table -->")[:2]
    assert "| fast |" in first and "| full |" in first
    assert "| fast |" not in second and "| full |" not in second


def test_pivot_turns_long_rows_into_a_column_per_level(tree):
    (tree / "r" / "c.json").write_text(json.dumps({"results": [
        {"name": "K1", "level": 3.0, "tre": 0.75}, {"name": "K1", "level": 12.5, "tre": 5.9},
        {"name": "K2", "level": 3.0, "tre": 0.78}, {"name": "K2", "level": 12.5, "tre": 1.8}]}))
    marker = ('<!-- table src="r/c.json" pivot="name,level,tre" where="name!=K2" '
              'cols="name=K | 3=3 mm:.2f | 12.5=12.5 mm:.1f" -->\n')
    text = readme_tables.regenerate(marker + "<!-- /table -->\n", tree)
    assert "| K | 3 mm | 12.5 mm |" in text and "| K1 | 0.75 | 5.9 |" in text
    assert "| K2 |" not in text
    with pytest.raises(readme_tables.TableError, match="pivot"):
        readme_tables.regenerate(marker.replace('pivot="name,level,tre"', 'pivot="name"')
                                 + "<!-- /table -->\n", tree)
