"""`show1 lineage TARGET`: the chain behind a video, a run or a model version.

video file → generation run → stage model versions → training runs → data version, commit, params; a fine-tuning's
training run → the version it started from (`show1 train --init-from models:/…`, the refresh flow) → its training …
A video is found by its sha256 (the generation run records it), so a renamed or copied file still resolves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from show1.config import Params
from show1.provenance import file_digest
from show1.registry.generation import KIND_TAG, VIDEO_HASH_TAG
from show1.registry.init_source import FROM_HASH_TAG, FROM_VERSION_TAG
from show1.registry.resolve import model_version
from show1.registry.stage_model import ADAPTER_TAG, BASE_HASH_TAG, BASE_VERSION_TAG
from show1.store import connect

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
VERSION_REF = re.compile(r"^(?:models:/)?(?P<name>[^/@\s]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z][\w-]*))$")
TRAINING_FACTS = ("stage", "data_version", "data_dvc_md5", "git_commit", "params_hash", "text_encoder_key",
                  "run_dir")
VERSION_FACTS = ("content_hash", "source_folder", "text_encoder_source", "text_encoder_key", "promotion.decision",
                 "promotion.reason")
KEY_PARAMS = ("profile", "data", "text_encoder", "text_embeddings", "train.max_steps", "train.batch_size",
              "train.learning_rate", "train.loss", "train.seed")


class LineageError(LookupError):
    """The target is not a video show1 generated, a run id or a model version."""


@dataclass
class Node:
    kind: str  # video | generation run | model version | training run | data | weights folder | fine-tuned from |
    # adapter of (a LoRA version's base version)
    label: str
    facts: dict[str, str] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "facts": self.facts,
                "children": [c.to_dict() for c in self.children]}

    def find(self, kind: str) -> list[Node]:
        found = [self] if self.kind == kind else []
        for child in self.children:
            found += child.find(kind)
        return found


def lineage(params: Params, target: str) -> Node:
    """The lineage tree of `target`: a video file, an MLflow run id, or `name/version` / `name@alias`."""
    client = connect(params.tracking)
    path = Path(target)
    if path.is_file():
        return _video(client, path)
    if RUN_ID.match(target):
        return _run(client, target)
    match = VERSION_REF.match(target)
    if match:
        ref = match["version"] or match["alias"]
        return _version(client, model_version(client, match["name"], ref))
    raise LineageError(f"{target!r}: not a video file, a run id (32 hex characters) or a model version "
                       "(show1-base/3, show1-base@champion)")


def _video(client: Any, path: Path) -> Node:
    digest = file_digest(path)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.{VIDEO_HASH_TAG} = '{digest}'",
                              order_by=["attributes.start_time DESC"]) if experiments else []
    if not runs:
        raise LineageError(f"{path}: no generation run recorded this video (sha256 {digest[:16]}…); was it "
                           "written by show1 generate with tracking on, into this MLflow store?")
    node = Node("video", str(path), {"sha256": digest})
    node.children.append(_run(client, runs[0].info.run_id))
    return node


def _run(client: Any, run_id: str) -> Node:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise LineageError(f"run {run_id} is not in this MLflow store") from exc
    if run.data.tags.get(KIND_TAG) == "generation":
        return _generation(client, run)
    return _training(client, run, with_versions=True)


def _generation(client: Any, run: Any) -> Node:
    tags = run.data.tags
    facts = {"run id": run.info.run_id, "status": run.info.status, "prompt": run.data.params.get("prompt", ""),
             "video": tags.get("video_path", ""), "git_commit": tags.get("git_commit", "")}
    facts |= {k: v for k, v in run.data.params.items() if k in ("seed", "steps", "dtype", "device")}
    node = Node("generation run", run.info.run_id, facts)
    for stage in tags.get("stages", "").split(","):
        if f"model.{stage}" in tags:
            name, _, version = tags[f"model.{stage}"].rpartition("/")
            node.children.append(_version(client, client.get_model_version(name, version)))
        elif f"weights.{stage}" in tags:
            node.children.append(Node("weights folder", tags[f"weights.{stage}"], {"stage": stage}))
    return node


def _version(client: Any, version: Any) -> Node:
    from mlflow.exceptions import MlflowException

    model = client.get_registered_model(version.name)
    aliases = sorted(alias for alias, v in model.aliases.items() if str(v) == str(version.version))
    facts = {"aliases": ", ".join(aliases) or "none"}
    facts |= {k: version.tags[k] for k in VERSION_FACTS if k in version.tags}
    facts |= {k: v for k, v in version.tags.items() if k.startswith("eval.")}
    node = Node("model version", f"{version.name}/{version.version}", facts)
    if ADAPTER_TAG in version.tags:  # a LoRA adapter: the full version it is applied to
        base = _started_from(client, f"{version.name}/{version.tags.get(BASE_VERSION_TAG, '')}",
                             version.tags.get(BASE_HASH_TAG, ""))
        base.kind = "adapter of"
        node.facts["adapter"] = version.tags[ADAPTER_TAG]
        node.children.append(base)
    run_id = version.tags.get("training_run_id") or version.run_id
    if run_id:
        try:
            node.children.append(_training(client, client.get_run(run_id), with_versions=False))
        except MlflowException:
            node.children.append(Node("training run", run_id, {"status": "not in this store"}))
    return node


def _started_from(client: Any, label: str, content_hash: str) -> Node:
    from mlflow.exceptions import MlflowException

    name, _, number = label.rpartition("/")
    try:
        version = client.get_model_version(name, number)
    except MlflowException:
        return Node("fine-tuned from", label, {"content_hash": content_hash, "status": "not in this store"})
    node = _version(client, version)
    node.kind = "fine-tuned from"
    return node


def _training(client: Any, run: Any, with_versions: bool) -> Node:
    tags, params = run.data.tags, run.data.params
    facts = {"status": run.info.status, "name": run.info.run_name or ""}
    if "loss" in run.data.metrics:
        facts["final loss"] = f"{run.data.metrics['loss']:.6g}"
    facts |= {k: tags[k] for k in TRAINING_FACTS if k in tags}
    facts |= {f"param {k}": params[k] for k in KEY_PARAMS if k in params}
    node = Node("training run", run.info.run_id, facts)
    if "data_version" in tags:
        data = {"curated folder": params.get("data", "")}
        if "data_dvc_md5" in tags:
            data["DVC md5"] = tags["data_dvc_md5"]
        node.children.append(Node("data", tags["data_version"], data))
    if FROM_VERSION_TAG in tags:  # a fine-tuning: the version it started from, and that version's own lineage
        node.children.append(_started_from(client, tags[FROM_VERSION_TAG], tags.get(FROM_HASH_TAG, "")))
    if with_versions:
        for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            node.children.append(Node("registered as", f"{version.name}/{version.version}",
                                      {"content_hash": version.tags.get("content_hash", "")}))
    return node
