"""`regseg` start-up (issue 17 items 4 and 6): help without torch; threads that survive a busy
machine."""

import json
import os
import subprocess
import sys

import pytest

from regseg import register_options

PROBE = """
import os, sys
from regseg.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps({{"torch": "torch" in sys.modules, "omp": os.environ.get("OMP_WAIT_POLICY")}}))
"""


def _probe(argv, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra or {})
    code = "import json\n" + PROBE.format(argv=argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["phantom", "--help"]])
def test_help_does_not_import_torch(argv):
    # It took 8-9 s: the parser imported every training module (and torch) to print a help text.
    assert _probe(argv)["torch"] is False


def test_openmp_waits_passively_unless_the_user_chose():
    assert _probe(["phantom", "--help"])["omp"] == "PASSIVE"
    assert _probe(["phantom", "--help"], {"OMP_WAIT_POLICY": "ACTIVE"})["omp"] == "ACTIVE"


@pytest.mark.parametrize(("cpus", "expected"),
                         [(1, 1), (2, 2), (16, register_options.MAX_DEFAULT_THREADS)])
def test_default_threads_follow_the_cpus_this_process_may_use(monkeypatch, cpus, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert register_options.default_threads() == expected


def test_every_option_of_every_task_has_a_help_text():
    """Issue 17 item 6: many training options had no help."""
    import argparse

    from regseg.cli import build_parser

    missing = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
            elif action.option_strings and action.dest != "help" and not action.help:
                missing.append(f"{' '.join(prefix)} {action.option_strings[0]}")

    walk(build_parser(), ["regseg"])
    assert not missing, f"options without a help text: {missing}"
