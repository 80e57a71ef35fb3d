"""The model registry on a real sqlite MLflow store: register, aliases, load by alias in a fresh process,
idempotency (also under two processes at once), the promotion gate, the cascade from the registry, lineage,
and the registry as a person browses it through a real `mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import warm
import yaml
from mlflow.tracking import MlflowClient
from services import mlflow_server
from typer.testing import CliRunner

from show1.cli import app
from show1.config import GateRule, load_params, show1_command
from show1.data.curate import curate
from show1.pipelines.cascade import Show1Pipeline
from show1.registry import register as register_module
from show1.registry.promote import check_gate, promote_stage, record_evaluation
from show1.registry.register import RegistrationError, register_stage
from show1.registry.resolve import parse_refs, resolve, stage_folder
from show1.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # the demo clips at a quarter of the tiny profile's sizes: every stage trains a step in seconds
    "curate": {"clip": {"sizes": [[32, 20], [128, 80]], "stride": 8}},
    "train": {"batch_size": 1, "sample_every": 0, "checkpoint_every": 1, "keep_last": 2},
}
runner = CliRunner()


# Each test registers under its own model prefix; the trained runs live in the module's store: conftest's `store`.
ONE_STORE_PER_MODULE = True


@pytest.fixture(scope="module")
def trained(tmp_path_factory, store) -> dict[str, Path]:
    """Two training steps of every stage on the demo clips, tracked in the module's store."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "params.yaml").write_text(yaml.safe_dump(SMALL))
    params = load_params(folder / "params.yaml")
    curate(ROOT / "data/manifests/demo.csv", folder / "curated", params)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        for stage in ("base", "interp", "sr1", "sr2"):
            runs[stage] = train(stage, folder / "curated", folder / "runs" / stage, params, max_steps=2).run_dir
    return runs


def write_params(folder: Path, prefix: str, gate: list | None = None) -> Path:
    doc = SMALL | {"paths": {"runs": str(folder / "runs"), "cache": str(folder / "cache")},
                   "registry": {"model_prefix": prefix} | ({"gate": gate} if gate is not None else {})}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(doc))
    return folder / "params.yaml"


def cli(params_file: Path, *args: str):
    result = runner.invoke(app, ["--params", str(params_file), *args])
    return result


def versions(store: str, name: str) -> list:
    return MlflowClient(tracking_uri=store, registry_uri=store).search_model_versions(f"name = '{name}'")


def test_register_tags_lineage_sets_challenger_and_is_idempotent(trained, tmp_path, store):
    params_file = write_params(tmp_path, "reg")
    result = cli(params_file, "register", "--stage", "base", "--checkpoint", str(trained["base"] / "final"),
                 "--metrics", str(tmp_path / "register.json"), "--details", str(tmp_path / "register.details.json"))
    assert result.exit_code == 0, result.output
    assert "registered models:/reg-base/1 (alias challenger" in result.output
    assert f"browse: MLFLOW_TRACKING_URI={store} {show1_command()} ui" in result.output  # not params' store: named
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("reg-base", "challenger")
    training = client.get_run(version.tags["training_run_id"])
    assert training.data.tags["stage"] == "base" and version.run_id == training.info.run_id
    for key in ("git_commit", "data_version", "params_hash"):
        assert version.tags[key] == training.data.tags[key] and version.tags[key]
    assert len(version.tags["content_hash"]) == 64
    assert version.tags["text_encoder_source"].endswith("model")  # the packaged MiniLM it trained with
    assert "Content hash" in version.description and training.info.run_id in version.description
    assert "keyframe" in client.get_registered_model("reg-base").description
    assert json.loads((tmp_path / "register.json").read_text()) == {"version": 1}  # DVC metrics: numbers only
    assert json.loads((tmp_path / "register.details.json").read_text()) == {
        "model": "reg-base", "version": 1, "content_hash": version.tags["content_hash"], "alias": "challenger"}

    again = cli(params_file, "register", "--stage", "base")  # default checkpoint: paths.runs/base/final
    assert again.exit_code == 2, again.output  # tmp_path/runs does not exist: a clear error, nothing registered
    assert "checkpoint folder not found" in again.output and "show1 train --stage base" in again.output
    (tmp_path / "runs").symlink_to(trained["base"].parent)
    again = cli(params_file, "register", "--stage", "base")
    assert again.exit_code == 0 and "already registered as models:/reg-base/1" in again.output
    assert len(versions(store, "reg-base")) == 1

    # A training checkpoint is another content (training weights, not EMA): a new version; its optimizer state
    # and EMA file stay out of the model.
    step = trained["base"] / "checkpoints" / "step-000001"  # training weights; final/ holds the EMA
    second = register_stage(load_params(params_file), "base", step)
    assert second.created and second.version == "2"
    stage_files = {p.name for p in (Path(store.removeprefix("sqlite:///")).parent / "artifacts").rglob("*")}
    assert "training_state.pt" not in stage_files and "ema.safetensors" not in stage_files


def test_bad_checkpoints_are_refused_with_clear_errors(trained, tmp_path):
    params_file = write_params(tmp_path, "bad")
    wrong = cli(params_file, "register", "--stage", "base", "--checkpoint", str(trained["interp"] / "final"))
    assert wrong.exit_code == 2 and "Show1InterpolationPipeline folder, not a base stage" in wrong.output
    (tmp_path / "empty").mkdir()
    empty = cli(params_file, "register", "--stage", "sr1", "--checkpoint", str(tmp_path / "empty"))
    assert empty.exit_code == 2 and "no model_index.json" in empty.output
    assert cli(params_file, "register", "--stage", "sr3").exit_code == 2
    champion = cli(params_file, "register", "--stage", "base", "--alias", "champion")
    assert champion.exit_code == 2 and "show1 promote" in champion.output
    with pytest.raises(RegistrationError, match="--text-encoder"):  # no encoder, no training run to ask
        _register_without_run(trained["interp"] / "final", tmp_path, params_file)


def _register_without_run(final: Path, tmp_path: Path, params_file: Path) -> None:
    import shutil

    copy = tmp_path / "copy" / "final"
    shutil.copytree(final, copy)  # a stage folder outside its run folder: no mlflow_run_id beside it
    register_stage(load_params(params_file), "interp", copy)


def test_two_processes_registering_one_checkpoint_make_one_version(trained, tmp_path, store):
    params_file = write_params(tmp_path, "race")
    command = [sys.executable, "-m", "show1.cli", "--params", str(params_file), "register", "--stage", "interp",
               "--checkpoint", str(trained["interp"] / "final")]
    env = os.environ | {"MLFLOW_TRACKING_URI": store}
    procs = [warm.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("models:/race-interp/1" in out for out, _ in outputs)
    assert [str(v.version) for v in versions(store, "race-interp")] == ["1"]


def test_a_registration_that_loses_a_race_removes_its_version(trained, tmp_path, store, monkeypatch):
    """Force the race: both registrations pass the "already registered?" check before either creates."""
    params = load_params(write_params(tmp_path, "lost"))
    first = register_stage(params, "sr1", trained["sr1"] / "final")
    monkeypatch.setattr(register_module, "_versions_with_hash", _blind_once(register_module._versions_with_hash))
    second = register_stage(params, "sr1", trained["sr1"] / "final")
    assert (second.version, second.created) == (first.version, False)
    assert [str(v.version) for v in versions(store, "lost-sr1")] == ["1"]
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert str(client.get_model_version_by_alias("lost-sr1", "challenger").version) == "1"


def _blind_once(real):
    calls = []

    def lookup(*args):
        calls.append(1)
        return [] if len(calls) == 1 else real(*args)

    return lookup


def test_load_by_alias_in_a_fresh_process_and_generate(trained, tmp_path, store):
    params_file = write_params(tmp_path, "fresh")
    params = load_params(params_file)
    register_stage(params, "base", trained["base"] / "final")
    register_stage(params, "interp", trained["interp"] / "final")
    script = f"""
import mlflow, pandas as pd
from show1.data.video import to_uint8_frames
from show1.config import load_params
from show1.registry.resolve import load_cascade
from show1.registry.stage_model import decode_video
base = mlflow.pyfunc.load_model("models:/fresh-base@challenger")
keyframes = base.predict(pd.DataFrame({{"prompt": ["a rabbit in a meadow"]}}),
                         params={{"num_inference_steps": 2, "seed": 3}})
interp = mlflow.pyfunc.load_model("models:/fresh-interp@challenger")
video = interp.predict(pd.DataFrame({{"prompt": ["a rabbit in a meadow"], "video": [keyframes.video[0]]}}),
                       params={{"num_inference_steps": 2, "seed": 3}})
print("SHAPES", decode_video(keyframes.video[0]).shape, decode_video(video.video[0]).shape)
print("SIGNATURE", [p.name for p in base.metadata.signature.params.params])
# A stage model given a seed draws as that stage of the cascade does with that seed (the reference's reseeding).
cascade = load_cascade(load_params("{params_file}"), ("base",), "challenger").pipeline
frames = cascade("a rabbit in a meadow", seed=3, num_inference_steps=2).frames
same = to_uint8_frames(frames[0].permute(1, 0, 2, 3)) == decode_video(keyframes.video[0])
print("SAME AS THE CASCADE", bool(same.all()))
"""
    done = warm.run([sys.executable, "-c", script], env=os.environ | {"MLFLOW_TRACKING_URI": store},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SHAPES (8, 40, 64, 3) (29, 40, 64, 3)" in done.stdout
    assert "SIGNATURE ['seed', 'num_inference_steps', 'guidance_scale']" in done.stdout
    assert "SAME AS THE CASCADE True" in done.stdout


def test_promotion_gate_both_ways(trained, tmp_path, store, monkeypatch):
    gate = [{"metric": "fid_vid", "higher_is_better": False, "min_improvement": 1.0}]
    params_file = write_params(tmp_path, "gate", gate)
    params = load_params(params_file)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    first = register_stage(params, "base", trained["base"] / "final")

    unevaluated = cli(params_file, "promote", "--stage", "base", "--strict")
    assert unevaluated.exit_code == 1 and "no evaluation" in unevaluated.output
    assert client.get_model_version("gate-base", first.version).tags["promotion.decision"] == "rejected"

    record_evaluation(client, "gate-base", first.version, {"fid_vid": 50.0})
    promoted = cli(params_file, "promote", "--stage", "base")
    assert promoted.exit_code == 0 and "promoted" in promoted.output and "no champion yet" in promoted.output
    assert str(client.get_model_version_by_alias("gate-base", "champion").version) == first.version

    step = trained["base"] / "checkpoints" / "step-000001"  # training weights; final/ holds the EMA
    second = register_stage(params, "base", step)
    record_evaluation(client, "gate-base", second.version, {"fid_vid": 49.5})  # better, but by less than 1.0
    dry = promote_stage(params, "base", dry_run=True)
    assert not dry.promoted and "promotion.decision" not in client.get_model_version("gate-base", "2").tags
    rejected = promote_stage(params, "base")
    assert not rejected.promoted and rejected.champion == "1"
    tags = client.get_model_version("gate-base", second.version).tags
    assert tags["promotion.decision"] == "rejected" and "improvement 0.5 < 1" in tags["promotion.reason"]
    assert str(client.get_model_version_by_alias("gate-base", "champion").version) == "1"

    record_evaluation(client, "gate-base", second.version, {"fid_vid": 40.0})
    # An experiment is a question, not a release: inside `dvc exp run` (DVC_EXP_NAME in the environment) and with
    # --record-only the decision is recorded and the champion stays.
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lamb")
    in_experiment = promote_stage(params, "base")
    assert not in_experiment.promoted and in_experiment.passed and in_experiment.verdict == "would promote"
    assert str(client.get_model_version_by_alias("gate-base", "champion").version) == "1"
    tags = client.get_model_version("gate-base", "2").tags
    assert tags["promotion.decision"] == "would promote"
    assert tags["promotion.record_only"] == "dvc experiment bushy-lamb"
    monkeypatch.delenv("DVC_EXP_NAME")
    asked = cli(params_file, "promote", "--stage", "base", "--record-only", "--strict",
                "--metrics", str(tmp_path / "promote.json"), "--details", str(tmp_path / "promote.details.json"))
    assert asked.exit_code == 0 and "would promote" in asked.output and "no alias moved" in asked.output, asked.output
    assert json.loads((tmp_path / "promote.json").read_text()) == {"promoted": 0, "passed": 1}  # numbers only
    details = json.loads((tmp_path / "promote.details.json").read_text())
    assert details["decision"] == "would promote" and details["record_only"] == "--record-only", details
    assert str(client.get_model_version_by_alias("gate-base", "champion").version) == "1"
    accepted = promote_stage(params, "base")
    assert accepted.promoted and str(client.get_model_version_by_alias("gate-base", "champion").version) == "2"
    assert client.get_model_version("gate-base", "1").tags["promotion.replaced_by"] == "2"
    assert client.get_model_version("gate-base", "2").tags["promotion.compared_to"] == "1"
    again = promote_stage(params, "base")
    assert not again.promoted and "already the champion" in again.reason
    assert again.metrics() == {"promoted": 0}  # no gate asked: no `passed` to compare


def test_gate_rules():
    lower = GateRule(metric="fvd", higher_is_better=False, min_improvement=0.0)
    higher = GateRule(metric="clipsim", higher_is_better=True, min_improvement=-0.01, threshold=0.2)
    assert check_gate([lower, higher], {"fvd": 10, "clipsim": 0.3}, None)[0]
    assert check_gate([lower, higher], {"fvd": 10, "clipsim": 0.3}, {"fvd": 10, "clipsim": 0.305})[0]
    assert not check_gate([lower, higher], {"fvd": 10.1, "clipsim": 0.3}, {"fvd": 10, "clipsim": 0.3})[0]
    passed, reasons = check_gate([higher], {"clipsim": 0.1}, None)
    assert not passed and "misses the threshold" in reasons[0]
    assert not check_gate([lower], {}, {"fvd": 3})[0]


def test_parse_registry_references():
    assert parse_refs("champion") == dict.fromkeys(("base", "interp", "sr1", "sr2"), "champion")
    assert parse_refs("3,2,5,1") == {"base": "3", "interp": "2", "sr1": "5", "sr2": "1"}
    assert parse_refs("champion,sr1=4") == {"base": "champion", "interp": "champion", "sr1": "4", "sr2": "champion"}
    assert parse_refs("base=1,interp=challenger", ("base", "interp")) == {"base": "1", "interp": "challenger"}
    # Stages the pairs leave out take the champion (the versions in production).
    assert parse_refs("base=1,sr1=challenger") == {"base": "1", "interp": "champion", "sr1": "challenger",
                                                   "sr2": "champion"}
    for bad, message in [("", "empty"), ("1,2", "2 plain references"),
                         ("sr3=1,champion", "not one of"), ("champ ion", "version number or an alias")]:
        with pytest.raises(ValueError, match=message):
            parse_refs(bad)


def test_cascade_from_the_registry_and_its_lineage(trained, tmp_path, store):
    params_file = write_params(tmp_path, "cas")
    params = load_params(params_file)
    for stage, run_dir in trained.items():
        register_stage(params, stage, run_dir / "final")
    # All four stages assemble from the registry (downloaded once into the cache, by content hash) ...
    versions_ = resolve(params, parse_refs("challenger"))
    folders = {stage: stage_folder(v, params.paths.cache) for stage, v in versions_.items()}
    assert all(f.is_relative_to(tmp_path / "cache" / "registry") for f in folders.values())
    cascade = Show1Pipeline.from_folders(folders)
    assert cascade.stage_names == ("base", "interp", "sr1", "sr2") and cascade.stages["sr2"].vae is not None
    # ... and generate (two stages here: the full cascade's run time is tested in test_cli_generate).
    video = tmp_path / "out" / "video.mp4"
    result = cli(params_file, "generate", "a rabbit in a meadow", "--from-registry", "challenger", "--steps", "2",
                 "--stages", "base,interp", "--out", str(video))
    assert result.exit_code == 0, result.output
    assert "29 frames, 64x40" in result.output and "generation run:" in result.output

    renamed = tmp_path / "renamed.mp4"
    video.rename(renamed)  # lineage follows the content, not the name
    shown = cli(params_file, "lineage", str(renamed), "--json")
    assert shown.exit_code == 0, shown.output
    tree = json.loads(shown.output)
    generation = tree["children"][0]
    assert tree["kind"] == "video" and generation["kind"] == "generation run"
    assert generation["facts"]["prompt"] == "a rabbit in a meadow"
    assert [v["label"] for v in generation["children"]] == ["cas-base/1", "cas-interp/1"]
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    for version, stage in zip(generation["children"], ("base", "interp"), strict=True):
        assert version["facts"]["aliases"] == "challenger"
        run = version["children"][0]
        assert run["kind"] == "training run" and run["facts"]["stage"] == stage
        training = client.get_run(run["label"])
        assert run["facts"]["git_commit"] == training.data.tags["git_commit"]
        assert run["facts"]["params_hash"] == training.data.tags["params_hash"]
        assert run["children"][0] == {"kind": "data", "label": training.data.tags["data_version"],
                                      "facts": {"curated folder": training.data.params["data"]}, "children": []}

    text = cli(params_file, "lineage", "cas-sr1@challenger")
    assert text.exit_code == 0 and "training run" in text.output and "data" in text.output
    run_id = generation["children"][0]["children"][0]["label"]
    by_run = json.loads(cli(params_file, "lineage", run_id, "--json").output)
    assert by_run["kind"] == "training run" and any(c["label"] == "cas-base/1" for c in by_run["children"])
    unknown = cli(params_file, "lineage", "nothing-like-this")
    assert unknown.exit_code == 1 and "not a video file, a run id" in unknown.output


def test_generate_refuses_unresolvable_registry_references(trained, tmp_path):
    params_file = write_params(tmp_path, "none")
    both = cli(params_file, "generate", "x", "--from-registry", "champion", "--weights-dir", str(tmp_path))
    assert both.exit_code == 2 and "exactly one of" in both.output
    missing = cli(params_file, "generate", "x", "--from-registry", "champion", "--stages", "base")
    assert missing.exit_code == 1 and "no registered model 'none-base'" in missing.output
    register_stage(load_params(params_file), "base", trained["base"] / "final")
    alias = cli(params_file, "generate", "x", "--from-registry", "champion", "--stages", "base")
    assert alias.exit_code == 1 and "none-base has no alias 'champion' (versions: 1; aliases: challenger→1)" \
        in alias.output
    malformed = cli(params_file, "generate", "x", "--from-registry", "1,2", "--stages", "base")
    assert malformed.exit_code == 2 and "plain references" in malformed.output


def _get(base: str, path: str, **query: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_registry_is_browsable_through_a_real_mlflow_server(trained, tmp_path, store):
    params = load_params(write_params(tmp_path, "ui"))
    registered = register_stage(params, "base", trained["base"] / "final")
    db = Path(store.removeprefix("sqlite:///"))
    with mlflow_server(tmp_path, store, db.parent / "artifacts") as base:
        models = _get(base, "/api/2.0/mlflow/registered-models/search", filter="name LIKE 'ui-%'")
        [model] = models["registered_models"]
        assert model["name"] == "ui-base" and "keyframe" in model["description"]
        assert {"alias": "challenger", "version": registered.version} in model["aliases"]
        found = _get(base, "/api/2.0/mlflow/model-versions/search", filter="name = 'ui-base'")
        [version] = found["model_versions"]
        tags = {t["key"]: t["value"] for t in version["tags"]}
        assert {"training_run_id", "git_commit", "data_version", "params_hash", "content_hash"} <= set(tags)
        assert "Content hash" in version["description"]
        by_alias = _get(base, "/api/2.0/mlflow/registered-models/alias", name="ui-base", alias="challenger")
        assert by_alias["model_version"]["version"] == registered.version
        run = _get(base, "/api/2.0/mlflow/runs/get", run_id=tags["training_run_id"])["run"]
        assert {t["key"]: t["value"] for t in run["data"]["tags"]}["stage"] == "base"


@pytest.mark.slow
def test_prefect_register_flow_registers_and_promotes(trained, tmp_path, store, prefect_home):
    params_file = write_params(tmp_path, "flow")
    (tmp_path / "runs").symlink_to(trained["base"].parent)  # paths.runs: the trained run folders
    env = os.environ | {"MLFLOW_TRACKING_URI": store, "PREFECT_HOME": str(prefect_home),
                        "PYTHONPATH": str(ROOT)}
    done = warm.run([sys.executable, "-m", "flows.register", "--stages", "base", "interp", "--params",
                           str(params_file), "--promote"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "register-stage" in output and "promote-stage" in output and "Finished in state Completed" in output
    assert "base: registered models:/flow-base/1" in output
    assert "flow-interp: version 1 not promoted: fid_vid: the challenger has no evaluation" in output
    assert [str(v.version) for v in versions(store, "flow-interp")] == ["1"]


def test_fine_tuning_from_the_champion_is_resolved_recorded_and_in_lineage(trained, tmp_path, store):
    """`show1 train --init-from models:/NAME@champion`: the version is resolved to its content hash, the fine-tuning
    takes train.finetune's steps and learning rate, and the version it registers reads champion → fine-tune."""
    params_file = write_params(tmp_path, "ft")
    doc = yaml.safe_load(params_file.read_text())
    doc["train"] |= {"finetune": {"max_steps": 1, "learning_rate": 0.00002}}
    params_file.write_text(yaml.safe_dump(doc))
    params = load_params(params_file)
    start = register_stage(params, "base", trained["base"] / "final", alias="champion")
    curated = trained["base"].parent.parent / "curated"
    out = tmp_path / "tuned"
    done = cli(params_file, "train", "--stage", "base", "--data", str(curated), "--out", str(out),
               "--init-from", "models:/ft-base@champion", "--quiet")
    assert done.exit_code == 0, done.output
    assert "trained base for 1 steps" in done.output  # train.finetune.max_steps, not train.max_steps
    config = json.loads((out / "config.json").read_text())["init_from"]
    assert config["fine_tuned_from"] == "ft-base/1" and config["fine_tuned_from_hash"] == start.content_hash
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.data.params["train.learning_rate"] == "2e-05" and run.data.params["init_from"] == \
        "models:/ft-base@champion"

    tuned = register_stage(params, "base", out / "final")
    assert tuned.version == "2"
    version = client.get_model_version("ft-base", "2")
    assert version.tags["fine_tuned_from"] == "ft-base/1" and version.tags["fine_tuned_from_hash"] == \
        start.content_hash
    assert "Fine-tuned from: ft-base/1" in version.description
    tree = json.loads(cli(params_file, "lineage", "ft-base/2", "--json").output)
    training = tree["children"][0]
    assert training["kind"] == "training run"
    data, parent = training["children"]
    assert data["kind"] == "data" and data["label"] == version.tags["data_version"]
    assert parent["kind"] == "fine-tuned from" and parent["label"] == "ft-base/1"
    assert parent["facts"]["aliases"] == "champion" and parent["children"][0]["kind"] == "training run"

    wrong_stage = cli(params_file, "train", "--stage", "interp", "--data", str(curated), "--out",
                      str(tmp_path / "x"), "--init-from", "models:/ft-base@champion")
    assert wrong_stage.exit_code == 2 and "stage interp fine-tunes ft-interp, not ft-base" in wrong_stage.output
    no_alias = cli(params_file, "train", "--stage", "base", "--data", str(curated), "--out", str(tmp_path / "y"),
                   "--init-from", "models:/ft-base@nightly")
    assert no_alias.exit_code == 2, no_alias.output
    assert "ft-base has no alias 'nightly'" in no_alias.output and "champion→1" in no_alias.output


def test_refresh_flow_fine_tunes_the_champion_evaluates_both_and_records_the_decision(trained, tmp_path, store,
                                                                                       prefect_home):
    """flows/refresh.py (what the `refresh` deployment's event trigger runs), here on Prefect's ephemeral API: the
    champion is fine-tuned, registered as challenger, both cascades evaluated on the same prompts and seeds, and the
    gate's decision recorded on the new version; the champion moves only if the challenger passed. A refresh that
    fails before the gate changes nothing in the registry."""
    params_file = write_params(tmp_path, "rf")
    doc = yaml.safe_load(params_file.read_text())
    doc["train"] |= {"finetune": {"max_steps": 1}}
    doc["evaluate"] = {"stages": ["base"], "steps": 1, "limit": 1, "frames_per_video": 2, "max_reference_clips": 2,
                       "out": str(tmp_path / "eval")}
    doc["paths"]["curated"] = str(trained["base"].parent.parent / "curated")
    params_file.write_text(yaml.safe_dump(doc))
    params = load_params(params_file)
    register_stage(params, "base", trained["base"] / "final", alias="champion")
    from show1.provenance import data_version

    version = data_version(params.paths.curated)
    env = os.environ | {"MLFLOW_TRACKING_URI": store, "PREFECT_HOME": str(prefect_home), "PYTHONPATH": str(ROOT)}
    refresh = [sys.executable, "-m", "flows.refresh", "--data-version", version, "--params", str(params_file)]
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    # A refresh whose fine-tuning diverges fails before the gate and leaves the champion and the registry as they
    # were.
    diverging = tmp_path / "diverging.yaml"
    diverging.write_text(yaml.safe_dump(doc | {"train": doc["train"] | {"finetune": {"max_steps": 2,
                                                                                     "learning_rate": 1e12}},
                                               "paths": doc["paths"] | {"runs": str(tmp_path / "diverged")}}))
    failed = warm.run([*refresh[:-1], str(diverging)], cwd=tmp_path, env=env, capture_output=True, text=True,
                      timeout=600)
    assert failed.returncode != 0 and "loss became" in failed.stdout + failed.stderr, failed.stdout[-3000:]
    assert [str(v.version) for v in versions(store, "rf-base")] == ["1"]
    assert str(client.get_model_version_by_alias("rf-base", "champion").version) == "1"
    done = warm.run(refresh, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"refresh-{version[:12]}" in output and "base: fine-tuning from the champion rf-base/1" in output
    new = client.get_model_version("rf-base", "2")
    assert new.tags["fine_tuned_from"] == "rf-base/1" and new.tags["data_version"] == version
    assert "challenger" in new.aliases
    decision = new.tags["promotion.decision"]
    assert decision in ("promoted", "rejected") and new.tags["promotion.compared_to"] == "1"
    champion = client.get_model_version_by_alias("rf-base", "champion")
    assert str(champion.version) == ("2" if decision == "promoted" else "1")
    for number in ("1", "2"):  # both evaluated, on the same prompts and seeds
        assert "eval.fid_vid" in client.get_model_version("rf-base", number).tags
    assert "| base | rf-base/2 | rf-base/1 |" in output and f"**{decision}**" in output
