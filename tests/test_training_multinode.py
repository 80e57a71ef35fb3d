"""Training across two hosts: two network namespaces of this machine stand for two nodes (tests/netns.py: each its
own address on a veth link, no shared loopback; the filesystem shared, as a cluster's shared storage). On each node
the `train` flow, given the multi-node job variables a `gpu` deployment sets (SHOW1_TRAIN_NODES, …), starts torchrun
(c10d rendezvous on node a, gloo over the link) with 1 process per node: the one-process losses, one metrics writer,
one MLflow run (a tracking server on node a), node 0's flow reporting the stage and node 1's saying it trained as a
node; then the same launch command on both nodes, one node killed mid-run, and the run resumed on both."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from netns import Host, NoNamespaces, reachable, two_hosts
from services import stop_group
from training_runs import EVERY, ROOT, SMALL, STEPS, WEIGHTS, environment, rows, worst_difference

from flows.train import launcher
from show1.config import ConfigError, load_params
from show1.data.curate import curate
from show1.training.launch import Nodes, nodes_from
from show1.training.trainer import train

RENDEZVOUS_PORT, MLFLOW_PORT = 29511, 29512  # in the test's own namespaces: nothing else listens there
NODE_TIMEOUT = 600


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    with contextlib.ExitStack() as stack:
        try:
            pair = stack.enter_context(two_hosts("mn"))
        except NoNamespaces as exc:
            pytest.skip(f"two hosts cannot be made here: {exc}")
        yield pair


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("multinode")
    (folder / "params.yaml").write_text(yaml.safe_dump(SMALL | {"tracking": {"uri": f"sqlite:///{folder / 'x.db'}"}}))
    curate(ROOT / "data/manifests/demo.csv", folder / "curated", load_params(folder / "params.yaml"))
    return {"folder": folder, "params": folder / "params.yaml", "data": folder / "curated",
            "store": folder / "mlflow.db"}


@pytest.fixture(scope="module")
def tracking(hosts, setup) -> Iterator[str]:
    """`mlflow server` on node a's address (its store a sqlite file in the shared folder); yields its URL."""
    a, _ = hosts
    url = f"http://{a.address}:{MLFLOW_PORT}"
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{setup['store']}",
            "--default-artifact-root", str(setup["folder"] / "artifacts"), "--host", a.address, "--port",
            str(MLFLOW_PORT), "--workers", "1"]
    env = environment() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(setup["folder"] / "mlflow-server.log", "w") as log:
        server = a.popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + NODE_TIMEOUT  # a busy machine starts it slowly
        while not reachable(a, f"{url}/health", timeout=2):
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not start: "
                                     f"{(setup['folder'] / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(server)


def node_settings(host: Host, rendezvous: Host, run_id: str) -> Nodes:
    """What the deployment's job variables on `host` say."""
    return nodes_from({"SHOW1_TRAIN_NODES": "2", "SHOW1_RDZV_ENDPOINT": f"{rendezvous.address}:{RENDEZVOUS_PORT}",
                       "SHOW1_RDZV_ID": run_id, "SHOW1_NODE_ADDRESS": host.address})


def start_nodes(hosts: tuple[Host, Host], setup: dict[str, Path], run: Path, tracking: str,
                logs: str) -> list[subprocess.Popen]:
    """The same training command on both nodes, each in a process group of its own; output into RUN.logs/."""
    a, _ = hosts
    (run.parent / f"{run.name}.{logs}").mkdir(parents=True, exist_ok=True)
    started = []
    for host in hosts:
        command = [*launcher(1, None, node_settings(host, a, run.name)), "-m", "show1.cli", "--params",
                   str(setup["params"]), "train", "--stage", "base", "--data", str(setup["data"]), "--out", str(run),
                   "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--resume", "latest"]
        env = environment() | {"GLOO_SOCKET_IFNAME": host.interface, "MLFLOW_TRACKING_URI": tracking}
        with open(run.parent / f"{run.name}.{logs}" / f"{host.namespace}.log", "w") as log:
            started.append(host.popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=setup["folder"],
                                      start_new_session=True))
    return started


def finish(nodes: list[subprocess.Popen], timeout: float = NODE_TIMEOUT) -> list[int]:
    try:
        return [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


def output(run: Path, logs: str) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(
        (run.parent / f"{run.name}.{logs}").glob("*.log")))


@pytest.fixture(scope="module")
def one(setup):
    """The same run in this process: one process."""
    return train("base", setup["data"], setup["folder"] / "one", load_params(setup["params"]), max_steps=STEPS,
                 checkpoint_every=EVERY, track=False)


@pytest.fixture(scope="module")
def two_nodes(hosts, setup, tracking) -> tuple[Path, list[int]]:
    """An uninterrupted run on the two nodes, tracked on node a's server: on each node the `train` flow (what a `gpu`
    worker of that machine runs for the deployment), given the multi-node job variables."""
    a, _ = hosts
    runs = setup["folder"] / "two-nodes-runs"
    (runs.parent / "two-nodes.logs").mkdir(parents=True, exist_ok=True)
    flows = []
    for host in hosts:
        command = [sys.executable, "-m", "flows.train", "--stages", "base", "--data", str(setup["data"]), "--runs",
                   str(runs), "--params", str(setup["params"]), "--max-steps", str(STEPS), "--resume", "latest"]
        job_variables = {"SHOW1_TRAIN_NODES": "2", "SHOW1_RDZV_ENDPOINT": f"{a.address}:{RENDEZVOUS_PORT}",
                         "SHOW1_RDZV_ID": "two-nodes", "SHOW1_NODE_ADDRESS": host.address,
                         "SHOW1_ACCELERATE_CONFIG": ""}
        env = environment() | job_variables | {
            "GLOO_SOCKET_IFNAME": host.interface, "MLFLOW_TRACKING_URI": tracking,
            "PREFECT_HOME": str(setup["folder"] / f"prefect-{host.namespace}")}  # each node's own local Prefect API
        env.pop("PREFECT_API_URL", None)
        with open(runs.parent / "two-nodes.logs" / f"{host.namespace}.log", "w") as log:
            flows.append(host.popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    start_new_session=True))
    codes = finish(flows)
    logs = {host.namespace: (runs.parent / "two-nodes.logs" / f"{host.namespace}.log").read_text() for host in hosts}
    assert codes == [0, 0], "\n".join(f"--- {name}\n{text[-3000:]}" for name, text in logs.items())
    node_a, node_b = (logs[host.namespace] for host in hosts)
    assert f"base: {STEPS} steps, final loss" in node_a, node_a[-3000:]  # node 0's flow reports the stage
    assert (f"base: trained as a node of 2 (this node {hosts[1].address}); node 0, the rendezvous host {a.address}, "
            "holds the run") in node_b, node_b[-3000:]
    return runs / "base", codes


def tracked_runs(setup: dict[str, Path], run: Path) -> list:
    """The MLflow runs of the run folder `run`, read from the server's store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{setup['store']}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.run_dir = '{run.resolve()}'")


def loss_steps(setup: dict[str, Path], run_id: str) -> list[int]:
    client = MlflowClient(tracking_uri=f"sqlite:///{setup['store']}")
    return [m.step for m in client.get_metric_history(run_id, "loss")]


def test_two_nodes_train_on_one_global_batch_like_one_process(setup, two_nodes, one):
    run, codes = two_nodes
    assert codes == [0, 0], output(run, "logs")
    assert [r["step"] for r in rows(run)] == list(range(1, STEPS + 1))  # one writer: one row per step
    assert [r["loss"] for r in rows(run)] == pytest.approx(one.losses, rel=1e-4, abs=1e-4)
    worst = worst_difference(run, one.run_dir)
    assert worst < 1e-4, worst
    (tracked,) = tracked_runs(setup, run)
    assert tracked.data.params["world_size"] == "2"
    assert loss_steps(setup, tracked.info.run_id) == list(range(1, STEPS + 1))


def test_a_node_killed_fails_the_other_and_both_resume_the_run(hosts, setup, tracking, two_nodes, tmp_path):
    whole, codes = two_nodes
    assert codes == [0, 0]
    run = tmp_path / "run"
    _, b = hosts
    node_a, node_b = start_nodes(hosts, setup, run, tracking, "killed")
    try:
        deadline = time.monotonic() + NODE_TIMEOUT
        while not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 3):  # the step-2 checkpoint is written
            assert node_a.poll() is None and node_b.poll() is None, output(run, "killed")
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Node b dies: its launcher and its training process at once (torchrun starts each worker in a session of
        # its own, so not one process group: every process on the node).
        for pid in b.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        node_b.wait(timeout=60)
        # Node a's training process loses its peer in the next collective (gloo sees the connection closed), its
        # launcher stops (no restarts) and exits non-zero.
        code_a = node_a.wait(timeout=120)
        took = time.monotonic() - killed
    finally:
        for node in (node_a, node_b):  # whatever a failed assertion left running
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert code_a != 0 and not (run / "final").exists(), output(run, "killed")
    print(f"node a exited ({code_a}) {took:.1f} s after node b was killed")
    assert len(rows(run)) < STEPS

    codes = finish(start_nodes(hosts, setup, run, tracking, "resumed"))  # the same commands, --resume latest
    assert codes == [0, 0], output(run, "resumed")
    assert [(r["step"], r["loss"]) for r in rows(run)] == [(r["step"], r["loss"]) for r in rows(whole)]
    assert (run / WEIGHTS).read_bytes() == (whole / WEIGHTS).read_bytes()
    (tracked,) = tracked_runs(setup, run)  # the resumed run continued the killed one's MLflow run
    assert loss_steps(setup, tracked.info.run_id) == list(range(1, STEPS + 1))  # each step once


def test_node_settings_come_from_the_job_variables_and_name_what_is_wrong():
    two = {"SHOW1_TRAIN_NODES": "2", "SHOW1_RDZV_ENDPOINT": "10.0.0.1:29500", "SHOW1_RDZV_ID": "base-7",
           "SHOW1_NODE_ADDRESS": "10.0.0.2"}
    assert nodes_from({}) == Nodes() and nodes_from({}).is_host
    other = nodes_from(two)
    command = launcher(4, None, other)
    assert command[1:] == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4", "--max-restarts",
                           "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29500", "--rdzv-id", "base-7",
                           "--rdzv-conf", "is_host=false", "--local-addr", "10.0.0.2"]
    host = nodes_from(two | {"SHOW1_NODE_ADDRESS": "10.0.0.1"})
    assert host.is_host and "is_host=true" in launcher(4, None, host)
    assert "--standalone" in launcher(2, None, nodes_from({"SHOW1_RDZV_ENDPOINT": "10.0.0.1:29500"}))
    wrong = {
        "SHOW1_TRAIN_NODES": ({"SHOW1_TRAIN_NODES": "two"}, "SHOW1_TRAIN_NODES='two': give a whole number of nodes"),
        "endpoint": ({"SHOW1_RDZV_ENDPOINT": "10.0.0.1"}, "SHOW1_RDZV_ENDPOINT='10.0.0.1': give host:port"),
        "port": ({"SHOW1_RDZV_ENDPOINT": "10.0.0.1:70000"}, "SHOW1_RDZV_ENDPOINT='10.0.0.1:70000': the port '70000'"),
        "id": ({"SHOW1_RDZV_ID": "my run"}, "SHOW1_RDZV_ID='my run': use letters, digits"),
        "missing": ({"SHOW1_RDZV_ENDPOINT": "", "SHOW1_NODE_ADDRESS": ""},
                    "SHOW1_RDZV_ENDPOINT and SHOW1_NODE_ADDRESS not set: with SHOW1_TRAIN_NODES=2"),
    }
    for why, (change, message) in wrong.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as raised:
            nodes_from(two | change)
        assert "ValidationError" not in str(raised.value), why
    with pytest.raises(ConfigError, match=r"SHOW1_TRAIN_NODES=2 with the accelerate config .*multi_gpu_ddp.yaml: "
                                          "show1 starts a multi-node run with torchrun only"):
        launcher(1, "configs/accelerate/multi_gpu_ddp.yaml", other)
