"""The curation as it is orchestrated: a real Prefect flow run and a real `dvc repro` in a fresh git repo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clone import GIT_IDENTITY, commit_all, fresh_clone

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(prefect_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(prefect_home),
               DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(ROOT), **GIT_IDENTITY)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_prefect_flow_curates_and_validates(tmp_path, prefect_home):
    env = _env(prefect_home)
    result = run([sys.executable, "-m", "flows.curate", str(ROOT / "data/manifests/demo.csv"), "--out",
                  str(tmp_path / "cur"), "--params", str(ROOT / "params.yaml")], tmp_path, env)
    output = result.stdout + result.stderr
    assert "Finished in state Completed" in output
    assert "curate-chunk" in output and "validate-contracts" in output
    summary = json.loads((tmp_path / "cur" / "summary.json").read_text())
    assert summary["kept_sources"] == 3 and summary["clips"] == 31
    assert json.loads((tmp_path / "data/validation/result.json").read_text())["success"] is True


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole DAG several times, each stage a CLI process: minutes, more under xdist
def test_dvc_repro_from_fresh_clone_then_noop_then_param_changes(tmp_path, prefect_home):
    import time

    env = _env(prefect_home)
    repo = fresh_clone(tmp_path / "clone")
    # Quarter-size clips, a few training steps, two stages evaluated: the DAG's mechanics in a minute or two
    # (make demo runs the real tiny sizes).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["curate"]["clip"]["sizes"] = [[32, 20], [128, 80]]
    params["train"].update(max_steps=3, checkpoint_every=3, sample_every=0)
    params["profiles"]["tiny"]["train_per_stage"] = {"base": {}, "interp": {}, "sr1": {"max_steps": 1}, "sr2": {}}
    params["profiles"]["tiny"]["evaluate"].update(stages=["base", "interp"], frames_per_video=2,
                                                  max_reference_clips=2, steps=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(repo, "small")

    first = run(["dvc", "repro"], repo, env, timeout=900)
    for stage in ("curate", "validate", "train@base", "train@sr1", "register@base", "register@sr2", "evaluate",
                  "promote"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    metrics = json.loads((repo / "metrics/curate.json").read_text())
    assert metrics["kept_sources"] == 3 and metrics["clips"] == 31
    assert json.loads((repo / "metrics/validate.json").read_text())["success"] == 1
    assert json.loads((repo / "metrics/train-sr1.json").read_text())["steps"] == 1
    assert (repo / "runs/base/final/unet/config.json").is_file()
    registered = json.loads((repo / "metrics/register-sr1.json").read_text())
    assert registered["model"] == "show1-sr1" and registered["version"] == 1 and registered["alias"] == "challenger"
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    evaluated = next(iter(shown.values()))["data"]["eval/metrics.json"]["data"]
    assert evaluated["fid_vid"] > 0 and evaluated["prompts"] == 1  # the tiny profile evaluates one prompt
    assert json.loads((repo / "metrics/promote.json").read_text())["base"]["promoted"] is True  # no champion yet

    started = time.monotonic()
    second = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in second.stdout, second.stdout
    assert time.monotonic() - started < 10  # a no-op is quick

    # An sr1 parameter re-runs sr1 and what follows it, nothing else (promote waits on evaluate's metrics, which
    # do not change here: this evaluation uses base and interp only). The evaluation runs again from scratch and
    # reproduces its numbers (CPU, fixed seeds) to 1e-6.
    evaluated_before = json.loads((repo / "eval/metrics.json").read_text())
    params["profiles"]["tiny"]["train_per_stage"]["sr1"]["max_steps"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro"], repo, env, timeout=600)
    ran = {line.split("'")[1] for line in third.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@sr1", "register@sr1", "evaluate"}, ran
    assert json.loads((repo / "metrics/register-sr1.json").read_text())["version"] == 2
    evaluated_after = json.loads((repo / "eval/metrics.json").read_text())
    for key in ("fid_vid", "temporal_consistency"):
        assert evaluated_after[key] == pytest.approx(evaluated_before[key], rel=1e-6), key

    # Training from scratch reproduces the same losses and the same weights: the same registered version.
    trained_before = json.loads((repo / "metrics/train-base.json").read_text())
    run(["dvc", "repro", "--force", "--single-item", "train@base", "register@base"], repo, env, timeout=600)
    trained_after = json.loads((repo / "metrics/train-base.json").read_text())
    for key in ("final_loss", "mean_loss_last_10"):
        assert trained_after[key] == pytest.approx(trained_before[key], rel=1e-6), key
    assert json.loads((repo / "metrics/register-base.json").read_text())["version"] == 1  # same content hash

    params["profiles"]["tiny"]["curate"]["clip"]["stride"] = 4  # a curation parameter: curation re-runs
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = run(["dvc", "repro", "curate"], repo, env)
    assert "Running stage 'curate'" in fourth.stdout
    assert json.loads((repo / "metrics/curate.json").read_text())["clips"] < metrics["clips"]


@pytest.mark.slow
def test_prefect_training_flow_trains_a_stage(tmp_path, prefect_home):
    env = _env(prefect_home)
    params = {"curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
              "train": {"checkpoint_every": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "show1.cli", "--params", str(tmp_path / "params.yaml"), "curate",
         str(ROOT / "data/manifests/demo.csv"), "--out", str(tmp_path / "cur"), "--quiet"], tmp_path, env)
    result = run([sys.executable, "-m", "flows.train", "--stages", "base", "--data", str(tmp_path / "cur"),
                  "--runs", str(tmp_path / "runs"), "--params", str(tmp_path / "params.yaml"), "--max-steps", "2"],
                 tmp_path, env)
    output = result.stderr + result.stdout
    assert "train-stage" in output and "Finished in state Completed" in output
    assert (tmp_path / "runs/base/final/unet/config.json").is_file()
    assert len((tmp_path / "runs/base/metrics.jsonl").read_text().splitlines()) == 2


def test_prefect_yaml_deploys_training_on_the_gpu_pool():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    train = deployments["train"]
    assert train["work_pool"]["name"] == "gpu"
    accelerate = train["work_pool"]["job_variables"]["env"]["SHOW1_ACCELERATE_CONFIG"]
    assert (ROOT / accelerate).is_file()
    for deployment in deployments.values():  # every entrypoint names a real flow
        module, _, name = deployment["entrypoint"].partition(":")
        source = (ROOT / module).read_text()
        assert f"def {name}(" in source and "@flow(" in source
