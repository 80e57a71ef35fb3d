"""A fresh clone of the repository as it is now (tracked files and new ones git does not ignore), for tests that
run the project the way a new user would: `dvc repro`, `show1 run`, `git status` afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import warm
import yaml

ROOT = Path(__file__).resolve().parents[1]
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com"}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, env=os.environ | GIT_IDENTITY, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"git {args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def fresh_clone(dest: Path) -> Path:
    """The repository's files (tracked and new, not ignored) committed into a new git repo at `dest`."""
    listed = git(ROOT, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "clone")
    return dest


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)


def project_env(prefect_home: Path) -> dict[str, str]:
    """The environment of a command run in a clone: the venv's tools on PATH, its own PREFECT_HOME, no telemetry."""
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(prefect_home),
               DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(ROOT), **GIT_IDENTITY)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `cmd`; it must succeed (the assertion shows its output)."""
    result = warm.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


# The demo clips at quarter size, two steps per stage, one prompt evaluated on two stages at one step: the DAG's
# mechanics in minutes (make demo runs the real tiny sizes). The tiny profile's own values win over the top-level
# sections, so they are overridden there.
SMALL_CASCADE: dict[str, Any] = {
    "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
    "train": {"max_steps": 2, "checkpoint_every": 2, "sample_every": 0},
    "profiles": {"tiny": {
        "train_per_stage": {stage: {"max_steps": 2} for stage in ("base", "interp", "sr1", "sr2")},
        "evaluate": {"stages": ["base", "interp"], "steps": 1, "frames_per_video": 2, "max_reference_clips": 2},
    }},
}


def use_small_cascade(repo: Path) -> None:
    """Commit SMALL_CASCADE merged over the clone's params.yaml."""
    from conftest import deep_merge

    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, SMALL_CASCADE), sort_keys=False))
    commit_all(repo, "small")
