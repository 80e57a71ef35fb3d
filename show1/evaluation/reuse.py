"""Whether an evaluation already on disk was made from exactly these inputs, read without loading a model.

An evaluation of registry versions records what it was made from in `OUT/evaluation.json`: the model versions (and
their content hashes), the prompts, the evaluation and sampling settings, the reference data and the metric models.
`show1 run` asks `finished_evaluation` before generating again, so a second run over unchanged inputs redoes
nothing (as `dvc repro` skips an unchanged stage); `show1 evaluate` and the nightly deployment always evaluate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from show1.config import Params
from show1.provenance import data_version

RECORD = "evaluation.json"
METRIC_MODELS = ("inception", "i3d", "clip", "classifier")


def _file_facts(path: Path | None) -> list[Any] | None:
    """A metric model by path, size and modification time (hashing a 100 MB TorchScript file every run is not
    worth it: a replaced file changes its size or time)."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        return [str(path)]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def evaluation_fingerprint(params: Params, prompts: tuple[str, ...], versions: dict[str, Any],
                           reference_split: str) -> dict[str, Any]:
    """What an evaluation of registry `versions` (stage -> StageVersion) is made from."""
    cfg = params.evaluate
    settings = cfg.model_dump(mode="json", exclude={"out", "limit", "prompts", "videos", "device", "executor",
                                                    *METRIC_MODELS})
    return {
        "models": {stage: [v.name, str(v.version), v.content_hash] for stage, v in versions.items()},
        "prompts": list(prompts),
        "evaluate": settings,
        "sampling": params.sampling.as_params(),
        "reference": {"curated": str(Path(params.paths.curated).resolve()), "split": reference_split,
                      "data_version": data_version(params.paths.curated)},
        "metric_models": {name: _file_facts(getattr(cfg, name)) for name in METRIC_MODELS},
    }


def record(fingerprint: dict[str, Any], run_id: str | None, metrics: dict[str, float], skipped: dict[str, str],
           models: dict[str, str]) -> str:
    """The text of OUT/evaluation.json."""
    return json.dumps({"fingerprint": fingerprint, "run_id": run_id, "metrics": metrics, "skipped": skipped,
                       "models": models}, indent=2, sort_keys=True)


def finished_evaluation(params: Params, prompts: tuple[str, ...], versions: dict[str, Any], reference_split: str,
                        out: Path) -> dict[str, Any] | None:
    """The record of the evaluation in `out` when it was made from exactly these inputs and the versions still
    carry its results (their `eval.run_id` tag: what promotion reads), else None."""
    out = Path(out)
    try:
        stored = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not ((out / "metrics.json").is_file() and (out / "report.html").is_file()):
        return None
    if stored.get("fingerprint") != evaluation_fingerprint(params, prompts, versions, reference_split):
        return None
    run_id = stored.get("run_id")
    if not run_id or any(v.version_info.tags.get("eval.run_id") != run_id for v in versions.values()):
        return None
    return stored
