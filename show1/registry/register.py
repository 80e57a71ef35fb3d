"""`show1 register`: a stage folder → an MLflow pyfunc model → a version of `<prefix>-<stage>` with the alias
`challenger` and lineage tags.

A registered model is self-contained: its `artifacts/stage/` is a stage folder in the published layout,
with the text encoder it was trained with (the published interp and sr1 folders carry their own copy of T5
too). Registration is idempotent by content hash (the stage's weights, configs and text encoder): the same
checkpoint registered twice, even by two processes at once, is one version.

A LoRA run's folder (show1.training.lora) becomes a version of the same model whose artifacts hold only the adapter
and a base.json naming its base version, which must be registered (tags `show1.adapter=lora`,
`show1.base_version`); its content hash covers the adapter and the base's content hash. Loading it from the registry
merges the adapter into the base version's weights (show1.registry.resolve).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from show1 import integrity
from show1.config import Params
from show1.faults import fault_point
from show1.integrity import IntegrityError
from show1.models.configs import FIRST_FRAME_COMPONENTS, FIRST_FRAME_FOLDER, STAGE_COMPONENTS
from show1.models.text_layout import write_stage_layout
from show1.provenance import digest_table_hash, file_digest, folder_files, tree_digest
from show1.registry import pyfunc_entry, stage_model
from show1.registry.init_source import FROM_HASH_TAG, FROM_VERSION_TAG
from show1.registry.names import CHALLENGER, model_name
from show1.store import connect, experiment_id
from show1.training import lora
from show1.training.tracking import NotInStore, run_in_store, training_run_id
from show1.weight_files import UnsafeWeightsError, check_folder, check_parts

MODEL_TYPE = "show1-stage"
# On the logged model only: which process is uploading it (so a rerun can tell a killed registration from a live one).
HOST_TAG, PID_TAG = "show1.registration_host", "show1.registration_pid"
TEXT_PARTS = ("tokenizer", "text_encoder")

# What a person browsing the registry reads about each model.
STAGE_DESCRIPTIONS = {
    "base": "Show-1 keyframe stage: text → 8 keyframes at 64×40 (pixel-space 3D UNet, IF-style ε and learned "
            "variance, T5/MiniLM text conditioning).",
    "interp": "Show-1 temporal interpolation stage: 8 keyframes → 29 frames at 64×40 (pixel-space 3D UNet "
              "conditioned on the segment's end frames and a mask).",
    "sr1": "Show-1 pixel super-resolution stage: 29 frames 64×40 → 256×160 (pixel-space 3D UNet, noised ×4 "
           "upsample as condition, windows of 8 frames).",
    "sr2": "Show-1 expert-translation stage: 29 frames 256×160 → 576×320 (latent 3D UNet + VAE, SDEdit at "
           "strength 0.8, trained on timesteps 0–900).",
}
ALIAS_HELP = ("Aliases: `challenger` is the latest registered version; `champion` is the version that passed "
              "the promotion gate (`show1 promote`). Load one with "
              "mlflow.pyfunc.load_model('models:/{name}@champion').")
# Pipeline class names a stage folder may declare: ours and the published Show-1 ones.
STAGE_CLASSES = {
    "base": {"Show1BasePipeline", "TextToVideoIFPipeline"},
    "interp": {"Show1InterpolationPipeline", "TextToVideoIFInterpPipeline"},
    "sr1": {"Show1SR1Pipeline", "TextToVideoIFSuperResolutionPipeline_Stage2",
            "TextToVideoIFSuperResolutionPipeline_Cond"},
    "sr2": {"Show1SR2Pipeline", "VideoToVideoSDPipeline"},
}
# Lineage tags copied from the training run onto the version.
TRAINING_TAGS = ("git_commit", "data_version", "data_dvc_md5", "params_hash", "text_encoder_key", FROM_VERSION_TAG,
                 FROM_HASH_TAG)


class RegistrationError(ValueError):
    """A checkpoint cannot be registered as it is; the message names what and why."""


class ArtifactStoreError(RegistrationError):
    """The model's files could not be uploaded (the store is down or refuses): not the input's fault."""


def retryable(exc: BaseException) -> bool:
    """Whether a failed registration may succeed when tried again: an upload that failed, a store that was busy or
    answered 5xx/429, files or network (OSError). Not bad input (RegistrationError names what to fix), a store that
    cannot be opened for good, or a bug."""
    from mlflow.exceptions import MlflowException

    from show1.store import StoreError

    if isinstance(exc, ArtifactStoreError):
        return True
    if isinstance(exc, StoreError):  # a busy or unreachable store is worth another try; a broken one is not
        cause = exc.__cause__ or exc.__context__
        return cause is not None and retryable(cause)
    if isinstance(exc, RegistrationError):
        return False
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, OSError)  # requests' and urllib3's connection errors are OSErrors too


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    content_hash: str
    created: bool  # False: the same content was registered before, this is that version
    note: str | None = None  # what registering did besides: its training run logged into this store from another

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def stage_components(folder: Path, stage: str) -> list[str]:
    """The component folders of a stage folder (from its model_index.json); errors name what is missing."""
    index_file = folder / "model_index.json"
    if not folder.is_dir():
        raise RegistrationError(f"{folder}: checkpoint folder not found (train the {stage} stage first: "
                                f"show1 train --stage {stage})")
    if not index_file.is_file():
        raise RegistrationError(f"{folder}: no model_index.json, so not a stage folder")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise RegistrationError(f"{index_file}: not valid JSON ({exc})") from exc
    declared = index.get("_class_name")
    if declared not in STAGE_CLASSES[stage]:
        raise RegistrationError(f"{folder}: a {declared} folder, not a {stage} stage "
                                f"(expected one of {', '.join(sorted(STAGE_CLASSES[stage]))})")
    components = [name for name, entry in index.items()
                  if not name.startswith("_") and isinstance(entry, list) and entry and entry[0] is not None]
    required = set(STAGE_COMPONENTS[stage])
    missing = sorted(name for name in required | set(components) if not (folder / name).is_dir())
    if missing:
        raise RegistrationError(f"{folder}: missing component folder(s) {', '.join(missing)}")
    return sorted(set(components) | required)


def text_encoder_source(folder: Path, explicit: Path | None, training: Any) -> Path | None:
    """The text encoder to bundle: None when the folder has its own; else `--text-encoder`, else the one the
    training run used (its `text_encoder` param)."""
    if (folder / "text_encoder").is_dir() and explicit is None:
        return None
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise RegistrationError(f"--text-encoder {explicit}: folder not found")
        return Path(explicit)
    recorded = training.data.params.get("text_encoder") if training is not None else None
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    hint = f" (its training run used {recorded}, which is gone)" if recorded else ""
    raise RegistrationError(f"{folder} has no text_encoder/{hint}: pass --text-encoder DIR, the encoder the "
                            "stage was trained with")


def first_frame_source(params: Params, stage: str) -> Path | None:
    """sr1's IF-II-L folder (`sampling.first_frame_model`), registered with sr1 when configured; checked here."""
    if stage != "sr1" or params.sampling.first_frame_model is None:
        return None
    try:
        return check_parts(params.sampling.first_frame_model, FIRST_FRAME_COMPONENTS, "sampling.first_frame_model")
    except (FileNotFoundError, IntegrityError, UnsafeWeightsError) as exc:
        raise RegistrationError(str(exc)) from None


def _first_frame_files(first_frame: Path) -> list[tuple[str, Path]]:
    files = [(f"{FIRST_FRAME_FOLDER}/model_index.json", first_frame / "model_index.json")]
    for name in FIRST_FRAME_COMPONENTS:
        files += folder_files(first_frame / name, f"{FIRST_FRAME_FOLDER}/{name}/")
    return files


def content_hash(folder: Path, components: list[str], text_source: Path | None,
                 verified: dict[str, str] | None = None, first_frame: Path | None = None) -> str:
    """sha256 over the files the registered model is made of: model_index.json, the component folders, the
    bundled text encoder's files and sr1's first-frame model. `verified`: sha256 per folder-relative name, already
    checked (the folder's seal), so those files are not hashed a second time."""
    files = [("model_index.json", folder / "model_index.json")]
    for name in components:
        if text_source is not None and name in TEXT_PARTS:
            continue
        files += folder_files(folder / name, f"{name}/")
    if text_source is not None:
        files += folder_files(text_source, "text_encoder_source/")
    if first_frame is not None:
        files += _first_frame_files(first_frame)
    return tree_digest(files, verified)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file where the filesystem allows (the artifact store copies it anyway), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, copy_function=_link_or_copy)


def assemble_model_folder(folder: Path, components: list[str], text_source: Path | None, target: Path,
                          first_frame: Path | None = None) -> None:
    """Write the stage folder that becomes the model's artifacts: only the pipeline's components (a training
    checkpoint's optimizer state and EMA file stay behind), plus the bundled text encoder and, for sr1, the parts
    of its IF-II-L first-frame model in `first_frame/` (not IF-II-L's own T5, safety checker or watermarker)."""
    target.mkdir(parents=True)
    if first_frame is not None:
        (target / FIRST_FRAME_FOLDER).mkdir()
        shutil.copy2(first_frame / "model_index.json", target / FIRST_FRAME_FOLDER / "model_index.json")
        for name in FIRST_FRAME_COMPONENTS:
            _link_tree(first_frame / name, target / FIRST_FRAME_FOLDER / name)
    index = json.loads((folder / "model_index.json").read_text())
    for name in components:
        if text_source is None or name not in TEXT_PARTS:
            _link_tree(folder / name, target / name)
    if text_source is not None:
        if all((text_source / part).is_dir() for part in TEXT_PARTS):  # already in the stage layout
            for part in TEXT_PARTS:
                _link_tree(text_source / part, target / part)
        elif not write_stage_layout(text_source, target, _link_or_copy):
            # A flat folder whose files cannot simply be placed (no safetensors weights, an unknown tokenizer
            # file): load it (pickled weights are refused) and save it in the stage layout.
            from show1.models.text import load_text_encoder

            tokenizer, encoder = load_text_encoder(text_source)
            tokenizer.save_pretrained(target / "tokenizer")
            encoder.save_pretrained(target / "text_encoder", safe_serialization=True)
        tokenizer_config = json.loads((target / "tokenizer" / "tokenizer_config.json").read_text())
        encoder_config = json.loads((target / "text_encoder" / "config.json").read_text())
        index["tokenizer"] = ["transformers", tokenizer_config.get("tokenizer_class", "AutoTokenizer")]
        index["text_encoder"] = ["transformers", (encoder_config.get("architectures") or ["AutoModel"])[0]]
    (target / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    integrity.seal(target)  # whoever downloads the version can check it arrived whole


def _requirements() -> list[str]:
    pins = []
    for package in ("show1", "torch", "diffusers", "transformers", "safetensors", "numpy", "pandas"):
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def _versions_with_hash(client: Any, name: str, digest: str) -> list[Any]:
    found = client.search_model_versions(f"name = '{name}' and tags.content_hash = '{digest}'")
    return sorted(found, key=lambda v: int(v.version))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


WORK_PREFIX = "show1-register-"


def _work_folder_prefix() -> str:
    """The name a registration's work folder starts with: who made it (`show1-register-<pid>@<host>-`)."""
    return f"{WORK_PREFIX}{os.getpid()}@{socket.gethostname()}-"


def remove_stale_work_folders(root: Path | None = None) -> list[Path]:
    """Delete the work folders (under `root`, the temporary folder by default) of registrations on this host whose
    process no longer runs: a registration killed while it assembled or uploaded its model leaves a whole copy of
    the stage there. Folders of running registrations, of other hosts and of unknown owners are left alone."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for folder in root.glob(f"{WORK_PREFIX}*@*"):
        pid, _, rest = folder.name.removeprefix(WORK_PREFIX).partition("@")
        host = rest.rsplit("-", 1)[0]  # what follows the last "-" is tempfile's random part
        if folder.is_dir() and pid.isdigit() and host == socket.gethostname() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def linked_model_id(version: Any) -> str | None:
    """The logged model behind a version: `model_id` where the store keeps it, else its `models:/<id>` source."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = str(getattr(version, "source", "") or "")
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def remove_orphans(client: Any, experiment: str, digest: str, versions: list[Any]) -> list[str]:
    """Delete logged models a killed registration of this content left behind: not behind any model version,
    and either FAILED or created by a process of this host that no longer runs. A registration in progress
    elsewhere (its process alive, or another host) is left alone. Returns the deleted model ids."""
    used = {linked_model_id(v) for v in versions}
    removed = []
    for logged in client.search_logged_models([experiment], filter_string=f"tags.content_hash = '{digest}'"):
        if logged.model_id in used:
            continue
        tags, status = logged.tags or {}, str(getattr(logged.status, "name", logged.status))
        ours = tags.get(HOST_TAG) == socket.gethostname() and tags.get(PID_TAG, "").isdigit()
        if status.endswith("FAILED") or (ours and not _process_alive(int(tags[PID_TAG]))):
            client.delete_logged_model(logged.model_id)
            removed.append(logged.model_id)
    return removed


def ensure_registered_model(client: Any, name: str, stage: str) -> None:
    """Create `name` with a description a person can read in the registry UI (no-op when it exists)."""
    from mlflow.exceptions import MlflowException

    description = f"{STAGE_DESCRIPTIONS[stage]}\n\n{ALIAS_HELP.format(name=name)}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, tags={"show1.stage": stage}, description=description)
        except MlflowException:  # another process created it meanwhile
            client.get_registered_model(name)


def _version_description(stage: str, folder: Path, digest: str, tags: dict[str, str], training: Any) -> str:
    lines = [f"{stage} stage registered from {folder}.", f"Content hash: {digest}."]
    if stage_model.ADAPTER_TAG in tags:
        lines.append(f"A LoRA adapter (rank {tags.get('lora_rank')}) on version {tags[stage_model.BASE_VERSION_TAG]}, "
                     "merged into it when loaded.")
    if training is not None:
        loss = training.data.metrics.get("loss")
        steps = training.data.params.get("train.max_steps")
        lines.append(f"Training run {training.info.run_id} ({training.info.status}"
                     + (f", final loss {loss:.4f}" if loss is not None else "") + ")"
                     + (f", up to {steps} steps" if steps else "") + ".")
    for key, label in (("data_version", "Data version"), ("data_dvc_md5", "DVC data hash"),
                       ("git_commit", "Code commit"), ("params_hash", "Params hash"),
                       ("text_encoder_key", "Text encoder content hash (the key of its caption embeddings)"),
                       (FROM_VERSION_TAG, "Fine-tuned from")):
        if key in tags:
            lines.append(f"{label}: {tags[key]}.")
    return "\n".join(lines)


def _mark_failed(mlflow: Any, model_id: str) -> None:
    """Mark a logged model whose upload failed; a store that cannot take even that leaves it PENDING (an orphan the
    next registration of the same content removes)."""
    with contextlib.suppress(Exception):
        mlflow.finalize_logged_model(model_id, "FAILED")


@dataclass(frozen=True)
class _Stage:
    """A stage folder as registration sees it: what it is made of and its content hash."""

    components: list[str]
    text_source: Path | None
    first_frame: Path | None
    digest: str


def _training_run(client: Any, params: Params, folder: Path, run_id: str | None) -> tuple[str | None, Any, str | None]:
    """The training run behind `folder` in this store: `run_id`, else the one its run folder records (logged into this
    store first when it was tracked in another one); its MLflow run, and a note saying what was copied."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            return run_id, client.get_run(run_id), None
        except MlflowException as exc:
            raise RegistrationError(f"training run {run_id} (of {folder}) is not in the store "
                                    f"{mlflow.get_tracking_uri()}: pass --run-id of a run in this store") from exc
    run_dir = next((parent for parent in (folder.parent, folder.parent.parent) if training_run_id(parent)), None)
    if run_dir is None:
        return None, None, None
    try:
        found = run_in_store(params, run_dir)
    except NotInStore as exc:
        raise RegistrationError(
            f"{folder}: {exc}. Register it with MLFLOW_TRACKING_URI set to the store it was trained with, pass "
            f"--run-id of a training run in this store, or train the stage again") from None
    if found is None:
        return None, None, None
    return found.run_id, client.get_run(found.run_id), found.note(run_dir)


def _checked_stage(params: Params, stage: str, folder: Path, text_encoder: Path | None, training: Any,
                   say: Callable[[str], None]) -> _Stage:
    """Check a stage folder as registration takes it and compute its content hash."""
    components = stage_components(folder, stage)
    try:
        check_folder(folder)  # never register a damaged checkpoint (or one that show1 would refuse to load)
    except (IntegrityError, UnsafeWeightsError) as exc:
        raise RegistrationError(str(exc)) from None
    verified = (integrity.read_seal(folder) or {}).get("files")
    text_source = text_encoder_source(folder, text_encoder, training)
    first_frame = first_frame_source(params, stage)
    say("hashing the checkpoint")
    return _Stage(components, text_source, first_frame,
                  content_hash(folder, components, text_source, verified, first_frame))


def register_stage(params: Params, stage: str, checkpoint: Path | None = None, text_encoder: Path | None = None,
                   run_id: str | None = None, alias: str = CHALLENGER,
                   on_status: Callable[[str], None] | None = None) -> RegisteredVersion:
    """Register `checkpoint` (default: paths.runs/STAGE/final) as a version of `<prefix>-<stage>`; point
    `alias` at it. Returns the existing version when the same content was registered before. A LoRA run's folder
    (adapter/ and base.json, show1.training.lora) becomes a version holding only the adapter (`register_adapter`)."""
    say = on_status or (lambda _: None)
    if stage not in STAGE_COMPONENTS:
        raise RegistrationError(f"unknown stage {stage!r} (stages: {', '.join(STAGE_COMPONENTS)})")
    folder = Path(checkpoint or params.paths.runs / stage / "final")
    if lora.is_adapter_folder(folder):
        return register_adapter(params, stage, folder, run_id, alias, say, text_encoder)
    stage_components(folder, stage)  # a missing or wrong folder is refused before the store is opened
    client = connect(params.tracking)
    run_id, training, note = _training_run(client, params, folder, run_id)
    checked = _checked_stage(params, stage, folder, text_encoder, training, say)
    tags = {"stage": stage, "content_hash": checked.digest, "source_folder": str(folder.resolve()),
            "profile": params.profile}
    if checked.text_source is not None:
        tags["text_encoder_source"] = str(checked.text_source.resolve())
    if checked.first_frame is not None:
        tags["first_frame_source"] = str(checked.first_frame.resolve())
    version = _publish(client, params, stage, folder, checked.digest, tags, run_id, training, alias, say,
                       lambda target: assemble_model_folder(folder, checked.components, checked.text_source, target,
                                                            checked.first_frame),
                       {"stage": stage})
    return replace(version, note=note)


# --- LoRA adapters ------------------------------------------------------------------------------------------------


def adapter_content_hash(folder: Path, base_hash: str, verified: dict[str, str] | None = None) -> str:
    """sha256 over the adapter's files and its base version's content hash: the same adapter on another base is
    another version."""
    digests = {name: (verified or {}).get(name) or file_digest(path)
               for name, path in folder_files(folder / lora.ADAPTER, f"{lora.ADAPTER}/")}
    return digest_table_hash(digests | {"base": base_hash})


def base_version(client: Any, params: Params, stage: str, name: str, record: dict[str, Any],
                 say: Callable[[str], None] = lambda _: None, text_encoder: Path | None = None) -> Any:
    """The registered version of `name` a LoRA adapter's base.json names: by its content hash when the run started
    from a registered version, else by the content hash of its stage folder (`folder`) as registering that folder
    (with `text_encoder`, else its training run's) computes it. Refuses when the base is not registered (or its
    folder is gone or changed)."""
    digest = record.get("content_hash")
    source = Path(record.get("folder") or record.get("source") or "")
    hint = f"register it first: show1 register --stage {stage} --checkpoint {record.get('source')}"
    if not digest:
        if not (source / "model_index.json").is_file():
            raise RegistrationError(f"the adapter's base {record.get('source')} is not a registered version and its "
                                    f"stage folder {source} is gone: register the base, then train the adapter "
                                    f"from it (--init-from models:/{name}/N)")
        seal = integrity.read_seal(source) or {}
        if record.get("folder_hash") and seal.get("content_hash") != record["folder_hash"]:
            raise RegistrationError(f"the adapter's base {source} changed since the adapter was trained on it "
                                    "(its content hash differs from base.json's folder_hash)")
        _, training, copied = _training_run(client, params, source, None)
        if copied:
            say(copied)
        digest = _checked_stage(params, stage, source, text_encoder, training, say).digest
    found = _versions_with_hash(client, name, digest)
    if not found:
        raise RegistrationError(f"the adapter's base {record.get('source')} (content hash {digest[:12]}…) is not a "
                                f"registered version of {name}: {hint}")
    if stage_model.ADAPTER_TAG in (found[0].tags or {}):  # one level: an adapter's base is a full version
        raise RegistrationError(f"the adapter's base {name}/{found[0].version} is itself a LoRA adapter: register "
                                "its merged stage folder (the registry cache's `merged/`) as a full version and "
                                "train the adapter on that")
    return found[0]


def _assemble_adapter(folder: Path, base: dict[str, Any], target: Path) -> None:
    """The adapter version's stage folder: adapter/ and base.json naming the base version; sealed."""
    target.mkdir(parents=True)
    _link_tree(folder / lora.ADAPTER, target / lora.ADAPTER)
    lora.write_base(target, base)
    integrity.seal(target)


def register_adapter(params: Params, stage: str, folder: Path, run_id: str | None = None, alias: str = CHALLENGER,
                     on_status: Callable[[str], None] | None = None,
                     text_encoder: Path | None = None) -> RegisteredVersion:
    """Register a LoRA run's final/ (or checkpoint) as a version of `<prefix>-<stage>` whose artifacts hold only the
    adapter, tagged with its base version (`show1.base_version`, which must be registered) and `show1.adapter=lora`.
    A cascade loaded from the registry merges it into its base at load time (show1.registry.resolve).
    `text_encoder`: the one the base folder was registered with, when its training run does not say."""
    say = on_status or (lambda _: None)
    try:
        check_folder(folder, sealed=True)
        record = lora.read_base(folder)
        settings = lora.adapter_settings(folder / lora.ADAPTER)
    except (IntegrityError, UnsafeWeightsError, ValueError, FileNotFoundError) as exc:
        raise RegistrationError(str(exc)) from None
    if record["stage"] != stage:
        raise RegistrationError(f"{folder}: an adapter of the {record['stage']} stage, not of {stage}")
    client = connect(params.tracking)
    run_id, training, note = _training_run(client, params, folder, run_id)
    name = model_name(params.registry, stage)
    base = base_version(client, params, stage, name, record, say, text_encoder)
    base_hash = base.tags["content_hash"]
    digest = adapter_content_hash(folder, base_hash, (integrity.read_seal(folder) or {}).get("files"))
    tags = {"stage": stage, "content_hash": digest, "source_folder": str(folder.resolve()), "profile": params.profile,
            stage_model.ADAPTER_TAG: "lora", stage_model.BASE_VERSION_TAG: str(base.version),
            stage_model.BASE_HASH_TAG: base_hash, "lora_rank": str(settings["r"]),
            "lora_alpha": str(settings.get("lora_alpha"))}
    record = {"stage": stage, "name": name, "version": str(base.version), "content_hash": base_hash}
    version = _publish(client, params, stage, folder, digest, tags, run_id, training, alias, say,
                       lambda target: _assemble_adapter(folder, record, target),
                       {"stage": stage, stage_model.BASE_MODEL: f"models:/{name}/{base.version}"})
    return replace(version, note=note)


# --- publishing a version -----------------------------------------------------------------------------------------


def _publish(client: Any, params: Params, stage: str, folder: Path, digest: str, tags: dict[str, str],
             run_id: str | None, training: Any, alias: str, say: Callable[[str], None],
             assemble: Callable[[Path], None], model_config: dict[str, str]) -> RegisteredVersion:
    """The version of `<prefix>-<stage>` with content `digest`: the existing one, or a new one whose pyfunc model's
    artifacts are the stage folder `assemble(target)` writes; point `alias` at it."""
    import mlflow

    name = model_name(params.registry, stage)
    ensure_registered_model(client, name, stage)
    existing = _versions_with_hash(client, name, digest)
    experiment = experiment_id(client, params.tracking)
    if removed := remove_orphans(client, experiment, digest, existing):
        say(f"removed {len(removed)} logged model(s) left by an interrupted registration")
    if existing:
        client.set_registered_model_alias(name, alias, existing[0].version)
        return RegisteredVersion(name, str(existing[0].version), digest, created=False)

    if training is not None:
        tags = tags | {"training_run_id": training.info.run_id}
        tags |= {key: training.data.tags[key] for key in TRAINING_TAGS if key in training.data.tags}
    if stale := remove_stale_work_folders():
        say(f"removed {len(stale)} work folder(s) left by a killed registration")
    with tempfile.TemporaryDirectory(prefix=_work_folder_prefix()) as tmp:
        say("assembling the model folder")
        assemble(Path(tmp) / "stage")
        mlflow.pyfunc.save_model(
            path=Path(tmp) / "model", python_model=pyfunc_entry.__file__,
            artifacts={stage_model.STAGE_ARTIFACT: str(Path(tmp) / "stage")}, model_config=model_config,
            signature=stage_model.signature(stage), input_example=stage_model.input_example(stage),
            pip_requirements=_requirements(), metadata={"show1": {"stage": stage, "content_hash": digest}})
        owner = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
        logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, tags=tags | owner,
                                                model_type=MODEL_TYPE, experiment_id=experiment)
        fault_point("register.after_logged_model")
        try:
            say("uploading the model to the artifact store")
            client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
        except Exception as exc:
            _mark_failed(mlflow, logged.model_id)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ArtifactStoreError(
                f"uploading the {stage} model to the artifact store failed ({reason}); no version of {name} was "
                f"registered, and the logged model {logged.model_id} is marked FAILED. Is the tracking server's "
                "artifact store reachable? MLflow retries each request MLFLOW_HTTP_REQUEST_MAX_RETRIES times "
                "(default 7, backing off MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2 s doubled) before giving up") from exc
        except BaseException:
            _mark_failed(mlflow, logged.model_id)
            raise
        mlflow.finalize_logged_model(logged.model_id, "READY")
        fault_point("register.after_upload")
    version = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id, tags=tags,
                                          description=_version_description(stage, folder, digest, tags, training),
                                          model_id=logged.model_id)
    fault_point("register.after_version")
    # Two registrations of one content may race past the check above: the lowest version wins, others go.
    winner = _versions_with_hash(client, name, digest)[0]
    if str(winner.version) != str(version.version):
        client.delete_model_version(name, version.version)
        client.delete_logged_model(logged.model_id)
    client.set_registered_model_alias(name, alias, winner.version)
    return RegisteredVersion(name, str(winner.version), digest, created=str(winner.version) == str(version.version))
