"""The team stack reached from another machine, for real: two network namespaces linked by a veth pair
(tests/netns.py). The stack runs in one (`show1 stack up --host <its address> --pools cpu`: credentials on, no `gpu`
worker of its own); a runner in the other, which reaches it only by that address, is given nothing but a clone of
the repository and the `export` lines `show1 stack env` printed on the stack's host:
- `show1 worker --pool gpu` there runs prefect.yaml's `train` deployment (training and registration) and its
  `nightly-evaluate` deployment (generation, evaluation, promotion) to COMPLETED, and `show1 generate
  --from-registry champion` works there;
- without the credentials, or with wrong ones, MLflow and Prefect answer 401 and nothing is written (checked in
  PostgreSQL, from the stack's host); PostgreSQL and the S3 store cannot be reached from the runner at all.

Skipped, with the reason printed, where network namespaces cannot be made (not root, no iproute2) or PostgreSQL is
not installed. Runs alone: `pytest tests/stack/test_two_hosts.py`.
"""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clone import fresh_clone, project_env, use_small_cascade
from netns import Host, NoNamespaces, two_hosts
from services import stop_group

from show1.stack import postgres
from show1.stack.processes import StackError
from show1.stack.stack import read_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
SHOW1 = [sys.executable, "-m", "show1.cli"]
HTTP_CALL = str(Path(__file__).resolve().parents[1] / "http_call.py")


def _check(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{what}: {done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def exports(text: str) -> dict[str, str]:
    """The variables of `export K=V` lines, as a POSIX shell's eval sets them."""
    pairs = [shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in text.splitlines()
             if line.startswith("export ")]
    return dict(pairs)


@dataclass
class TwoHosts:
    stack_host: Host  # runs the stack
    runner: Host  # another machine: a clone and the exports, nothing else
    folder: Path  # the stack's folder (on the stack's host)
    stack_project: Path  # the clone the stack was started in (its cpu worker runs flows there)
    runner_project: Path  # the runner's clone
    clean_env: dict[str, str]  # a clone's environment with no MLflow, Prefect or S3 settings
    exported: dict[str, str]  # what `show1 stack env` printed on the stack's host

    def runner_env(self) -> dict[str, str]:
        return self.clean_env | self.exported

    def call(self, method: str, url: str, body: dict | None = None, headers: dict[str, str] | None = None) -> dict:
        """An HTTP request from the runner: {"status", "body"}."""
        argv = [sys.executable, HTTP_CALL, method, url, *([json.dumps(body)] if body is not None else [])]
        for name, value in (headers or {}).items():
            argv += ["--header", f"{name}: {value}"]
        done = _check(self.runner.run(argv, capture_output=True, text=True, timeout=120), f"{method} {url}")
        return json.loads(done.stdout)

    def prefect(self, path: str, body: dict | None = None) -> dict | list:
        """The Prefect API from the runner, with the exported auth string."""
        auth = base64.b64encode(self.exported["PREFECT_API_AUTH_STRING"].encode()).decode()
        answer = self.call("GET" if body is None else "POST", f"{self.exported['PREFECT_API_URL']}{path}", body,
                           {"Authorization": f"Basic {auth}"})
        assert answer["status"] in (200, 201), answer
        return answer["body"]

    def mlflow(self, path: str) -> dict:
        """GET of the MLflow REST API from the runner, as the runner account."""
        user = f"{self.exported['MLFLOW_TRACKING_USERNAME']}:{self.exported['MLFLOW_TRACKING_PASSWORD']}"
        answer = self.call("GET", f"{self.exported['MLFLOW_TRACKING_URI']}/api/2.0/mlflow{path}",
                           headers={"Authorization": "Basic " + base64.b64encode(user.encode()).decode()})
        assert answer["status"] == 200, answer
        return answer["body"]

    def sql(self, database: str, query: str) -> int:
        """A count from the stack's PostgreSQL, asked on the stack's host (its own connection: the pgpass file)."""
        url = read_state(self.folder).services["postgres"].url.replace("/postgres?", f"/{database}?")
        script = "import psycopg, sys\nwith psycopg.connect(sys.argv[1]) as db:\n" \
                 "    print(db.execute(sys.argv[2]).fetchone()[0])\n"
        done = _check(self.stack_host.run([sys.executable, "-c", script, url, query], capture_output=True, text=True,
                                          timeout=120), query)
        return int(done.stdout.strip())


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    try:
        postgres.binaries()
    except StackError as exc:
        pytest.skip(f"the stack needs PostgreSQL: {exc}")
    tmp = tmp_path_factory.mktemp("two-hosts")
    try:
        namespaces = two_hosts()
        stack_host, runner = namespaces.__enter__()
    except NoNamespaces as exc:
        pytest.skip(f"a second host needs network namespaces, which cannot be made here: {exc}")
    folder = Path(tempfile.mkdtemp(prefix="show1-stack-"))  # reachable by PostgreSQL's user (not pytest's 0700)
    folder.chmod(0o755)
    clean = project_env(tmp / "prefect-home")
    for key in [k for k in clean if k.startswith(("MLFLOW_", "PREFECT_API", "AWS_"))]:
        clean.pop(key)
    stack_project = fresh_clone(tmp / "stack-clone")
    runner_project = fresh_clone(tmp / "runner-clone")
    for project in (stack_project, runner_project):
        use_small_cascade(project)
    try:
        up = stack_host.run([*SHOW1, "stack", "up", "--dir", str(folder), "--host", stack_host.address, "--pools",
                             "cpu", "--mlflow-workers", "1", "--timeout", "900"], cwd=stack_project, env=clean,
                            capture_output=True, text=True, timeout=1200)
        _check(up, "show1 stack up")
        assert f"MLflow:   http://{stack_host.address}:" in up.stdout and "credentials: on" in up.stdout, up.stdout
        printed = _check(stack_host.run([*SHOW1, "stack", "env", "--dir", str(folder)], cwd=stack_project, env=clean,
                                        capture_output=True, text=True, timeout=300), "show1 stack env")
        yield TwoHosts(stack_host, runner, folder, stack_project, runner_project, clean, exports(printed.stdout))
    finally:
        stack_host.run([*SHOW1, "stack", "down", "--dir", str(folder), "--purge"], cwd=stack_project, env=clean,
                       capture_output=True, timeout=600)
        left = stack_host.pids() + runner.pids()
        namespaces.__exit__(None, None, None)  # kills what is left in them
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"processes still running in the namespaces after `show1 stack down`: {left}"


def test_the_other_host_without_or_with_wrong_credentials_gets_401_and_writes_nothing(hosts):
    uri, api = hosts.exported["MLFLOW_TRACKING_URI"], hosts.exported["PREFECT_API_URL"]
    assert uri.startswith(f"http://{hosts.stack_host.address}:") and api.startswith(f"http://{hosts.stack_host.address}:")
    experiments = hosts.sql("mlflow", "SELECT count(*) FROM experiments")
    models = hosts.sql("mlflow", "SELECT count(*) FROM registered_models")
    flows = hosts.sql("prefect", "SELECT count(*) FROM flow")
    wrong_user = "Basic " + base64.b64encode(b"show1:wrong").decode()
    for headers in ({}, {"Authorization": wrong_user}):
        assert hosts.call("GET", f"{uri}/api/2.0/mlflow/experiments/search?max_results=5", None, headers)["status"] \
            == 401
        assert hosts.call("POST", f"{uri}/api/2.0/mlflow/experiments/create", {"name": "intruder"},
                          headers)["status"] == 401
        assert hosts.call("POST", f"{uri}/api/2.0/mlflow/registered-models/create", {"name": "intruder"},
                          headers)["status"] == 401
        assert hosts.call("POST", f"{api}/flows/", {"name": "intruder"}, headers)["status"] == 401
        assert hosts.call("POST", f"{api}/flow_runs/filter", {}, headers)["status"] == 401
    # The same requests with the exported credentials are answered: the 401s were the credentials, not the network.
    assert hosts.mlflow("/experiments/search?max_results=5")["experiments"]
    assert isinstance(hosts.prefect("/flow_runs/filter", {}), list)
    assert hosts.sql("mlflow", "SELECT count(*) FROM experiments") == experiments
    assert hosts.sql("mlflow", "SELECT count(*) FROM registered_models") == models
    assert hosts.sql("prefect", "SELECT count(*) FROM flow") == flows
    assert hosts.sql("prefect", "SELECT count(*) FROM flow WHERE name = 'intruder'") == 0

    # PostgreSQL and the S3 store listen on the stack host's loopback only: nothing answers at its address.
    state = read_state(hosts.folder)
    for name in ("postgres", "s3"):
        probe = "import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n" \
                "except OSError:\n    sys.exit(3)\n"
        done = hosts.runner.run([sys.executable, "-c", probe, hosts.stack_host.address, str(state.ports[name])],
                                capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, f"{name} answered the runner at {hosts.stack_host.address}:{state.ports[name]}"


def _wait_for(hosts: TwoHosts, run_id: str, worker_log: Path, timeout: float = 1200) -> dict:
    deadline = time.monotonic() + timeout
    while (run := hosts.prefect(f"/flow_runs/{run_id}"))["state"]["type"] not in ("COMPLETED", "FAILED", "CRASHED",
                                                                                   "CANCELLED"):
        assert time.monotonic() < deadline, f"the runner did not finish {run['name']}: {worker_log.read_text()[-4000:]}"
        time.sleep(3)
    assert run["state"]["type"] == "COMPLETED", worker_log.read_text()[-6000:]
    return run


def test_a_runner_given_only_the_exports_runs_training_and_evaluation_deployments_and_generates(hosts, tmp_path):
    runner, project, env = hosts.runner, hosts.runner_project, hosts.runner_env()
    # The runner's data: curated in its clone (the stack's S3 store is not reachable from other machines).
    _check(runner.run([*SHOW1, "curate"], cwd=project, env=env, capture_output=True, text=True, timeout=900),
           "show1 curate on the runner")
    deployed = runner.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "train", "--name",
                           "nightly-evaluate"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    _check(deployed, "prefect deploy from the runner")

    log = tmp_path / "worker-gpu.log"
    with open(log, "w") as out:
        worker = runner.popen([*SHOW1, "worker", "--pool", "gpu"], cwd=project, env=env, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        train = hosts.prefect("/deployments/name/show1-train/train")
        assert train["work_pool_name"] == "gpu"
        trained = hosts.prefect(f"/deployments/{train['id']}/create_flow_run",
                                {"parameters": {"stages": ["base", "interp"]}})
        trained = _wait_for(hosts, trained["id"], log)
        evaluate = hosts.prefect("/deployments/name/show1-generate-evaluate/nightly-evaluate")
        evaluated = hosts.prefect(f"/deployments/{evaluate['id']}/create_flow_run", {"parameters": {"promote": True}})
        evaluated = _wait_for(hosts, evaluated["id"], log)
        out = tmp_path / "from-registry.mp4"
        generated = runner.run([*SHOW1, "generate", "a red ball", "--from-registry", "champion", "--stages",
                                "base,interp", "--steps", "1", "--out", str(out)], cwd=project, env=env,
                               capture_output=True, text=True, timeout=900)
        _check(generated, "show1 generate --from-registry champion on the runner")
    finally:
        stop_group(worker, signal.SIGINT, grace=60)
    served = log.read_text()
    # The runner's worker took both runs: the stack has no gpu worker of its own.
    assert "serving the work pool 'gpu'" in served and trained["id"] in served and evaluated["id"] in served, served
    assert out.is_file() and "29 frames" in generated.stdout, generated.stdout
    assert (project / "runs" / "base" / "final").is_dir() and (project / "runs" / "interp" / "final").is_dir()

    # In the registry (asked from the runner, as the runner account): each trained stage registered by the training
    # deployment, evaluated, and promoted by the evaluation's gate; its weights reached the stack's bucket.
    for stage in ("base", "interp"):
        champion = hosts.mlflow(f"/registered-models/alias?name=show1-{stage}&alias=champion")["model_version"]
        assert champion["version"] == "1", champion
        tags = {tag["key"]: tag["value"] for tag in champion.get("tags", [])}
        assert tags.get("training_run_id") and "eval.fid_vid" in tags, tags
    assert hosts.sql("mlflow", "SELECT count(*) FROM model_versions") == 2
    assert hosts.sql("prefect", "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'") >= 2
    assert not (project / "mlruns" / "mlflow.db").exists()  # nothing went to a local store
