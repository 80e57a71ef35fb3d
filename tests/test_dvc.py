"""The DAG under DVC: a real `dvc repro` in a fresh clone, a no-op second repro, and parameter changes that re-run
exactly the stages that depend on them."""

import json

import pytest
import warm
import yaml
from clone import commit_all, fresh_clone, git, project_env, run
from services import s3_store

from show1.stack import object_store


def numbers(value: object) -> bool:
    """A number, or a dict of them at any depth (a bool is an int to Python, but DVC shows it as text)."""
    if isinstance(value, dict):
        return all(numbers(v) for v in value.values())
    return isinstance(value, int | float) and not isinstance(value, bool)


def assert_numbers_only(files: dict) -> None:
    """Metrics files as DVC reads them (path -> {"data": ...}) hold numbers only: `dvc exp show` compares
    experiments by them, and a path, hash or reason there is a column of noise (it goes in a *.details.json)."""
    assert len(files) == 12, list(files)  # curate, validate, train and register per stage, promote, eval/metrics.json
    for path, metric in files.items():
        assert numbers(metric.get("data")), (path, metric)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole DAG several times, each stage a CLI process: minutes, more under xdist
def test_dvc_repro_from_fresh_clone_then_noop_then_param_changes(tmp_path):
    # The DVC stages are CLI commands (no Prefect server starts), forked from the tests' warm Python (tests/warm.py).
    env = warm.commands_env(project_env(tmp_path / "prefect-home"), tmp_path / "bin")
    repo = fresh_clone(tmp_path / "clone")
    # Quarter-size clips, a few training steps, one stage evaluated: the DAG's mechanics in a minute or two
    # (make demo runs the real tiny sizes).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["curate"]["clip"]["sizes"] = [[32, 20], [128, 80]]
    params["train"].update(max_steps=3, checkpoint_every=3, sample_every=0)
    params["profiles"]["tiny"]["train_per_stage"] = {"base": {"max_steps": 3}, "interp": {}, "sr1": {"max_steps": 1},
                                                     "sr2": {}}
    params["profiles"]["tiny"]["evaluate"].update(stages=["base"], frames_per_video=2,
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
    assert json.loads((repo / "metrics/register-sr1.json").read_text()) == {"version": 1}
    registered = json.loads((repo / "metrics/register-sr1.details.json").read_text())
    assert registered["model"] == "show1-sr1" and registered["version"] == 1 and registered["alias"] == "challenger"
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    assert_numbers_only(next(iter(shown.values()))["data"])
    evaluated = next(iter(shown.values()))["data"]["eval/metrics.json"]["data"]
    assert evaluated["fid_vid"] > 0 and evaluated["prompts"] == 1  # the tiny profile evaluates one prompt
    promoted = json.loads((repo / "metrics/promote.json").read_text())["base"]
    assert promoted == {"promoted": 1, "passed": 1}  # no champion yet
    assert json.loads((repo / "eval/details.json").read_text())["prompt_set"] == "demo"

    second = run(["dvc", "repro"], repo, env)  # a no-op: no stage runs (no wall-clock bound: CI machines are busy)
    assert "Running stage" not in second.stdout, second.stdout
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout

    # A DVC remote on the stack's S3 store: `dvc push`; a new clone that pulls recomputes nothing and shows the same
    # metrics. Its settings are the bucket URL (committed) and the store's endpoint and keys (environment).
    with s3_store(tmp_path / "s3") as endpoint:
        remote_env = env | object_store.client_env(endpoint)
        run(["dvc", "remote", "add", "-d", "stack", "s3://show1/dvc"], repo, remote_env)
        commit_all(repo, "dvc.lock and the remote")
        assert "files pushed" in run(["dvc", "push"], repo, remote_env, timeout=600).stdout
        pulled = tmp_path / "pulled"
        git(tmp_path, "clone", "-q", str(repo), str(pulled))
        assert not (pulled / "runs").exists()
        run(["dvc", "pull"], pulled, remote_env, timeout=600)
        assert (pulled / "runs/base/final/unet/config.json").is_file()
        repro = run(["dvc", "repro"], pulled, remote_env)
        assert "Running stage" not in repro.stdout, repro.stdout
        shown_pulled = json.loads(run(["dvc", "metrics", "show", "--json"], pulled, remote_env).stdout)
    assert next(iter(shown_pulled.values()))["data"] == next(iter(shown.values()))["data"]

    # An sr2 parameter re-runs sr2 and what follows it, nothing else (promote waits on evaluate's metrics, which
    # do not change here: this evaluation uses base only; test_evaluation and test_cascade evaluate two stages).
    # The evaluation runs again from scratch and reproduces its numbers (CPU, fixed seeds) to 1e-6.
    evaluated_before = json.loads((repo / "eval/metrics.json").read_text())
    params["profiles"]["tiny"]["train_per_stage"]["sr2"]["max_steps"] = 2  # sr2 trains fastest of the upsamplers
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro"], repo, env, timeout=600)
    ran = {line.split("'")[1] for line in third.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@sr2", "register@sr2", "evaluate"}, ran
    assert json.loads((repo / "metrics/train-sr2.json").read_text())["steps"] == 2
    assert json.loads((repo / "metrics/register-sr2.json").read_text())["version"] == 2
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

    # DVC's way of changing a parameter: `dvc exp run -S`. DVC rewrites params.yaml as YAML 1.2 (the quotes of
    # `mixed_precision: "no"` go), and show1 reads it the same way. The experiment registers and evaluates a new
    # base version, and promotion only records what it would do: an experiment never moves the champion.
    champion = json.loads(run(["show1", "lineage", "show1-base@champion", "--json"], repo, env).stdout)
    experiment = run(["dvc", "exp", "run", "-n", "steps2", "-S", "profiles.tiny.train_per_stage.base.max_steps=2"],
                     repo, env, timeout=600)
    ran = {line.split("'")[1] for line in experiment.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@base", "register@base", "evaluate", "promote"}, experiment.stdout
    assert "mixed_precision: no\n" in (repo / "params.yaml").read_text()  # DVC's rewrite, unquoted
    decided = json.loads((repo / "metrics/promote.details.json").read_text())["base"]
    assert decided["challenger"] == "2" and decided["record_only"] == "dvc experiment steps2", decided
    assert decided["decision"] in ("would promote", "would reject") and decided["promoted"] is False
    passed = decided["decision"] == "would promote"
    assert json.loads((repo / "metrics/promote.json").read_text())["base"] == {"promoted": 0, "passed": int(passed)}
    after = json.loads(run(["show1", "lineage", "show1-base@champion", "--json"], repo, env).stdout)
    assert after["label"] == champion["label"] == "show1-base/1", after["label"]  # the champion did not move
    assert "challenger" not in after["facts"]["aliases"]  # version 2, the experiment's, is the challenger
    shown_exps = run(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert "steps2" in shown_exps
    for commit in json.loads(shown_exps):  # the workspace, the commit, and the experiment on it
        for row in [commit, *(rev for exp in commit.get("experiments") or [] for rev in exp["revs"])]:
            assert_numbers_only(row["data"]["metrics"])
    run(["dvc", "exp", "apply", "steps2"], repo, env)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout

    params["profiles"]["tiny"]["curate"]["clip"]["stride"] = 4  # a curation parameter: curation re-runs
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = run(["dvc", "repro", "curate"], repo, env)
    assert "Running stage 'curate'" in fourth.stdout
    assert json.loads((repo / "metrics/curate.json").read_text())["clips"] < metrics["clips"]
