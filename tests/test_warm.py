"""tests/warm.py behaves as `subprocess` does: the same output, exit codes and signals, with real processes; and it
starts a command cold when a fork could make a difference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import warm

from show1.run_lock import project_run_lock

REPORT = ("import os, sys; print(sys.argv, os.getcwd(), os.environ.get('SHOW1_X'), sys.path[0] == '', "
          "os.getppid() == int(os.environ['TEST_PID'])); print('to stderr', file=sys.stderr); sys.exit(3)")


def _env(**extra: str) -> dict[str, str]:
    return warm.server_env() | {"TEST_PID": str(os.getpid()), "SHOW1_X": "x"} | extra


def test_a_command_sees_what_subprocess_gives_it_and_exits_the_same(tmp_path: Path) -> None:
    command = [sys.executable, "-c", REPORT, "an argument"]
    cold = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    forked = warm.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert cold.returncode == forked.returncode == 3
    assert cold.stderr == forked.stderr == "to stderr\n"
    assert cold.stdout == f"['-c', 'an argument'] {tmp_path} x True True\n"
    assert forked.stdout == f"['-c', 'an argument'] {tmp_path} x True False\n"  # the server's child, not ours

    module = warm.run([sys.executable, "-m", "show1.cli", "no-such-command"], capture_output=True, text=True,
                      timeout=300)
    assert module.returncode == 2 and "No such command 'no-such-command'" in module.stderr
    piped = warm.run([sys.executable, "-c", "print(input()[::-1]); raise ValueError('boom')"], input="abc",
                     capture_output=True, text=True, timeout=300)
    assert piped.returncode == 1 and piped.stdout == "cba\n" and "ValueError: boom" in piped.stderr


def test_signals_reach_the_command_and_its_status_says_so() -> None:
    for sig in (signal.SIGKILL, signal.SIGTERM):
        process = warm.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)"],
                             stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline() == "up\n"
        assert process.poll() is None
        try:
            process.wait(timeout=0.2)
            raise AssertionError("the command ended by itself")
        except subprocess.TimeoutExpired:
            pass
        process.send_signal(sig)
        assert process.wait(timeout=120) == -sig
        process.stdout.close()


def test_a_command_that_could_differ_starts_cold(tmp_path: Path) -> None:
    asks = [sys.executable, "-c", REPORT]
    # HF_HOME is read when huggingface_hub is imported: the server imported it with another value.
    other_hub = warm.run(asks, env=_env(HF_HOME=str(tmp_path / "hub")), capture_output=True, text=True, timeout=300)
    assert other_hub.stdout.endswith(" True\n"), other_hub.stdout
    # `python -m` finds modules in its folder first: a fresh clone's own show1 must be imported, not the server's.
    (tmp_path / "report.py").write_text(REPORT.replace("sys.path[0] == ''", "sys.path[0] == os.getcwd()"))
    as_module = [sys.executable, "-m", "report"]
    forked = warm.run(as_module, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    (tmp_path / "show1").mkdir()
    cold = warm.run(as_module, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert forked.returncode == cold.returncode == 3
    assert forked.stdout == f"['{tmp_path / 'report.py'}'] {tmp_path} x True False\n"
    assert cold.stdout == f"['{tmp_path / 'report.py'}'] {tmp_path} x True True\n"
    in_a_clone = warm.run(asks, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert in_a_clone.stdout.endswith(" True\n")  # `-c` imports from its directory too


def test_the_show1_command_for_other_programs_exits_as_show1_does(tmp_path: Path) -> None:
    env = warm.commands_env(warm.server_env(), tmp_path / "bin")
    helped = subprocess.run(["sh", "-c", "show1 --help"], env=env, capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "curate" in helped.stdout
    wrong = subprocess.run(["sh", "-c", "show1 no-such-command"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert wrong.returncode == 2 and "No such command 'no-such-command'" in wrong.stderr
    # A folder `show1 run` can start in (its inputs are checked before it waits for the lock): the demo manifest.
    (tmp_path / "params.yaml").write_text(f"paths:\n  manifest: {warm.ROOT / 'data/manifests/demo.csv'}\n")
    with project_run_lock(tmp_path):  # `show1 run` there waits for this lock: SIGTERM finds it waiting
        waiting = subprocess.Popen(["sh", "-c", "exec show1 run"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        assert waiting.stderr is not None
        for line in waiting.stderr:
            if "waiting for it to finish" in line:
                break
        waiting.send_signal(signal.SIGTERM)  # to the client: it passes it on, then ends as the command ends
        # `show1 run` ends on SIGTERM as on Ctrl-C (its exit handlers stop Prefect's temporary server): exit 143.
        assert waiting.wait(timeout=300) == 128 + signal.SIGTERM
