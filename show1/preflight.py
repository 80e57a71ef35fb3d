"""What `show1 run` reads, checked before it starts: a missing manifest or a prompt file that is not text is one line
at once, not a traceback after curation and training.

Only reads: the manifest (its header and rows), the prompt set, and whether the model files params.yaml names are
there. What each step checks on its own (a video's frames, a weight file's seal) is still checked there.
"""

from __future__ import annotations

from pathlib import Path

from show1.config import Params
from show1.data.errors import ManifestError
from show1.data.manifest import read_manifest
from show1.evaluation.prompts import load_prompt_set
from show1.inputs import InputError, check_seed


def check_run_inputs(params: Params, manifest: Path | str | None = None, prompts: str | None = None,
                     limit: int | None = None) -> None:
    """Raise an InputError naming the first input of a whole-cascade run that cannot be used: the manifest
    (`manifest`, else paths.manifest), the prompt set (`prompts`, else evaluate.prompts; `limit`, else
    evaluate.limit), evaluate.seed for that many videos, and the model files and folders params names."""
    check_manifest(params, manifest)
    cfg = params.evaluate
    option = "--prompts" if prompts else "evaluate.prompts"
    try:
        prompt_set = load_prompt_set(prompts or cfg.prompts, limit or cfg.limit, cfg.videos)
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8, a line of control characters, empty
        raise InputError(f"{option}: {exc}") from None
    check_seed(cfg.seed, "evaluate.seed", count=len(prompt_set.prompts))
    check_model_paths(params)


def check_manifest(params: Params, manifest: Path | str | None = None) -> None:
    """The manifest (`manifest`, else paths.manifest) exists, reads, and has the columns curate.columns names."""
    path = Path(manifest) if manifest else params.paths.manifest
    option = "--manifest" if manifest else "paths.manifest"
    try:
        read_manifest(path, params.curate.columns)
    except ManifestError as exc:
        raise InputError(f"{option}: {exc}") from None
    except OSError as exc:  # a file without read permission
        raise InputError(f"{option}: {path}: cannot be read ({exc.strerror or exc})") from None


def check_model_paths(params: Params) -> None:
    """Each model file or folder params names (evaluation's metric models, sr1's first-frame model) is there."""
    cfg = params.evaluate
    files = {"evaluate.inception": cfg.inception, "evaluate.i3d": cfg.i3d, "evaluate.classifier": cfg.classifier}
    for key, path in files.items():
        if path is not None and not Path(path).is_file():
            raise InputError(f"{key} {path}: file not found (a local TorchScript file; set it in params.yaml)")
    folders = {"evaluate.clip": (cfg.clip, "config.json"),
               "sampling.first_frame_model": (params.sampling.first_frame_model, "model_index.json")}
    for key, (folder, marker) in folders.items():
        if folder is not None and not (Path(folder) / marker).is_file():
            raise InputError(f"{key} {folder}: not a model folder (no {marker}; set it in params.yaml)")
