"""`--from-registry REF`: which version of each stage model, and its stage folder on local disk.

REF is an alias for every stage (`champion`, `challenger`), versions in stage order (`3,2,5,1`), or per stage
(`base=3,sr1=champion`); forms mix (`champion,sr1=4`: sr1 version 4, the rest the champion). A LoRA adapter
version's stage folder is its base version's with the adapter merged in, made once in the cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from show1 import atomic
from show1.config import Params
from show1.integrity import IntegrityError
from show1.models.configs import STAGES
from show1.registry.names import CHAMPION, model_name
from show1.registry.stage_model import ADAPTER_TAG, BASE_HASH_TAG, BASE_VERSION_TAG, STAGE_ARTIFACT
from show1.store import connect
from show1.weight_files import UnsafeWeightsError, check_folder

REF = re.compile(r"^(?:\d+|[A-Za-z][A-Za-z0-9_-]*)$")
COMPLETE = ".complete"
MERGED = "merged"  # a LoRA adapter version's stage folder in its cache entry: the base with the adapter merged in


class RegistryLookupError(LookupError):
    """A reference names no registered version; the message says what exists."""


@dataclass(frozen=True)
class StageVersion:
    stage: str
    name: str
    version: str
    content_hash: str
    version_info: Any

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


def parse_refs(spec: str, stages: tuple[str, ...] = STAGES) -> dict[str, str]:
    """`champion` | `3,2,5,1` | `base=3,sr1=champion` (mixable) → {stage: version number or alias}.

    Stages that `stage=ref` pairs leave out take `champion` (the versions in production): `base=3` is
    `champion,base=3`."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError("--from-registry is empty: give an alias (champion) or versions (base=3,sr1=2)")
    named: dict[str, str] = {}
    bare: list[str] = []
    for item in items:
        stage, sep, ref = item.partition("=")
        if sep:
            if stage.strip() not in stages:
                raise ValueError(f"--from-registry {spec!r}: {stage.strip()!r} is not one of {', '.join(stages)}")
            named[stage.strip()] = ref.strip()
        else:
            bare.append(item)
    if len(bare) == 1:
        refs = dict.fromkeys(stages, bare[0])
    elif len(bare) == len(stages):
        refs = dict(zip(stages, bare, strict=True))
    elif not bare:
        refs = {}
    else:
        raise ValueError(f"--from-registry {spec!r}: {len(bare)} plain references for {len(stages)} stages "
                         f"({', '.join(stages)}): give one alias, one per stage, or stage=ref pairs")
    refs = dict.fromkeys(stages, CHAMPION) | refs | named
    bad = [f"{s}={r}" for s, r in refs.items() if not REF.match(r)]
    if bad:
        raise ValueError(f"--from-registry: {', '.join(bad)}: a reference is a version number or an alias")
    return {s: refs[s] for s in stages}


def model_version(client: Any, name: str, ref: str) -> Any:
    """The version `ref` (number or alias) of `name`, or an error that lists what the model has."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, ref) if ref.isdigit() else \
            client.get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            raise RegistryLookupError(f"no registered model {name!r}: register one with "
                                      f"show1 register --stage {name.rsplit('-', 1)[-1]}") from exc
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(model.aliases.items())) or "none"
        raise RegistryLookupError(f"{name} has no {'version' if ref.isdigit() else 'alias'} {ref!r} "
                                  f"(versions: {', '.join(map(str, versions)) or 'none'}; aliases: {aliases})") \
            from exc


def resolve(params: Params, refs: dict[str, str]) -> dict[str, StageVersion]:
    client = connect(params.tracking)
    resolved = {}
    for stage, ref in refs.items():
        name = model_name(params.registry, stage)
        info = model_version(client, name, ref)
        resolved[stage] = StageVersion(stage, name, str(info.version), info.tags.get("content_hash", ""), info)
    return resolved


def stage_folder(version: StageVersion, cache: Path) -> Path:
    """The version's stage folder, downloaded once into `cache/registry/<content hash>` (atomically). A LoRA adapter
    version's is its base version's stage folder with the adapter merged in (`merged_stage_folder`)."""
    import mlflow.artifacts

    if version.version_info is not None and ADAPTER_TAG in (version.version_info.tags or {}):
        return merged_stage_folder(version, cache)
    key = version.content_hash or f"{version.name}-{version.version}"
    target = cache / "registry" / key
    folder = target / "artifacts" / STAGE_ARTIFACT
    if (target / COMPLETE).is_file():
        return folder
    with atomic.folder_in_place(target) as staging:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                            dst_path=str(staging))
        downloaded = staging / "artifacts" / STAGE_ARTIFACT
        if not (downloaded / "model_index.json").is_file():
            raise RegistryLookupError(f"{version.label}: no stage folder in its artifacts (not a show1 model)")
        try:
            check_folder(downloaded)  # what arrived is what was registered
        except (IntegrityError, UnsafeWeightsError) as exc:
            raise RegistryLookupError(f"{version.label}: {exc}") from None
        (staging / COMPLETE).write_text(version.label)
    return folder


def merged_stage_folder(version: StageVersion, cache: Path) -> Path:
    """A LoRA adapter version as a stage folder every loader takes: its base version's stage folder (downloaded as
    any version) with the UNet's weights replaced by the adapter merged into them, made once into
    `cache/registry/<the adapter version's content hash>/merged` (atomically, sealed; the adapter as downloaded and
    checked beside it)."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from show1.training import lora

    target = cache / "registry" / (version.content_hash or f"{version.name}-{version.version}")
    folder = target / MERGED
    if (target / COMPLETE).is_file():
        return folder
    tags = version.version_info.tags
    info = model_version(MlflowClient(), version.name, tags.get(BASE_VERSION_TAG, ""))  # the fluent store's
    base = StageVersion(version.stage, version.name, str(info.version), info.tags.get("content_hash", ""), info)
    if ADAPTER_TAG in (info.tags or {}) or base.content_hash != tags.get(BASE_HASH_TAG):
        raise RegistryLookupError(f"{version.label}: its base version {base.label} is not the full stage it was "
                                  f"registered on (content hash {tags.get(BASE_HASH_TAG, '?')[:12]}…)")
    base_folder = stage_folder(base, cache)
    with atomic.folder_in_place(target) as staging:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                            dst_path=str(staging))
        adapter = staging / "artifacts" / STAGE_ARTIFACT
        try:
            check_folder(adapter, sealed=True)  # what arrived is what was registered
            if lora.read_base(adapter).get("content_hash") != base.content_hash:
                raise IntegrityError(f"its base.json names another base than {base.label}")
            lora.merge_adapter_folder(version.stage, base_folder, adapter / lora.ADAPTER, staging / MERGED)
        except (IntegrityError, UnsafeWeightsError, FileNotFoundError, ValueError) as exc:
            raise RegistryLookupError(f"{version.label}: {exc}") from None
        (staging / COMPLETE).write_text(version.label)
    return folder


@dataclass
class LoadedCascade:
    pipeline: Any  # Show1Pipeline; None when only located (`locate_cascade`: Dask workers load their own)
    sources: dict[str, str]  # stage -> `name/version` (registry) or the stage folder
    versions: dict[str, StageVersion]  # empty for local folders
    folders: dict[str, Path] = field(default_factory=dict)  # stage -> its stage folder on this machine
    first_frame: Path | None = None  # sr1's IF-II-L first-frame model folder, when one is used

    @property
    def from_registry(self) -> bool:
        return bool(self.versions)

    @property
    def pinned(self) -> str | None:
        """The registry versions as a reference that always names these versions (`base=3,interp=2`), even after
        an alias moves: what another process loads to get the same models. None for local folders."""
        return ",".join(f"{stage}={v.version}" for stage, v in self.versions.items()) or None


def locate_cascade(params: Params, stages: tuple[str, ...], from_registry: str | None = None,
                   weights_dir: Path | None = None) -> LoadedCascade:
    """The cascade's stage folders (registry versions downloaded into the cache), without loading a model."""
    from show1.models.configs import FIRST_FRAME_FOLDER
    from show1.pipelines.cascade import stage_folders

    if (weights_dir is None) == (from_registry is None):
        raise ValueError("give exactly one of --weights-dir DIR and --from-registry REF")
    first_frame = params.sampling.first_frame_model if "sr1" in stages else None
    if from_registry is not None:
        versions = resolve(params, parse_refs(from_registry, stages))
        folders = {stage: stage_folder(v, params.paths.cache) for stage, v in versions.items()}
        sources = {stage: v.label for stage, v in versions.items()}
        if first_frame is None and "sr1" in folders and (folders["sr1"] / FIRST_FRAME_FOLDER).is_dir():
            first_frame = folders["sr1"] / FIRST_FRAME_FOLDER
    else:
        assert weights_dir is not None
        folders = {stage: folder.resolve() for stage, folder in stage_folders(weights_dir, stages).items()}
        sources = {stage: str(folder) for stage, folder in folders.items()}
        versions = {}
    return LoadedCascade(None, sources, versions, folders, first_frame)


def load_cascade(params: Params, stages: tuple[str, ...], from_registry: str | None = None,
                 weights_dir: Path | None = None, torch_dtype: Any = None) -> LoadedCascade:
    """The cascade from registry references (`champion`, `3,2,5,1`, …) or from a folder of stage folders, with
    sr1's IF-II-L first-frame model when `sampling.first_frame_model` names one, else when the registered sr1
    version carries one."""
    from show1.pipelines.cascade import Show1Pipeline
    from show1.pipelines.first_frame import load_first_frame_model

    cascade = locate_cascade(params, stages, from_registry, weights_dir)
    cascade.pipeline = Show1Pipeline.from_folders(cascade.folders, torch_dtype=torch_dtype)
    if cascade.first_frame is not None:
        cascade.pipeline.first_frame_model = load_first_frame_model(cascade.first_frame, torch_dtype)
    return cascade
