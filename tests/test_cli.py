"""The `show1` CLI: help, exit codes and one-line errors for bad input."""

import json
from pathlib import Path

from typer.testing import CliRunner

from show1.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["--params", str(ROOT / "params.yaml"), *args])


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "curate" in result.output and "validate" in result.output


def test_curate_demo_prints_summary_and_writes_metrics(tmp_path):
    metrics = tmp_path / "metrics" / "curate.json"
    result = invoke("curate", str(ROOT / "data/manifests/demo.csv"), "--out", str(tmp_path / "cur"),
                    "--metrics", str(metrics), "--quiet")
    assert result.exit_code == 0, result.output
    assert "kept sources" in result.output and "duplicate" in result.output
    summary = json.loads(metrics.read_text())
    assert summary["kept_sources"] == 3 and summary["rejected_by_reason"] == {"duplicate": 1}
    assert summary["clips"] == 31 and summary["clips_by_split"] == {"train": 30, "val": 1}


def test_curate_exits_nonzero_when_nothing_valid_remains(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("video,caption\nmissing.mp4,a caption\n,\n")
    result = invoke("curate", str(manifest), "--out", str(tmp_path / "cur"), "--quiet")
    assert result.exit_code == 1
    assert "nothing valid remains" in result.output and "quarantine.jsonl" in result.output
    assert "Traceback" not in result.output


def test_curate_missing_manifest_and_missing_column_are_usage_errors(tmp_path):
    result = invoke("curate", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "cur"))
    assert result.exit_code == 2 and "manifest not found" in result.output
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,caption\na.mp4,hello there\n")
    result = invoke("curate", str(manifest), "--out", str(tmp_path / "cur"))
    assert result.exit_code == 2 and "no 'video' column" in result.output and "curate.columns.video" in result.output


def test_bad_params_key_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("curate:\n  clip:\n    fsp: 8\n")
    result = runner.invoke(app, ["--params", str(params), "curate", "x.csv"])
    assert result.exit_code == 2
    assert "unknown key 'curate.clip.fsp'" in result.output and "did you mean 'fps'" in result.output


def test_unknown_profile_is_rejected():
    result = invoke("--profile", "huge", "curate", "x.csv")
    assert result.exit_code != 0


def test_validate_passes_on_demo_and_fails_naming_expectations_on_a_corrupted_index(tmp_path):
    curated = tmp_path / "cur"
    assert invoke("curate", str(ROOT / "data/manifests/demo.csv"), "--out", str(curated), "--quiet").exit_code == 0
    metrics = tmp_path / "validate.json"
    ok = invoke("validate", "--curated", str(curated), "--manifest", str(ROOT / "data/manifests/demo.csv"),
                "--out", str(tmp_path / "v"), "--metrics", str(metrics))
    assert ok.exit_code == 0, ok.output
    assert "clips: passed" in ok.output and (tmp_path / "v" / "data_docs" / "index.html").is_file()
    assert json.loads(metrics.read_text())["success"] == 1

    index = curated / "index.jsonl"
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    rows[1]["clip_id"] = rows[0]["clip_id"]
    rows[2]["num_frames"] = 3
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    broken = invoke("validate", "--curated", str(curated), "--no-manifest", "--out", str(tmp_path / "v2"))
    assert broken.exit_code == 1
    assert "data contract broken" in broken.output
    assert "expect_column_values_to_be_unique(column=clip_id)" in broken.output
    assert "column=num_frames" in broken.output


def test_validate_without_curated_data_is_a_usage_error(tmp_path):
    result = invoke("validate", "--curated", str(tmp_path / "none"), "--no-manifest", "--out", str(tmp_path / "v"))
    assert result.exit_code == 2 and "show1 curate" in result.output


def test_an_output_url_fsspec_cannot_open_and_training_from_an_unreachable_store_are_clear_errors(tmp_path,
                                                                                                   monkeypatch):
    result = invoke("curate", str(ROOT / "data/manifests/demo.csv"), "--out", "nosuchfs://bucket/curated", "--quiet")
    assert result.exit_code == 1 and "nosuchfs://bucket/curated: cannot open this URL with fsspec" in result.output
    # A store nobody listens at (a closed port on this machine), tried once: one line naming the URL, no run folder.
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.chdir(tmp_path)  # the data cache (paths.cache) is made here, not in the repository
    result = invoke("train", "--stage", "base", "--data", "s3://bucket/curated", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "s3://bucket/curated/index.parquet" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_serving_the_nightly_schedule_without_a_prefect_server_says_what_it_needs(tmp_path):
    """Prefect's temporary local API runs no scheduler: `--serve` there would wait for a 03:00 run that never comes."""
    import os
    import subprocess
    import sys

    import warm

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path)}
    served = warm.run([sys.executable, "-m", "flows.generate_evaluate", "--serve"], cwd=ROOT, env=env,
                      capture_output=True, text=True, timeout=300)
    assert served.returncode == 2, served.stdout + served.stderr
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a Prefect server" in lines[0] and "PREFECT_API_URL" in lines[0], lines
    assert not (tmp_path / "prefect.db").exists()  # no temporary server was started for it
    del subprocess


def test_a_worker_without_the_stacks_settings_says_what_it_needs(tmp_path, monkeypatch):
    """`show1 worker` on a runner that was not given `show1 stack env`'s exports: one line naming them, no worker."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["worker", "--pool", "gpu"])
    assert result.exit_code == 2, result.output
    assert "PREFECT_API_URL is not set" in result.output and "show1 stack env" in result.output
    assert "Traceback" not in result.output
