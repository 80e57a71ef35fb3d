"""The steps as Prefect runs them: real flow runs of curation and training, and the deployments in prefect.yaml."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from clone import project_env, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prefect_flow_curates_and_validates(tmp_path, prefect_home):
    env = project_env(prefect_home)
    result = run([sys.executable, "-m", "flows.curate", str(ROOT / "data/manifests/demo.csv"), "--out",
                  str(tmp_path / "cur"), "--params", str(ROOT / "params.yaml")], tmp_path, env)
    output = result.stdout + result.stderr
    assert "Finished in state Completed" in output
    assert "curate-chunk" in output and "validate-contracts" in output
    summary = json.loads((tmp_path / "cur" / "summary.json").read_text())
    assert summary["kept_sources"] == 3 and summary["clips"] == 31
    assert json.loads((tmp_path / "data/validation/result.json").read_text())["success"] is True


@pytest.mark.slow
def test_prefect_training_flow_trains_a_stage_in_two_processes(tmp_path, prefect_home):
    env = project_env(prefect_home) | {"SHOW1_TRAIN_PROCESSES": "2"}  # the deployment's job variable
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
    assert "base: training under -m torch.distributed.run --standalone --nproc_per_node 2" in output
    assert "base: 2 steps, final loss" in output
    assert (tmp_path / "runs/base/final/unet/config.json").is_file()
    assert len((tmp_path / "runs/base/metrics.jsonl").read_text().splitlines()) == 2  # one writer


def test_prefect_yaml_deploys_training_on_the_gpu_pool():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    train = deployments["train"]
    assert train["work_pool"]["name"] == "gpu"
    accelerate = train["work_pool"]["job_variables"]["env"]["SHOW1_ACCELERATE_CONFIG"]
    assert (ROOT / accelerate).is_file()
    assert int(train["work_pool"]["job_variables"]["env"]["SHOW1_TRAIN_PROCESSES"]) >= 1
    for deployment in deployments.values():  # every entrypoint names a real flow
        module, _, name = deployment["entrypoint"].partition(":")
        source = (ROOT / module).read_text()
        assert f"def {name}(" in source and "@flow(" in source
