"""A new user's first steps after the demo: the demo trained against the sqlite store, then the tracking store
changes (a team's server, `eval "$(show1 stack env)"`) and `show1 run` reuses that training.

The reused training follows the store: it is logged into the new one (a copy tagged with the run it copies), once,
and registration links the version to that copy. Registration errors that a retry cannot fix fail at once, and a
failed `show1 run` ends in one `error:` line, its tracebacks in a file that line names.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import warm
import yaml
from mlflow.tracking import MlflowClient
from shared_cache import new_mlflow_store, new_prefect_home

from show1.config import load_params
from show1.data.curate import curate
from show1.registry.lineage import lineage
from show1.training.tracking import COPIED_FROM_STORE_TAG, COPIED_FROM_TAG, store_key, training_run_id

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # the demo clips at a quarter of the tiny profile's sizes: two steps of base in seconds
    "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
    "train": {"batch_size": 1, "sample_every": 0, "checkpoint_every": 2, "max_steps": 2},
}
PHASES = ("=== first run", "=== second run", "=== damaged checkpoint")
FLOWS = """
import sys
from flows.register import register_flow
from flows.train import train_flow

params, damaged = sys.argv[1], sys.argv[2]
for phase in ("first run", "second run"):  # what `show1 run` does with the training and the registration
    print(f"=== {phase}", flush=True)
    train_flow(["base"], params_path=params, reuse=True)
    register_flow(["base"], params)
print("=== damaged checkpoint", flush=True)
state = register_flow(["base"], params, checkpoints={"base": damaged}, return_state=True)
print(f"flow state: {state.type.value}", flush=True)
"""


@dataclass
class Project:
    folder: Path
    params_file: Path
    first_store: str  # the store the demo's training was tracked in
    store: str  # the store the flows ran against
    trained_run: str  # the training's run id in the first store
    phases: dict[str, str]  # the flows' output, by phase


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared) -> Project:
    """Base trained (2 steps) against one sqlite store; then, in one process pointed at a second, empty store, the
    train and register flows as `show1 run` calls them, twice, and a registration of a damaged copy of the stage."""
    from show1.training.trainer import train

    folder = tmp_path_factory.mktemp("first-steps")
    params_file = folder / "params.yaml"
    doc = SMALL | {"paths": {"runs": str(folder / "runs"), "curated": str(folder / "curated"),
                             "cache": str(folder / "cache")}, "registry": {"model_prefix": "fs"}}
    params_file.write_text(yaml.safe_dump(doc))
    params = load_params(params_file)
    curate(ROOT / "data/manifests/demo.csv", params.paths.curated, params)
    first_store = new_mlflow_store(shared, folder / "demo-store" / "mlflow.db")
    store = new_mlflow_store(shared, folder / "team-store" / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", first_store)
        run_dir = train("base", params.paths.curated, params.paths.runs / "base", params).run_dir
    damaged = folder / "damaged" / "final"
    shutil.copytree(run_dir / "final", damaged)
    weights = next(damaged.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # its seal no longer matches

    env = warm_env(new_prefect_home(shared, tmp_path_factory.mktemp("prefect-home")), store)  # the new store
    done = warm.run([sys.executable, "-c", FLOWS, str(params_file), str(damaged)], cwd=folder, env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)  # one stream, in order
    output = done.stdout
    assert done.returncode == 0, output[-4000:]
    bounds = [output.index(phase) for phase in PHASES] + [len(output)]
    phases = {phase: output[bounds[i]:bounds[i + 1]] for i, phase in enumerate(PHASES)}
    return Project(folder, params_file, first_store, store, training_run_id(run_dir), phases)


def warm_env(prefect_home: Path, store: str) -> dict[str, str]:
    """A command's environment: its own PREFECT_HOME (Prefect's temporary server) and MLflow store."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | {"MLFLOW_TRACKING_URI": store, "PREFECT_HOME": str(prefect_home), "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_reused_training_from_another_store_is_copied_into_this_one_and_registered(project, monkeypatch):
    first = project.phases["=== first run"]
    run_dir = project.folder / "runs" / "base"
    copied = re.search(rf"base: the training run {project.trained_run} of {re.escape(str(run_dir))} \(tracked in "
                       rf"{re.escape(store_key(project.first_store))}\) is not in {re.escape(store_key(project.store))}"
                       rf": copied it there as run (\w+)", first)
    assert copied, first[-3000:]
    assert "base: unchanged inputs, reusing the finished run" in first  # not trained again
    assert "base: registered models:/fs-base/1" in first and "Finished in state Completed" in first

    client = MlflowClient(tracking_uri=project.store, registry_uri=project.store)
    version = client.get_model_version_by_alias("fs-base", "challenger")
    assert version.tags["training_run_id"] == copied[1] == version.run_id
    copy = client.get_run(copied[1])
    original = MlflowClient(tracking_uri=project.first_store).get_run(project.trained_run)
    assert copy.data.tags[COPIED_FROM_TAG] == project.trained_run
    assert copy.data.tags[COPIED_FROM_STORE_TAG] == store_key(project.first_store)
    for key in ("stage", "git_commit", "data_version", "params_hash", "text_encoder_key", "run_dir"):
        assert copy.data.tags[key] == original.data.tags[key], key
    for key in ("git_commit", "data_version", "params_hash", "text_encoder_key"):  # the version's lineage tags
        assert version.tags[key] == original.data.tags[key], key
    assert copy.data.params == original.data.params and copy.info.status == "FINISHED"
    losses = [(m.step, m.value) for m in client.get_metric_history(copy.info.run_id, "loss")]
    assert sorted(losses) == sorted((m.step, m.value) for m in
                                    MlflowClient(tracking_uri=project.first_store).get_metric_history(
                                        project.trained_run, "loss"))
    assert [step for step, _ in sorted(losses)] == [1, 2]
    # The run folder still names the run it was trained as; the lineage in the new store leads to the copy.
    assert training_run_id(run_dir) == project.trained_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.store)
    tree = lineage(load_params(project.params_file), "fs-base/1")
    training = tree.find("training run")
    assert [node.label for node in training] == [copied[1]] and training[0].facts["status"] == "FINISHED"
    assert tree.find("data")[0].label == original.data.tags["data_version"]


@pytest.mark.slow
def test_a_second_run_on_the_same_store_copies_nothing(project):
    second = project.phases["=== second run"]
    assert "copied it there" not in second and "unchanged inputs, reusing the finished run" in second
    assert "base: already registered as models:/fs-base/1" in second
    client = MlflowClient(tracking_uri=project.store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    copies = client.search_runs(experiments, filter_string=f"tags.`{COPIED_FROM_TAG}` = '{project.trained_run}'")
    assert len(copies) == 1


@pytest.mark.slow
def test_a_damaged_checkpoint_fails_registration_once_not_retried(project):
    damaged = project.phases["=== damaged checkpoint"]
    assert "flow state: FAILED" in damaged, damaged[-3000:]
    assert "does not match its recorded content hash" in damaged  # the seal check refused it
    # One attempt: a retry would say "Retry 1/2 will start 2 second(s) from now", then "Retries are exhausted".
    assert "Retry 1/2" not in damaged and "Retries are exhausted" not in damaged, damaged[-3000:]
    assert len(re.findall(r"Task run 'register-stage-\w+' - Finished in state Failed\('Task run encountered an "
                          r"exception RegistrationError", damaged)) == 1


@pytest.mark.slow
def test_show1_register_alone_copies_the_training_into_its_store_or_says_what_to_do(project, mlflow_store, tmp_path,
                                                                                   shared, monkeypatch):
    """`show1 register --checkpoint DIR` outside a flow, on a third store: the same copy. A run folder that does not
    record what its training logged (an older show1's) cannot be copied: one error line says what to do."""
    from typer.testing import CliRunner

    from show1.cli import app

    run_dir = project.folder / "runs" / "base"
    register = ["--params", str(project.params_file), "register", "--stage", "base", "--checkpoint"]
    done = CliRunner().invoke(app, [*register, str(run_dir / "final")])
    assert done.exit_code == 0, done.output
    assert f"base: the training run {project.trained_run} of {run_dir}" in done.output
    assert "copied it there as run" in done.output and "base: registered models:/fs-base/1" in done.output
    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    version = client.get_model_version("fs-base", "1")
    assert client.get_run(version.run_id).data.tags[COPIED_FROM_TAG] == project.trained_run

    older = tmp_path / "older" / "base"
    shutil.copytree(run_dir, older)
    (older / "mlflow_run.json").unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_mlflow_store(shared, tmp_path / "fourth" / "mlflow.db"))
    refused = CliRunner().invoke(app, [*register, str(older / "final")])
    assert refused.exit_code == 2, refused.output
    message = " ".join(refused.output.split())
    assert message.startswith("error: ") and "trained by an older show1" in message
    assert "MLFLOW_TRACKING_URI set to the store it was trained with" in message and "--run-id" in message


def test_registration_retries_only_what_may_pass():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from show1.registry.register import ArtifactStoreError, RegistrationError, retryable
    from show1.store import StoreError

    assert retryable(ArtifactStoreError("upload failed"))  # a service, not the input
    assert retryable(MlflowException("database is locked", TEMPORARILY_UNAVAILABLE))
    assert retryable(ConnectionRefusedError(111, "refused"))
    try:
        try:
            raise ConnectionError("server down")
        except ConnectionError:
            raise StoreError("the MLflow store http://127.0.0.1:1 cannot be opened") from None
    except StoreError as exc:
        assert retryable(exc)  # unreachable for now
    assert not retryable(StoreError("cannot be opened: table already exists"))  # a broken file stays broken
    assert not retryable(RegistrationError("checkpoint folder not found"))
    assert not retryable(MlflowException("no such run", RESOURCE_DOES_NOT_EXIST))
    assert not retryable(KeyError("a bug"))


@pytest.mark.slow
def test_a_failed_show1_run_ends_in_one_error_line(tmp_path, prefect_home):
    """Every row of the manifest is rejected by curation: the run fails inside the flow, and says so in one line."""
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "bad.csv").write_text("video,caption\nzero.mp4,an empty file\ntext.mp4,a text file named .mp4\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"cache": str(tmp_path / "cache")}}))
    done = warm.run([sys.executable, "-m", "show1.cli", "run", "--manifest", "bad.csv"], cwd=tmp_path,
                    env=warm_env(prefect_home, f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"),
                    capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nothing valid remains" in errors[0], done.stderr[-3000:]
    log = Path(re.search(r"\(tracebacks: (\S+)\)$", errors[0])[1])
    assert "Traceback (most recent call last)" in log.read_text()  # the bug hunt still has them
    log.unlink()
