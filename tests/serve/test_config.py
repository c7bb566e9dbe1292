"""regseg-serve's config file: what loads, and each bad input named with its file, table and key."""

from __future__ import annotations

import pytest

from regseg.errors import InputError
from regseg.stream.serve.cli import main
from regseg.stream.serve.config import load_config


def write(tmp_path, text: str):
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path


def case(tmp_path) -> tuple[str, str]:
    """Two readable files standing in for a case (their content is read only at start)."""
    mri, labels = tmp_path / "mri.nii.gz", tmp_path / "labels.nii.gz"
    mri.write_bytes(b"x")
    labels.write_bytes(b"x")
    return str(mri), str(labels)


def test_loads_sessions_and_server_options(tmp_path, free_port):
    mri, labels = case(tmp_path)
    p1, p2 = free_port(), free_port()
    config = load_config(write(tmp_path, f"""
[serve]
device = "cpu"
backend = "eager"
max-batch = 6
batch-window-ms = 1.5
control = "127.0.0.1:0"
web = "127.0.0.1:0"

[[session]]
name = "room1"
source = "igtl://127.0.0.1:18944"
mri = "{mri}"
mri-labels = "{labels}"
serve = ["igtl://127.0.0.1:{p1}"]
refine-iterations = 3

[[session]]
name = "demo.2"
source = "sim://2"
fps = 12.5
serve = ["igtl://127.0.0.1:{p2}"]
deformable = "off"
do-no-harm = "on"
do-no-harm-margin-mm = 0.5
"""))
    assert config.batch_sizes == (1, 2, 4, 6)
    assert config.batch_window_ms == 1.5 and config.web == ("127.0.0.1", 0)
    assert config.engine == {"device": "cpu", "backend": "eager"}
    a, b = config.sessions
    assert (a.name, a.plan.kind, a.args.refine_iterations) == ("room1", "igtl", 3)
    assert a.plan.serve == [(f"igtl://127.0.0.1:{p1}", "127.0.0.1", p1)]
    assert (b.name, b.plan.kind, b.plan.seed, b.args.fps, b.args.deformable) == \
        ("demo.2", "sim", 2, 12.5, "off")
    assert (b.args.do_no_harm, b.args.do_no_harm_margin_mm) == ("on", 0.5)
    assert a.args.do_no_harm == "off"  # the default
    assert [p for p, _ in b.ports()] == [p2]


def test_batching_off_is_one_size(tmp_path):
    config = load_config(write(tmp_path, "[serve]\nbatching = false\nmax-batch = 8\n"))
    assert config.batch_sizes == (1,)


@pytest.mark.parametrize(("text", "expected"), [
    ("[serve]\nbatching = 'yes'\n", r"\[serve\]: batching = 'yes': true or false"),
    ("[serve]\nmax-batch = 0\n", r"max-batch = 0: a whole number 1-64"),
    ("[serve]\ncontrol = 'localhost'\n", r"control = 'localhost': HOST:PORT expected"),
    ("[serve]\nbackend = 'fast'\n", r"backend = 'fast': one of \['auto', 'eager'"),
    ("[serve]\ncolour = 1\n", r"unknown key 'colour'"),
    ("[sessions]\n", r"unknown table 'sessions'"),
    ("[session]\nname = 'a'\n", r"array of tables \(\[\[session\]\]\)"),
    ("[[session]]\nsource = 'sim://1'\n", r"\[\[session\]\] 1: name = None"),
    ("[[session]]\nname = 'a b'\nsource = 'sim://1'\n", r"name = 'a b': 1-64 letters"),
    ("[[session]]\nname = 'a'\n", r"\('a'\): no source"),
    ("[[session]]\nname = 'a'\nsource = 'sim://1'\nbackend = 'eager'\n",
     r"unknown key 'backend' \(engines are shared: set it in \[serve\]\)"),
    ("[[session]]\nname = 'a'\nsource = 'sim://1'\nfps = 'fast'\n", r"fps = 'fast': "),
    ("[[session]]\nname = 'a'\nsource = 'sim://1'\nserve = 'igtl://x'\n",
     r"serve = 'igtl://x': a list of strings"),
    ("[[session]]\nname = 'a'\nsource = 'ftp://x'\n", r"\('a'\): --source 'ftp://x': unknown"),
    ("[[session]]\nname = 'a'\nsource = 'igtl://127.0.0.1:1'\n", r"needs the patient case"),
    ("[[session]]\nname = 'a'\nsource = 'sim://1'\n[[session]]\nname = 'a'\nsource = 'sim://2'\n",
     r"\[\[session\]\] 2: name 'a' is used twice"),
    ("x = = 1\n", r"not valid TOML"),
    ("a = " + "[" * 100_000 + "\n", r"nested too deeply"),  # was a RecursionError traceback
])
def test_errors_name_file_table_key_and_value(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(InputError, match=expected) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_two_sessions_on_one_port_refused(tmp_path, free_port):
    port = free_port()
    path = write(tmp_path, f"""
[[session]]
name = "a"
source = "sim://1"
serve = ["igtl://127.0.0.1:{port}"]
[[session]]
name = "b"
source = "sim://2"
zmq = "tcp://127.0.0.1:{port}"
""")
    with pytest.raises(InputError, match=rf"session 'b': zmq .*port {port} is also used by "
                       r"session 'a' serve"):
        load_config(path)


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, "[serve]\nmax-batch = 'many'\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regseg-serve: error: ") and "max-batch = 'many'" in err
    assert "Traceback" not in err
    assert main([]) == 2
    assert "either --config serve.toml or --demo N" in capsys.readouterr().err
