"""`regseg` refuses bad input with exit 2 and one paragraph, before any work: no pair of a batch
is registered (or written) when any row is bad."""

from __future__ import annotations

import gzip
import time

import nibabel as nib
import numpy as np
import pytest

from regseg.cli import build_parser, main
from regseg.models.registry import WEIGHTS_DIR


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    for name in ("fixed", "moving"):
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)),
                 str(d / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), str(d / "labels.nii.gz"))
    (d / "short.csv").write_text("fixed,moving,name\nfixed.nii.gz,moving.nii.gz,a\n"
                                 "fixed.nii.gz\n")
    (d / "long.csv").write_text("fixed,moving\nfixed.nii.gz,moving.nii.gz,extra\n")
    (d / "missing.csv").write_text("fixed,moving,name\nfixed.nii.gz,moving.nii.gz,a\n"
                                   "fixed.nii.gz,gone.nii.gz,b\n")
    (d / "dupes.csv").write_text("fixed,moving,name\nfixed.nii.gz,moving.nii.gz,a\n"
                                 "fixed.nii.gz,moving.nii.gz,a\n")
    (d / "badlm.csv").write_text("x,y\n1,2\n")
    (d / "lm.csv").write_text("fixed,moving,landmarks\nfixed.nii.gz,moving.nii.gz,badlm.csv\n")
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 512))
    header.set_data_dtype(np.float32)
    (d / "huge.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    (d / "huge.csv").write_text("fixed,moving\nfixed.nii.gz,huge.nii.gz\n")
    (d / "a_file").write_text("x")
    lm_header = "fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z\n"
    for name, body in (("nan", "1,2,3,nan,5,6\n"), ("word", "1,2,3,4,five,6\n"),
                       ("short", "1,2,3,4,5,6\n1,2\n")):  # all used to be a traceback or NaN TRE
        (d / f"lm_{name}.csv").write_text(lm_header + body)
        (d / f"pairs_lm_{name}.csv").write_text(f"fixed,moving,landmarks\nfixed.nii.gz,"
                                               f"moving.nii.gz,lm_{name}.csv\n")
    (d / "lm_bytes.csv").write_bytes(b"\xff\xfe\x00binary")
    (d / "pairs_bytes.csv").write_bytes(b"\xff\xfe\x00binary")
    (d / "escape.csv").write_text("fixed,moving,name\nfixed.nii.gz,moving.nii.gz,../escaped\n")
    (d / "absolute.csv").write_text("fixed,moving,name\nfixed.nii.gz,moving.nii.gz,/tmp/x\n")
    ddf = nib.Nifti1Header()
    ddf.set_data_shape((1024, 1024, 512, 1, 3))
    ddf.set_data_dtype(np.float32)
    (d / "huge_ddf.nii.gz").write_bytes(gzip.compress(ddf.binaryblock + b"\0" * 4))
    (d / "garbage.pt").write_bytes(b"nope")
    build_parser()  # imports torch and the training modules once, outside the timed cases
    return d


REG = ["register", "--fixed", "D/fixed.nii.gz", "--moving", "D/moving.nii.gz", "--out", "OUT"]
CASES = [
    ("short csv row", ["register", "--pairs", "D/short.csv", "--out", "OUT"],
     ["short.csv line 3", "no value for ['moving']", "Nothing was registered"]),
    ("long csv row", ["register", "--pairs", "D/long.csv", "--out", "OUT"],
     ["long.csv line 2", "more than the header's 2"]),
    ("missing file in row 2", ["register", "--pairs", "D/missing.csv", "--out", "OUT"],
     ["pair 'b'", "gone.nii.gz", "not found"]),
    ("duplicate pair names", ["register", "--pairs", "D/dupes.csv", "--out", "OUT"],
     ["'a' is used twice"]),
    ("bad landmarks", ["register", "--pairs", "D/lm.csv", "--out", "OUT"], ["badlm.csv",
                                                                              "header"]),
    ("absurd header size", ["register", "--pairs", "D/huge.csv", "--out", "OUT"],
     ["huge.nii.gz", "1024x1024x512 = 536,870,912 voxels", "limit is 67,108,864"]),
    ("weights of another model", [*REG, "--weights", str(WEIGHTS_DIR / "alignsegnet.pt")],
     ["model alignsegnet", "takes a checkpoint of model plcreg 3-D"]),
    ("2-D weights", [*REG, "--weights", "plcreg2d"], ["plcreg 2-D", "plcreg 3-D"]),
    ("garbage weights", [*REG, "--weights", "D/garbage.pt"], ["garbage.pt",
                                                              "not a readable regseg checkpoint"]),
    ("affine iterations negative", [*REG, "--affine-iterations", "-1"],
     ["--affine-iterations", "-1; at least 0"]),
    ("threads 0", [*REG, "--threads", "0"], ["--threads", "0; at least 1"]),
    ("bad device", [*REG, "--device", "banana"], ["'banana'"]),
    ("out under a file", [*REG[:-1], "D/a_file/out"], ["--out", "is a file, not a folder"]),
    ("fixed only", ["register", "--fixed", "D/fixed.nii.gz", "--out", "OUT"], ["--moving"]),
    ("eval json under a file", ["eval", "--fixed-labels", "D/labels.nii.gz", "--moved-labels",
                                "D/labels.nii.gz", "--json", "D/a_file/m.json"], ["--json"]),
    ("mni pairs 0", ["mni", "--out", "OUT", "--pairs", "0"], ["--pairs", "0; at least 1"]),
    ("phantom out under a file", ["phantom", "--out", "D/a_file/case"], ["is a file"]),
    ("phantom seed negative", ["phantom", "--out", "OUT", "--seed", "-1"], ["--seed"]),
    ("unknown task", ["fly"], ["invalid choice: 'fly'"]),
    ("landmark NaN", ["register", "--pairs", "D/pairs_lm_nan.csv", "--out", "OUT"],
     ["lm_nan.csv line 2", "'nan'", "six finite numbers"]),
    ("landmark not a number", ["register", "--pairs", "D/pairs_lm_word.csv", "--out", "OUT"],
     ["lm_word.csv line 2", "'five'", "six finite numbers"]),
    ("landmark short row", ["register", "--pairs", "D/pairs_lm_short.csv", "--out", "OUT"],
     ["lm_short.csv line 3", "None", "six finite numbers"]),
    ("landmark binary", ["eval", "--fixed-labels", "D/labels.nii.gz", "--moved-labels",
                         "D/labels.nii.gz", "--landmarks", "D/lm_bytes.csv"],
     ["lm_bytes.csv", "cannot read the landmark CSV", "UTF-8"]),
    ("pairs binary", ["register", "--pairs", "D/pairs_bytes.csv", "--out", "OUT"],
     ["pairs_bytes.csv", "cannot read the pairs CSV"]),
    ("pair name escapes --out", ["register", "--pairs", "D/escape.csv", "--out", "OUT"],
     ["escape.csv line 2", "'../escaped'", "inside --out"]),
    ("pair name absolute", ["register", "--pairs", "D/absolute.csv", "--out", "OUT"],
     ["absolute.csv line 2", "'/tmp/x'", "inside --out"]),
    ("ddf absurd header size", ["eval", "--fixed-labels", "D/labels.nii.gz", "--moved-labels",
                                "D/labels.nii.gz", "--ddf", "D/huge_ddf.nii.gz"],
     ["huge_ddf.nii.gz", "1024x1024x512x1x3", "Nothing was decompressed"]),
]


@pytest.mark.parametrize(("kind", "argv", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_paragraph_nothing_written(inputs, tmp_path, capsys, monkeypatch,
                                                        kind, argv, fragments):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    before = sorted(inputs.rglob("*"))
    argv = [a.replace("D/", f"{inputs}/").replace("OUT", str(out)) for a in argv]
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("regseg") and ": error: " in err.splitlines()[0], err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert sorted(inputs.rglob("*")) == before
    assert time.perf_counter() - t0 < 5.0
