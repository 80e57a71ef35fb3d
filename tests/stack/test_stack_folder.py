"""A stack folder in a state `show1 stack up` cannot start from: one clear error before anything starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from clone import ROOT, project_env

from show1.stack import postgres
from show1.stack.processes import StackError


def test_databases_that_require_a_password_whose_credentials_file_is_gone_are_one_clear_error(tmp_path):
    """The credentials file of a stack with credentials deleted (or the folder copied without it): its PostgreSQL
    requires a password nobody has any more. `stack up` used to start it and wait out --timeout for servers that
    could never log in; it now says so at once and starts nothing."""
    try:
        postgres.binaries()
    except StackError as exc:
        pytest.skip(f"the stack needs PostgreSQL: {exc}")
    folder = Path(tempfile.mkdtemp(prefix="show1-stack-"))  # reachable by PostgreSQL's user when root
    folder.chmod(0o755)
    try:
        data = folder / "postgres"
        postgres.init(data)
        hba = data / "pg_hba.conf"
        owner = hba.stat()
        hba.write_text(postgres.PASSWORD_HBA)  # what a stack with credentials left
        shutil.chown(hba, owner.st_uid, owner.st_gid)
        done = subprocess.run([sys.executable, "-m", "show1.cli", "stack", "up", "--dir", str(folder), "--timeout",
                               "600"], cwd=ROOT, env=project_env(tmp_path / "prefect-home"), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 1, done.stdout + done.stderr
        error = " ".join(done.stderr.split())
        assert f"the databases in {data} require the password kept in {folder / 'credentials'}, which is missing" \
            in error, done.stderr
        assert "Traceback" not in done.stderr and "started postgres" not in done.stderr
        assert not (folder / "stack.json").exists() and not (folder / "credentials").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
