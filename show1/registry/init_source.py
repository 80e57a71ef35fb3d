"""`show1 train --init-from`: the stage folder a fine-tuning starts from, a path or a registered model version.

`models:/show1-base@champion` (an alias) or `models:/show1-base/3` (a version number) is resolved in the registry
to one version, whose stage folder is downloaded once into the cache (by its content hash, checked on arrival). The
version and its content hash are recorded on the training run (tags `fine_tuned_from`, `fine_tuned_from_hash`) and
copied onto the version the run registers, so lineage reads champion → fine-tune → new version. A path is a stage
folder on this machine (ours, or a published show-1-* folder), as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from show1.config import Params
from show1.registry.names import model_name

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z][A-Za-z0-9_-]*)|/(?P<version>\d+))$")
# Training-run tags naming the version a fine-tuning started from (copied onto the version it registers).
FROM_VERSION_TAG, FROM_HASH_TAG = "fine_tuned_from", "fine_tuned_from_hash"


@dataclass(frozen=True)
class InitSource:
    """Where a fine-tuning starts: `folder` on this machine; for a registered version, which one."""

    folder: Path
    reference: str  # as the user gave it
    model_version: str | None = None  # `show1-base/3`
    content_hash: str | None = None

    def tags(self) -> dict[str, str]:
        """Lineage tags for the training run (none for a plain folder: its path is logged as a param)."""
        if self.model_version is None:
            return {}
        return {FROM_VERSION_TAG: self.model_version, FROM_HASH_TAG: self.content_hash or ""}

    def describe(self) -> str:
        return f"{self.reference} ({self.model_version})" if self.model_version else str(self.folder)


def is_model_uri(reference: str | Path | None) -> bool:
    return isinstance(reference, str) and reference.startswith("models:/")


def resolve_init_source(reference: str | Path, stage: str, params: Params,
                        client: Any = None) -> InitSource:
    """`reference` → the stage folder to start from. A `models:/NAME@ALIAS` or `models:/NAME/VERSION` must name the
    stage's own registered model (`<prefix>-<stage>`): fine-tuning sr1 from a base model is refused."""
    if not is_model_uri(reference):
        return InitSource(Path(reference), str(reference))
    from show1.registry.resolve import StageVersion, model_version, stage_folder
    from show1.store import connect

    match = MODEL_URI.match(str(reference))
    if match is None:
        raise ValueError(f"--init-from {reference!r}: a registered model is models:/NAME@ALIAS "
                         f"(models:/{model_name(params.registry, stage)}@champion) or models:/NAME/VERSION")
    name = match["name"]
    expected = model_name(params.registry, stage)
    if name != expected:
        raise ValueError(f"--init-from {reference!r}: stage {stage} fine-tunes {expected}, not {name}")
    client = client or connect(params.tracking)
    info = model_version(client, name, match["alias"] or match["version"])  # RegistryLookupError lists what exists
    version = StageVersion(stage, name, str(info.version), info.tags.get("content_hash", ""), info)
    folder = stage_folder(version, params.paths.cache)
    return InitSource(folder, str(reference), version.label, version.content_hash)
