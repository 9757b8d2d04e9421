"""common.process: a program ends with its status and its output flushed, without teardown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(body: str) -> subprocess.CompletedProcess:
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{body}"
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("main", "code"),
    [("lambda: None", 0), ("lambda: 3", 3), ("lambda: sys.exit()", 0), ("lambda: sys.exit(2)", 2)],
)
def test_exit_after_ends_with_the_status_main_asks_for(main, code):
    proc = _run(f"from common.process import exit_after\nexit_after({main})")
    assert proc.returncode == code, proc.stderr


def test_a_text_given_to_sys_exit_is_printed_and_the_status_is_1():
    proc = _run("from common.process import exit_after\nexit_after(lambda: sys.exit('bad x'))")
    assert proc.returncode == 1 and proc.stderr.strip() == "bad x"


def test_buffered_output_and_log_files_are_flushed_and_teardown_is_skipped(tmp_path):
    log_file = tmp_path / "run.log"
    body = f"""
import atexit, logging
from common.process import exit_after
logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)
atexit.register(lambda: print("teardown ran"))
def main():
    sys.stdout.write("no newline yet")
    logging.getLogger("x").info("logged")
    return 0
exit_after(main)
"""
    proc = _run(body)
    assert proc.returncode == 0 and proc.stdout == "no newline yet", proc
    assert "logged" in log_file.read_text()


def test_a_bug_keeps_its_traceback():
    proc = _run("from common.process import exit_after\nexit_after(lambda: 1 / 0)")
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr
