"""`show1 …`: one entry point for people, DVC stages and Prefect tasks alike. Thin: logic lives in show1/."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from show1.config import DEFAULT_PARAMS, PROFILES, ConfigError, Params, apply_environment_defaults, load_params
from show1.inputs import InputError, check_prompt, check_seed, check_steps, printable
from show1.store import StoreError

# click's UsageError, from the click typer runs on (its own copy since typer 0.2x, the click package before).
UsageError: type[Exception] = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "UsageError")


class OneLineUsageErrors(TyperGroup):
    """show1's commands: a usage error click finds (an unknown option, a value of the wrong type or out of range) is
    one `error:` line too, not a usage text and a box."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # the subcommand's own arguments
            _usage_error(exc)


def _usage_error(exc: Any) -> NoReturn:
    if type(exc).__name__ == "NoArgsIsHelpError":  # `show1` alone: the help, as asked for
        raise exc
    where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
    fail(f"{exc.format_message()}{where}", code=exc.exit_code)


app = typer.Typer(
    name="show1", cls=OneLineUsageErrors,
    help="Curate, validate, train, register and evaluate a Show-1 style cascaded text-to-video model.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
)
out = Console(soft_wrap=True)  # paths are never wrapped mid-name
err = Console(stderr=True)


@dataclass
class Context:
    params_path: Path
    profile: str | None

    def params(self) -> Params:
        try:
            return load_params(self.params_path, self.profile)
        except ConfigError as exc:
            fail(str(exc), code=2)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` and exit with `code` (2: bad input). The message is printed as it is, never as rich
    markup, with control characters escaped: it may hold a user's prompt or file name."""
    err.print(Text.assemble(("error:", "bold red"), " ", printable(message)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def main(
    ctx: typer.Context,
    params: Annotated[Path, typer.Option("--params", help="The parameters file (YAML).")] = DEFAULT_PARAMS,
    profile: Annotated[str | None, typer.Option(
        help=f"Override the file's profile: {' | '.join(PROFILES)}.")] = None,
) -> None:
    """show1: the lifecycle of a Show-1 cascade, reproducible with one command.

    Settings come from params.yaml (see README); `--profile paper` switches to the published sizes.
    """
    apply_environment_defaults()
    if profile is not None and profile not in PROFILES:
        fail(f"--profile {profile!r} is not one of {', '.join(PROFILES)}", code=2)
    ctx.obj = Context(params, profile)


def _summary_table(summary: dict) -> Table:
    table = Table(title="curation summary", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("manifest rows", str(summary["rows"]))
    table.add_row("kept sources", str(summary["kept_sources"]))
    table.add_row("rejected rows", str(summary["rejected_rows"]))
    for reason, count in summary["rejected_by_reason"].items():
        table.add_row(f"  {reason}", str(count))
    table.add_row("clips (train / val)",
                  f"{summary['clips']} ({summary['clips_by_split']['train']} / {summary['clips_by_split']['val']})")
    table.add_row("frames per size", str(summary["frames"]))
    table.add_row("source seconds used", f"{summary['source_seconds']:.1f}")
    return table


def _executor(configured: Any, kind: str | None, workers: int | None, address: str | None) -> Any:
    """The configured Executor with --executor/--workers/--dask-address applied (an address implies dask); a bad
    combination exits 2 with the reason."""
    from pydantic import ValidationError

    from show1.config import Executor

    chosen = {"kind": kind or ("dask" if address else None), "workers": workers, "address": address}
    try:
        return Executor.model_validate(configured.model_dump() | {k: v for k, v in chosen.items() if v is not None})
    except ValidationError as exc:
        fail(f"--executor/--workers/--dask-address: {exc.errors()[0]['msg']}", code=2)


@app.command()
def curate(
    ctx: typer.Context,
    manifest: Annotated[Path | None, typer.Argument(
        help="CSV/TSV/JSONL manifest (video, caption[, id, start, end, split]). Default: paths.manifest.")] = None,
    out_dir: Annotated[str | None, typer.Option(
        "--out", help="Output folder for shards, index.jsonl, quarantine.jsonl: a path or an fsspec URL "
                      "(s3://bucket/prefix; credentials and AWS_ENDPOINT_URL from the environment). Default: "
                      "paths.curated.")] = None,
    executor: Annotated[str | None, typer.Option(
        help="Where chunks run: local (threads here) or dask (Dask worker processes). Default: "
             "curate.executor.kind.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="local: threads; dask: worker processes of the LocalCluster started for the run. Default: "
                    "curate.executor.workers.")] = None,
    dask_address: Annotated[str | None, typer.Option(
        help="A running Dask cluster's scheduler (tcp://HOST:PORT) to run the chunks on (implies --executor "
             "dask); its workers must see the manifest's files, and the output folder (or its URL).")] = None,
    force: Annotated[bool, typer.Option(help="Redo every chunk, even those already curated.")] = False,
    metrics: Annotated[Path | None, typer.Option(
        help="Also write the summary's numbers here (a DVC metrics file; the paths are in OUT/summary.json).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Probe, filter, clip and shard the videos of a manifest. Rejected rows go to quarantine.jsonl.

    Resumable: a rerun skips the chunks already curated with the same rows and settings. The chunks run on
    threads here or on a Dask cluster (--executor dask): the outputs are the same either way.
    Exits 0 with a summary unless no valid clip remains.
    """
    from tqdm import tqdm

    from show1 import atomic
    from show1.data.curate import NothingKept, plan_curation
    from show1.data.curate import curate as run_curation
    from show1.data.errors import ManifestError
    from show1.data.executors import chunk_runner
    from show1.data.folder import DataFolder

    params = ctx.obj.params()
    manifest = manifest or params.paths.manifest
    folder = DataFolder(out_dir or params.paths.curated)
    settings = _executor(params.curate.executor, executor, workers, dask_address)
    try:
        if not quiet:
            err.print(f"reading {manifest}", highlight=False)
        # Screening: the rows the manifest's fields and paths already rule out (no file is opened) are quarantined
        # here, so a manifest of a million dead rows shows its progress at once and makes no chunk of them.
        with tqdm(unit="row", desc="screening", disable=quiet or None, file=sys.stderr, mininterval=0.5) as bar:
            plan = plan_curation(manifest, folder, params, on_row=lambda: bar.update(1))
        chunked = len(plan.chunked)
        if not quiet and plan.screened:
            err.print(f"{len(plan.screened)} row(s) rejected before decoding; {chunked} row(s) to curate in "
                      f"{plan.chunk_count} chunk(s)", highlight=False)
        with tqdm(total=chunked, unit="row", desc="curating", disable=quiet or None, file=sys.stderr) as bar, \
                chunk_runner(settings, on_row=lambda: bar.update(1)) as run_chunks:
            summary = run_curation(manifest, folder, params, workers=settings.workers, force=force,
                                   on_row=lambda: bar.update(1), run_chunks=run_chunks, plan=plan)
    except ManifestError as exc:
        fail(str(exc), code=2)
    except NothingKept as exc:
        fail(str(exc))
    except RuntimeError as exc:  # e.g. another process holds the folder, no Dask scheduler at the address
        fail(str(exc))
    except OSError as exc:  # a full disk, a folder or store that refuses a write, a bucket that does not exist
        if atomic.is_disk_full(exc):  # nothing half-written is left: the rerun resumes with the chunks done
            fail(atomic.disk_full_message(exc, "run the same command again"))
        fail(f"--out {folder}: {exc}")
    data = summary.to_dict()
    if metrics:
        atomic.write_json(metrics, summary.metrics())
    out.print(_summary_table(data))
    out.print(f"index: {folder.name('index.jsonl')}\nquarantine: {folder.name('quarantine.jsonl')}", highlight=False)


@app.command()
def ingest(
    ctx: typer.Context,
    manifest: Annotated[str, typer.Argument(
        help="CSV/TSV/JSONL manifest: a path, or an fsspec URL (s3://bucket/incoming/new.csv) whose videos are "
             "http(s) URLs, package:// paths or paths under curate.allowed_roots.")],
    data: Annotated[str | None, typer.Option(
        "--data", help="The curated dataset: a folder or an fsspec URL (s3://bucket/prefix). Default: "
                       "paths.curated.")] = None,
    no_event: Annotated[bool, typer.Option("--no-event", help="Emit no show1.data.ingested event.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Curate the rows of MANIFEST that the dataset does not hold yet into it, beside the clips it has.

    Rows the dataset holds are skipped, earlier clips and shards stay as they are, and a new row that repeats a held
    clip is quarantined as a duplicate. The data contracts are checked before the new index is published. When new
    clips are kept, the Prefect event show1.data.ingested (data version, rows kept and quarantined) goes to the
    server at PREFECT_API_URL, delivered before the command exits. Nothing new kept: exit 0, no event, and why.
    """
    import json

    from tqdm import tqdm

    from show1 import atomic, events
    from show1.data.errors import ManifestError
    from show1.data.executors import chunk_runner
    from show1.data.folder import DataFolder, FolderUnavailable
    from show1.data.ingest import ContractBroken, IngestError
    from show1.data.ingest import ingest as run_ingest

    params = ctx.obj.params()
    folder = DataFolder(data or params.paths.curated)
    settings = params.curate.executor
    try:
        with tqdm(unit="row", desc="curating new rows", disable=quiet or as_json or None, file=sys.stderr) as bar, \
                chunk_runner(settings, on_row=lambda: bar.update(1)) as run_chunks:
            report = run_ingest(manifest, folder, params, workers=settings.workers, run_chunks=run_chunks,
                                on_row=lambda: bar.update(1))
    except ManifestError as exc:
        fail(str(exc), code=2)
    except (IngestError, ContractBroken, FolderUnavailable) as exc:
        fail(str(exc))
    except RuntimeError as exc:  # another process curates the folder, no Dask scheduler at the address
        fail(str(exc))
    except OSError as exc:  # a manifest URL that cannot be read, a folder or store that refuses a write
        if atomic.is_disk_full(exc):  # the published dataset is as it was: the rerun ingests the same new rows
            fail(atomic.disk_full_message(exc, "run the same command again"))
        fail(f"{manifest} → {folder}: {exc}")
    event: dict[str, Any] = {"name": report.event()["event"], "sent": False, "id": None}
    undelivered = None
    if report.nothing_kept:
        event["reason"] = report.nothing_kept
    elif no_event:
        event["reason"] = "--no-event"
    elif events.server() is None:
        event["reason"] = "no Prefect server configured (PREFECT_API_URL): no event sent; the data is ingested"
    else:
        try:
            event |= {"sent": True, "id": events.send(**report.event()), "server": events.server()}
        except events.EventNotSent as exc:
            event["reason"] = undelivered = str(exc)
    if as_json:
        out.print_json(json.dumps(report.to_dict() | {"event": event}))
    else:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.quarantined_by_reason.items())
        out.print(f"{manifest}: {report.rows} rows, {report.already_held} already held, {report.new_rows} new: "
                  f"{report.kept} kept ({report.new_clips} clips), {report.quarantined} quarantined"
                  + (f" ({reasons})" if reasons else ""), highlight=False)
        if report.data_version != report.previous_data_version:
            out.print(f"data version: {report.previous_data_version or 'none'} → {report.data_version} "
                      f"({report.clips} clips in {folder})", highlight=False)
        if event["sent"]:
            out.print(f"event {event['name']} sent to {event['server']} (id {event['id']})", highlight=False)
        else:
            out.print(f"no event: {event['reason']}", highlight=False)
    if undelivered:
        fail(undelivered)  # ingested, but the server that should hear of it did not


@app.command()
def validate(
    ctx: typer.Context,
    curated: Annotated[str | None, typer.Option(
        help="Curated folder, or its fsspec URL (s3://bucket/prefix). Default: paths.curated.")] = None,
    manifest: Annotated[Path | None, typer.Option(
        help="Also check this manifest. Default: paths.manifest; pass --no-manifest to skip.")] = None,
    no_manifest: Annotated[bool, typer.Option("--no-manifest", help="Skip the manifest suite.")] = False,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where result.json and data_docs/ go. Default: paths.validation.")] = None,
    metrics: Annotated[Path | None, typer.Option(
        help="Also write pass/fail counts here (a DVC metrics file).")] = None,
) -> None:
    """Check the data contracts (Great Expectations) of a manifest and a curated folder.

    Writes result.json and Data Docs HTML; exits non-zero naming each failed expectation.
    """
    from show1.data.contracts import ContractError, validate_data
    from show1.data.errors import ManifestError

    params = ctx.obj.params()
    curated = curated or params.paths.curated
    manifest = None if no_manifest else (manifest or params.paths.manifest)
    out_dir = out_dir or params.paths.validation
    try:
        report = validate_data(curated, params, out_dir, manifest=manifest)
    except (ContractError, ManifestError) as exc:
        fail(str(exc), code=2)
    if metrics:
        from show1 import atomic

        atomic.write_json(metrics, report.metrics())
    for name, suite in report.suites.items():
        mark = "[green]passed[/]" if suite["success"] else "[red]FAILED[/]"
        out.print(f"{name}: {mark} ({suite['evaluated']} expectations)")
    out.print(f"result: {report.result_path}", highlight=False)
    if report.docs_path:
        out.print(f"data docs: {report.docs_path}", highlight=False)
    if not report.success:
        fail("data contract broken:\n  " + "\n  ".join(report.failed_expectations()))


@app.command()
def embed(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(
        help="Curated folder (show1 curate), on this machine. Default: paths.curated.")] = None,
    text_encoder: Annotated[Path | None, typer.Option(
        help="Text encoder folder, the one training will use (paper: T5-XXL). Default: the packaged MiniLM of the "
             "tiny profile, as show1 train's.")] = None,
    dtype: Annotated[str, typer.Option(help="Stored precision: bf16 | fp16.")] = "bf16",
    batch_size: Annotated[int, typer.Option(
        min=1, help="Captions per encoder call. Training embeds a folder without a store at 16, so the default "
                    "stores the very numbers it would compute.")] = 16,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where the stores go (one folder per encoder, named by its content hash). Default: "
                      "DATA/embeddings, where show1 train looks.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Embed every distinct caption of a curated folder once, for training to read instead of the text encoder.

    Stores each caption's real tokens (and their count), keyed by the caption and the encoder's content hash: a
    changed encoder makes a new store. Resumable: a rerun embeds only the captions not stored yet (none: nothing is
    loaded or written). base, interp and sr1 training then never load the text encoder.
    """
    from tqdm import tqdm

    from show1 import atomic
    from show1.data.clip_index import IndexMissing
    from show1.data.text_embeddings import StoreError
    from show1.training.embed import embed_folder

    params = ctx.obj.params()
    data = data or str(params.paths.curated)
    if "://" in data:
        fail(f"--data {data}: show1 embed reads a curated folder on this machine; object stores are not supported "
             f"yet (copy it down first: aws s3 sync {data} DIR)", code=2)
    if dtype not in ("bf16", "fp16"):
        fail(f"--dtype {dtype!r} is not one of bf16, fp16", code=2)
    if text_encoder is not None and not text_encoder.is_dir():
        fail(f"--text-encoder {text_encoder}: folder not found", code=2)
    if not Path(data).is_dir():
        fail(f"--data {data}: folder not found (run show1 curate first)", code=2)
    _quiet_libraries()
    with tqdm(unit="caption", desc="embedding", disable=quiet or None, file=sys.stderr) as bar:
        try:
            report = embed_folder(Path(data), text_encoder, out_dir, dtype, batch_size,
                                  on_start=lambda n: setattr(bar, "total", n), on_caption=lambda: bar.update(1))
        except (IndexMissing, StoreError, FileNotFoundError, ValueError) as exc:
            fail(str(exc), code=2)
        except RuntimeError as exc:  # another show1 embed holds the store
            fail(str(exc))
        except OSError as exc:
            if atomic.is_disk_full(exc):
                fail(atomic.disk_full_message(exc, "run the same command again"))
            fail(f"embedding the captions of {data}: {exc}")
    out.print(f"{report.added} caption(s) embedded, {report.captions - report.added} already stored; "
              f"{report.stored} in {report.store}", highlight=False)


@app.command()
def train(
    ctx: typer.Context,
    stage: Annotated[str, typer.Option(help="base | interp | sr1 | sr2.")],
    profile: Annotated[str | None, typer.Option(help="tiny | paper (overrides params.yaml and show1 --profile).")]
    = None,
    data: Annotated[str | None, typer.Option(
        help="Curated folder (show1 curate): a path, or any fsspec URL (s3://bucket/curated), whose shards are "
             "streamed through a bounded, verified cache (train.data_cache; set train.shard_block too). "
             "Default: paths.curated.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run folder. Default: paths.runs/STAGE.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: train.max_steps).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(min=1, help="Default: train.checkpoint_every.")] = None,
    resume: Annotated[str | None, typer.Option(help="'latest': continue from the newest checkpoint.")] = None,
    init_from: Annotated[str | None, typer.Option(
        help="Fine-tune from a stage folder (ours, or a published show-1-* folder) or a registered version: "
             "models:/show1-base@champion, models:/show1-base/3 (resolved to its content hash and recorded, so "
             "lineage reads champion → fine-tune → new version). train.finetune's steps and learning rate apply.")]
    = None,
    init_2d: Annotated[Path | None, typer.Option(help="Inflate an IF-style 2D UNet folder.")] = None,
    text_encoder: Annotated[Path | None, typer.Option(
        help="Text encoder folder (paper: T5-XXL). Default: the packaged MiniLM of the tiny profile.")] = None,
    embeddings: Annotated[Path | None, typer.Option(
        help="Where show1 embed stored the captions' embeddings (the store of the --text-encoder is read, and the "
             "encoder never loaded, when it holds every caption). Default: DATA/embeddings.")] = None,
    metrics: Annotated[Path | None, typer.Option(
        help="Also write a summary (steps, final and mean last-10 loss) here (a DVC metrics file).")] = None,
    quiet: Annotated[bool, typer.Option(help="No per-step lines.")] = False,
    track: Annotated[bool, typer.Option(
        help="Log the run to MLflow (params.tracking). --no-track: only the files in the run folder.")] = True,
) -> None:
    """Train one stage of the cascade on curated clips; writes metrics.jsonl, checkpoints/ and final/.

    With --init-from it fine-tunes (train.finetune's steps and learning rate); with train.lora in params.yaml it
    trains LoRA adapters on the frozen UNet instead, and final/ is the adapter (show1 register names its base).

    Data-parallel in N processes: `torchrun --nproc_per_node N -m show1.cli train ...` or
    `accelerate launch --multi_gpu --num_processes N -m show1.cli train ...` (CPU-only machines too).
    train.batch_size stays the global batch; only the main process writes and prints.
    """
    from show1 import atomic
    from show1.data.shard_cache import CacheFull, StoreUnreachable
    from show1.training.trainer import TRAINABLE_STAGES
    from show1.training.trainer import train as run_training

    if profile is not None:
        if profile not in PROFILES:
            fail(f"--profile {profile!r} is not one of {', '.join(PROFILES)}", code=2)
        ctx.obj.profile = profile
    params = ctx.obj.params()
    if stage not in TRAINABLE_STAGES:
        fail(f"--stage {stage!r}: trainable stages are {', '.join(TRAINABLE_STAGES)}", code=2)
    data = data if data and "://" in data else Path(data) if data else params.paths.curated
    out_dir = out_dir or params.paths.runs / stage
    try:
        result = run_training(stage, data, out_dir, params, max_steps=max_steps, checkpoint_every=checkpoint_every,
                              resume=resume, init_from=init_from, init_2d=init_2d, text_encoder_dir=text_encoder,
                              track=track, embeddings_dir=embeddings,
                              on_step=None if quiet else lambda row: out.print(
                                  f"step {row['step']:>6}  loss {row['loss']:.5f}  lr {row['lr']:.2e}  "
                                  f"{row['samples_per_s']:.2f} samples/s", highlight=False))
    except (FileExistsError, FileNotFoundError, ValueError, LookupError, CacheFull, StoreUnreachable) as exc:
        fail(str(exc), code=2)
    except Exception as exc:  # a full disk (safetensors reports it in an error of its own, hence not just OSError)
        if not atomic.is_disk_full(exc):
            raise
        # A checkpoint is written whole or not at all: the run resumes from the last one written.
        fail(atomic.disk_full_message(exc, "run the same command again" if resume == "latest"
                                      else "resume: run the same command with --resume latest"))
    if not result.main_process:  # the other processes of a data-parallel run: the main one reports
        return
    if metrics:
        atomic.write_json(metrics, result.summary())
    if result.processes > 1:
        out.print(f"{result.processes} processes, " + (
            f"FSDP (sharded by {result.sharding}): each held {result.parameters_held:.0%} of the UNet's parameters"
            if result.sharding else "data-parallel: each held the whole UNet"), highlight=False)
    out.print(f"trained {stage} for {result.steps} steps\nmetrics: {result.run_dir / 'metrics.jsonl'}\n"
              f"final stage folder: {result.final}", highlight=False)


DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


@app.command("init-weights")
def init_weights(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for show-1-base, show-1-interpolation, …")],
    profile: Annotated[str, typer.Option(help="tiny (CPU, seconds) | paper (published sizes).")] = "tiny",
    text_encoder: Annotated[Path | None, typer.Option(
        help="Text encoder folder for the base stage (paper: a local T5-XXL). Default: tiny, the packaged MiniLM; "
             "paper, a random T5-XXL-shaped encoder with a tokenizer trained here (no download).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace stage folders that exist.")] = False,
) -> None:
    """Write randomly initialised weights for the four stages, in the layout of the published checkpoints.

    --profile paper writes the published sizes in bfloat16 (~20 GB with the random T5-XXL; sr2 gets a random
    OpenCLIP-H-shaped text encoder): a cascade that runs end to end with no download, for timing and memory.
    """
    if profile not in PROFILES:
        fail(f"--profile {profile!r} is not one of {', '.join(PROFILES)}", code=2)
    try:
        check_seed(seed)
    except InputError as exc:
        fail(str(exc), code=2)
    from show1.pipelines.weights import init_weights as write_weights

    try:
        written = write_weights(out_dir, profile, text_encoder_dir=text_encoder, seed=seed, overwrite=overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc), code=2)
    for stage, folder in written.items():
        out.print(f"{stage:>6}: {folder}", highlight=False)


@app.command("convert-weights")
def convert_weights(
    source: Annotated[Path, typer.Argument(help="A folder of weights with pickled files (e.g. a published "
                                                "Show-1 stage folder with .bin weights).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the converted copy (a new folder).")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it exists.")] = False,
) -> None:
    """Copy a weights folder with every pickled weight file (.bin, .pt, .ckpt, …) rewritten as safetensors.

    show1 loads safetensors only, because unpickling a file can run code. The conversion reads each pickle once
    with torch.load(weights_only=True), which accepts tensors and plain containers and refuses anything else;
    the copy is sealed with checksums.json. Files that already have safetensors beside them are left out.
    """
    from show1.weight_files import convert_folder

    try:
        counts = convert_folder(source, out_dir, overwrite=overwrite,
                                on_file=lambda name: err.print(f"converting {name}", highlight=False))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc), code=2)
    out.print(f"converted {counts['converted']} pickled file(s), copied {counts['copied']}, left out "
              f"{counts['skipped']} already in safetensors\nsafe copy: {out_dir}", highlight=False)


OFFLOAD_MODES = ("none", "model", "sequential")


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Argument(help="What the video shows (or --prompts FILE for many).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts", help="A text file of prompts, one per line ('#' starts a comment), or a shipped prompt set "
                          "(demo, ucf101): writes OUT/000.mp4, OUT/001.mp4, …; video i uses seed --seed + i.")] = None,
    weights_dir: Annotated[Path | None, typer.Option(
        help="Folder holding show-1-base, show-1-interpolation, show-1-sr1, show-1-sr2 (published or init-weights).")]
    = None,
    from_registry: Annotated[str | None, typer.Option(
        help="Assemble the cascade from the MLflow Model Registry: an alias (champion | challenger), versions in "
             "stage order (3,2,5,1) or per stage (base=3,sr1=challenger: the stages left out take champion).")]
    = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Video to write (.mp4, .webm or .gif; default video.mp4), or with --prompts the folder of the "
                      "videos (default videos/).")] = None,
    batch_size: Annotated[int, typer.Option(
        help="With --prompts: videos generated together through every stage (one model load for all of them).")]
    = 1,
    stages: Annotated[str, typer.Option(help="Comma-separated prefix of base,interp,sr1,sr2.")] = "base,interp,sr1,sr2",
    seed: Annotated[int, typer.Option(
        help="Same seed, same frames (drawn as params.yaml sampling.seeding says: the reference reseeds every stage).")]
    = 345,
    steps: Annotated[int | None, typer.Option(
        help="Denoising steps for every stage (default: the profile's evaluate.steps: tiny 2/2/1/2, paper the "
             "published 75/75/125/50).")] = None,
    device: Annotated[str | None, typer.Option(
        help="cpu | cuda (default: cuda when this machine has a GPU torch can use, else cpu).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | float16 | bfloat16")] = "float32",
    offload: Annotated[str, typer.Option(
        help="cuda only. none: every stage stays on the GPU; model: one stage's model on the GPU at a time; "
             "sequential: one layer at a time (least memory, slowest).")] = "none",
    fps: Annotated[float, typer.Option(help="Frame rate of the written video.")] = 8.0,
    track: Annotated[bool, typer.Option(
        help="Record a generation run in MLflow (the versions used, the video's hash) for show1 lineage.")] = True,
) -> None:
    """Generate a video with the cascade, from local stage folders or from the model registry.

    The full cascade writes 29 frames. Each generation is an MLflow run, so `show1 lineage VIDEO` finds the
    model versions and training runs behind the file. With --prompts FILE, the cascade is loaded once and the
    prompts go through it --batch-size at a time.
    """
    import math

    from show1.data.video import VIDEO_SUFFIXES
    from show1.evaluation.prompts import load_prompt_set
    from show1.pipelines.prompt_batches import prompt_batches, video_path

    # Every input is checked before torch and the models load: a mistake costs a second, not a model load.
    if (prompt is None) == (prompts_file is None):
        fail("give a PROMPT or --prompts FILE (one of them)", code=2)
    try:
        # The prompt sets of show1 evaluate: a file, one prompt per line ('#' starts a comment), or a shipped name.
        prompts = list(load_prompt_set(prompts_file).prompts) if prompts_file is not None else [prompt or ""]
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8, a line of control characters, empty
        fail(f"--prompts: {exc}", code=2)
    try:
        if prompts_file is None:
            check_prompt(prompts[0])  # not UTF-8 (undecodable bytes in argv), or nothing but spaces and controls
        check_seed(seed, count=len(prompts))  # video i uses seed + i
        if steps is not None:
            check_steps(steps)
        if not (math.isfinite(fps) and fps > 0):
            raise InputError(f"--fps {fps}: the frame rate of the video is a number above 0")
        batches = prompt_batches(prompts, batch_size, seed)
    except ValueError as exc:
        fail(str(exc), code=2)
    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r} is not one of {', '.join(sorted(set(DTYPES.values())))}", code=2)
    if device not in (None, "cpu", "cuda"):
        fail(f"--device {device!r} is not available here (cpu | cuda with a GPU)", code=2)
    if offload not in OFFLOAD_MODES:
        fail(f"--offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}", code=2)
    offload_needs_cuda = f"--offload {offload} moves models between the CPU and a GPU: use it with --device cuda"
    if offload != "none" and device == "cpu":
        fail(offload_needs_cuda, code=2)
    if prompts_file is None:
        files = [out_path or Path("video.mp4")]
    elif out_path is not None and out_path.suffix.lower() in VIDEO_SUFFIXES:
        fail(f"--out {out_path}: with --prompts, --out is the folder the videos go to (000.mp4, 001.mp4, …)", code=2)
    else:
        files = [video_path(out_path or Path("videos"), i, len(prompts)) for i in range(len(prompts))]
    if files[0].suffix.lower() not in VIDEO_SUFFIXES:
        fail(f"--out {files[0]}: write {' or '.join(VIDEO_SUFFIXES)}", code=2)
    params = ctx.obj.params()

    import torch

    from show1.pipelines.base import MissingComponentError
    from show1.pipelines.cascade import check_stages
    from show1.registry.resolve import RegistryLookupError, load_cascade

    if device is None:  # a GPU when there is one: generating on the CPU of a GPU machine is never what was meant
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if offload != "none" and device == "cpu":
            fail(offload_needs_cuda + " (no GPU here)", code=2)
    if device == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device!r} is not available here (cpu | cuda with a GPU)", code=2)
    try:
        chosen = check_stages([s.strip() for s in stages.split(",") if s.strip()])
        cascade = load_cascade(params, chosen, from_registry, weights_dir, getattr(torch, DTYPES[dtype]))
    except RegistryLookupError as exc:
        fail(str(exc))
    except (ValueError, FileNotFoundError, MissingComponentError) as exc:
        fail(str(exc), code=2)
    cascade.pipeline.place(device, offload)
    # The profile's denoising steps unless --steps says otherwise: the tiny profile's random stages in seconds on a
    # CPU, the paper profile's the published 75/75/125/50 (evaluate.steps null).
    steps_used = steps if steps is not None else params.evaluate.steps
    settings = {"steps": _steps_label(steps_used), "dtype": DTYPES[dtype], "device": device, "fps": fps,
                "from_registry": from_registry or "", "batch_size": batch_size, **params.sampling.as_params()}
    for batch in batches:
        written = _generate_batch(cascade, batch, files, steps_used, fps, params)
        for index, video in written:
            _, frames, height, width = video
            out.print(f"wrote {files[index]} ({frames} frames, {width}x{height}, stages {','.join(chosen)})",
                      highlight=False)
            if track:
                from show1.registry.generation import track_generation

                run_id = track_generation(params, files[index], prompts[index], cascade.sources,
                                          cascade.from_registry, {"seed": seed + index, **settings})
                out.print(f"generation run: {run_id} (show1 lineage {files[index]})", highlight=False)


def _steps_label(steps: int | dict[str, int] | None) -> str | int:
    """How a generation run records its denoising steps: N, `base=2,interp=2,…`, or `published`."""
    if steps is None:
        return "published"
    return steps if isinstance(steps, int) else ",".join(f"{stage}={n}" for stage, n in steps.items())


def _generate_batch(cascade: Any, batch: Any, files: list[Path], steps: int | dict[str, int] | None, fps: float,
                    params: Params) -> list[tuple[int, tuple[int, ...]]]:
    """Generate one batch of prompts and write each video to its file: (index, (channels, frames, h, w)) each."""
    from show1.data.video import write_video

    try:
        result = cascade.pipeline(batch.prompts, seed=batch.seeds, num_inference_steps=steps,
                                  sampling=params.sampling)
    except ValueError as exc:  # settings the stages cannot run with (e.g. too few sr2 steps for its strength)
        fail(str(exc), code=2)
    written = []
    for offset, frames in enumerate(result.frames):
        index = batch.start + offset
        files[index].parent.mkdir(parents=True, exist_ok=True)
        write_video(frames.permute(1, 0, 2, 3), files[index], fps=fps)  # (3, F, H, W) -> (F, 3, H, W)
        written.append((index, tuple(frames.shape)))
    return written


@app.command()
def register(
    ctx: typer.Context,
    stage: Annotated[str, typer.Option(help="base | interp | sr1 | sr2.")],
    checkpoint: Annotated[Path | None, typer.Option(
        help="Stage folder to register: a training run's final/ or checkpoints/step-N, or a published show-1-* "
             "folder. Default: paths.runs/STAGE/final.")] = None,
    text_encoder: Annotated[Path | None, typer.Option(
        help="Text encoder to bundle when the folder has none. Default: the one its training run used.")] = None,
    run_id: Annotated[str | None, typer.Option(
        help="The training run behind the checkpoint. Default: the run recorded in its run folder.")] = None,
    alias: Annotated[str, typer.Option(help="Alias to point at the version.")] = "challenger",
    metrics: Annotated[Path | None, typer.Option(
        help="Also write the registered version number here (JSON, a DVC metrics file).")] = None,
    details: Annotated[Path | None, typer.Option(
        help="Also write the registered version here: model, version, content hash, alias (JSON).")] = None,
) -> None:
    """Register a trained stage in the MLflow Model Registry as `show1-STAGE` and point `challenger` at it.

    The version is a pyfunc model (the stage pipeline, with signature and input example) tagged with its
    lineage: training run, git commit, data version, params hash, content hash. Registering the same
    checkpoint again returns the existing version.
    """
    from show1.registry.register import ArtifactStoreError, RegistrationError, register_stage
    from show1.store import ui_command

    params = ctx.obj.params()
    _quiet_libraries()
    if alias == "champion":
        fail("--alias champion: a version becomes champion only through show1 promote (the evaluation gate)", code=2)
    try:
        with err.status("registering") as status:
            version = register_stage(params, stage, checkpoint, text_encoder, run_id, alias,
                                     on_status=lambda msg: status.update(msg))
    except ArtifactStoreError as exc:  # a service failed, not the input: exit code 1
        fail(str(exc))
    except (RegistrationError, StoreError) as exc:
        fail(str(exc), code=2)
    from show1 import atomic

    if metrics:
        atomic.write_json(metrics, {"version": int(version.version)})
    if details:
        atomic.write_json(details, {"model": version.name, "version": int(version.version),
                                    "content_hash": version.content_hash, "alias": alias})
    verb = "registered" if version.created else "already registered as"
    if version.note:  # its training run was logged into this store from the one it was trained with
        out.print(f"{stage}: {version.note}", highlight=False)
    out.print(f"{stage}: {verb} {version.uri} (alias {alias}, content {version.content_hash[:12]})\n"
              f"browse: {ui_command(params.tracking)}", highlight=False)


@app.command()
def promote(
    ctx: typer.Context,
    stage: Annotated[str, typer.Option(
        help="base | interp | sr1 | sr2, or several comma-separated (base,interp,sr1,sr2).")],
    dry_run: Annotated[bool, typer.Option(help="Show the decision; change and record nothing.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 when a challenger does not pass the gate.")] = False,
    record_only: Annotated[bool, typer.Option(
        help="Record the decision on the version ('would promote') but move no alias. Always the case inside "
             "`dvc exp run`: an experiment never moves the champion.")] = False,
    metrics: Annotated[Path | None, typer.Option(
        help="Also write the decision as numbers here: promoted and passed, 1/0 (JSON, a DVC metrics file; one "
             "object per stage when several are given).")] = None,
    details: Annotated[Path | None, typer.Option(
        help="Also write the decision here: versions, verdict, reasons (JSON; one object per stage when several "
             "are given).")] = None,
) -> None:
    """Move the alias `champion` to the challenger if its evaluation passes the gate in params.yaml.

    Each rule of `registry.gate` compares an evaluation metric (`eval.<metric>` on the version, written by
    show1 evaluate) with the champion's. The decision and its reason are recorded as `promotion.*` tags.
    Inside a DVC experiment (`dvc exp run`, which sets DVC_EXP_NAME) and with --record-only, the decision is
    recorded ("would promote" / "would reject") and `champion` stays where it is.
    """
    from show1.registry.promote import Decision, promote_stage
    from show1.registry.resolve import RegistryLookupError

    params = ctx.obj.params()
    stages = [s.strip() for s in stage.split(",") if s.strip()]
    for name in stages or [stage]:
        _check_stage(name)
    decisions = []
    for name in stages:
        try:
            decision = promote_stage(params, name, dry_run=dry_run,
                                     record_only="--record-only" if record_only else None)
        except (RegistryLookupError, StoreError) as exc:
            fail(str(exc))
        decisions.append(decision)
        verdict = "[green]promoted[/]" if decision.promoted else "[yellow]not promoted[/]"
        if decision.record_only:
            verdict = f"[yellow]{decision.verdict}[/] (recorded only: {decision.record_only}; no alias moved)"
        was = f" (champion was {decision.champion})" if decision.champion else " (no champion yet)"
        out.print(f"{decision.name}: version {decision.challenger} {verdict}{was}{' [dry run]' if dry_run else ''}")
        for reason in decision.reasons:
            out.print(f"  - {reason}", highlight=False)
    from show1 import atomic

    for path, as_json in ((metrics, Decision.metrics), (details, Decision.to_dict)):
        if path:
            atomic.write_json(path, as_json(decisions[0]) if len(decisions) == 1 else
                              {d.stage: as_json(d) for d in decisions})
    if strict and not all(d.promoted or (d.record_only and d.passed) for d in decisions):
        raise typer.Exit(1)


@app.command()
def lineage(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(
        help="A generated video file, an MLflow run id, or a model version (show1-base/3, show1-base@champion).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False,
) -> None:
    """Print the chain behind a video, a run or a model version.

    video → generation run → stage model versions → training runs → data version, commit, params.
    """
    import json

    from rich.tree import Tree

    from show1.registry.lineage import LineageError, Node
    from show1.registry.lineage import lineage as build
    from show1.registry.resolve import RegistryLookupError

    params = ctx.obj.params()
    try:
        root = build(params, target)
    except (LineageError, RegistryLookupError, StoreError) as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps(root.to_dict()))
        return

    def grow(tree: Tree, node: Node) -> None:
        branch = tree.add(f"[bold]{node.kind}[/] {node.label}")
        for key, value in node.facts.items():
            branch.add(f"[dim]{key}:[/] {value}")
        for child in node.children:
            grow(branch, child)

    top = Tree(f"[bold]lineage of[/] {target}")
    grow(top, root)
    out.print(top)


@app.command()
def evaluate(
    ctx: typer.Context,
    prompts: Annotated[str | None, typer.Option(
        help="Prompt set: a name in data/prompts (demo, ucf101) or a text file. Default: evaluate.prompts.")] = None,
    from_registry: Annotated[str | None, typer.Option(
        help="Registry versions to evaluate: an alias, versions in stage order, or base=3,sr1=champion. "
             "Default: challenger (when --weights-dir is not given).")] = None,
    weights_dir: Annotated[Path | None, typer.Option(help="Evaluate local stage folders instead.")] = None,
    reference: Annotated[str | None, typer.Option(
        help="Curated split to compare with: train | val. Default: evaluate.reference_split.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts of the set.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder. Default: evaluate.out.")] = None,
    track: Annotated[bool, typer.Option(help="Log to MLflow and tag the evaluated model versions.")] = True,
    executor: Annotated[str | None, typer.Option(
        help="Where the videos are generated: local (this process) or dask (Dask worker processes, each loading "
             "the cascade once; same videos and metrics). Default: evaluate.executor.kind.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="dask: worker processes of the LocalCluster started for the run (one per GPU on a GPU "
                    "machine). Default: evaluate.executor.workers.")] = None,
    dask_address: Annotated[str | None, typer.Option(
        help="A running Dask cluster's scheduler (tcp://HOST:PORT) to generate on (implies --executor dask); its "
             "workers must see the model cache and the output folder.")] = None,
) -> None:
    """Generate a video per prompt, score them against curated clips, and write the report.

    Metrics: FID-vid (Inception, packaged), FVD (evaluate.i3d), CLIPSIM (evaluate.clip), IS
    (evaluate.classifier), temporal consistency. Writes OUT/metrics.json (numbers), OUT/details.json (prompt set,
    models, skipped metrics), OUT/per_prompt.json and OUT/report.html; logs an MLflow run and puts eval.<metric>
    tags on the evaluated versions (read by show1 promote).
    """
    from pydantic import ValidationError

    from show1.config import Evaluate
    from show1.dask_cluster import ClusterUnavailable
    from show1.evaluation.run import evaluate as run_evaluation
    from show1.pipelines.base import MissingComponentError
    from show1.registry.resolve import RegistryLookupError

    params = ctx.obj.params()
    _quiet_libraries()
    if reference is not None and reference not in ("train", "val"):
        fail(f"--reference {reference!r}: train | val", code=2)
    settings = _executor(params.evaluate.executor, executor, workers, dask_address)
    try:
        chosen = Evaluate.model_validate(params.evaluate.model_dump() | {"executor": settings.model_dump()})
    except ValidationError as exc:
        fail(f"--executor/--workers: {exc.errors()[0]['msg']}", code=2)
    params = params.model_copy(update={"evaluate": chosen})
    try:
        with err.status("evaluating") as status:
            result = run_evaluation(params, prompts, from_registry, weights_dir, reference, limit, out_dir, track,
                                    on_status=lambda msg: status.update(msg))
    except (RegistryLookupError, ClusterUnavailable) as exc:
        fail(str(exc))
    except (ValueError, FileNotFoundError, MissingComponentError) as exc:
        fail(str(exc), code=2)
    table = Table(title="evaluation", header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4g}")
    for name, why in result.skipped.items():
        table.add_row(f"[dim]{name}[/]", f"[dim]not computed: {why}[/]")
    out.print(table)
    out.print(f"report: {result.report}\nmetrics: {result.out / 'metrics.json'}", highlight=False)
    if result.run_id:
        out.print(f"evaluation run: {result.run_id}", highlight=False)


@app.command("run")
def run_cascade(
    ctx: typer.Context,
    manifest: Annotated[Path | None, typer.Option(help="Manifest to curate. Default: paths.manifest.")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt set to evaluate. Default: evaluate.prompts.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N prompts.")] = None,
    promote: Annotated[bool, typer.Option(help="Run the promotion gate at the end.")] = True,
    wait: Annotated[bool, typer.Option(
        help="When another `show1 run` is running in this folder: wait for it (default), or refuse at once "
             "(--no-wait, exit code 1). Either way the lock file and its holder are named.")] = True,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show Prefect's tracebacks of a failure here (default: its lines without them; the "
                          "tracebacks go to a file that the error line names).")] = False,
) -> None:
    """Run the whole lifecycle as one Prefect flow: curate → validate → train every stage → register →
    generate and evaluate → promote. Re-runs redo only what changed.

    `make demo` runs this on the tiny profile. Start `show1 ui` first to watch it in the Prefect UI.
    One run at a time per folder: a second one waits for the lock `.show1-run.lock` (or refuses, --no-wait).
    A failure ends in one `error:` line (exit code 1).
    """
    from show1.flow_failures import FlowFailed
    from show1.preflight import check_run_inputs
    from show1.run_lock import RunLockedError, project_run_lock

    # Everything the run reads (params, manifest, prompts, model paths), before it curates, trains or takes the lock.
    try:
        check_run_inputs(ctx.obj.params(), manifest, prompts, limit)
    except InputError as exc:
        fail(str(exc), code=2)

    def waiting(message: str) -> None:
        err.print(message, highlight=False, soft_wrap=True)

    _exit_cleanly_on_termination()
    try:
        with project_run_lock(Path.cwd(), wait=wait, on_wait=waiting):
            from flows.cascade import cascade_flow, summary_lines
            from show1.flow_failures import run_flow

            _quiet_libraries()
            result = run_flow(cascade_flow, str(ctx.obj.params_path), ctx.obj.profile,
                              str(manifest) if manifest else None, prompts, limit, promote, verbose=verbose)
    except RunLockedError as exc:
        fail(str(exc))
    except FlowFailed as exc:
        fail(str(exc))
    out.print("\n" + "\n".join(summary_lines(result)), highlight=False)


def _exit_cleanly_on_termination() -> None:
    """SIGTERM and SIGHUP (a `kill`, a closed terminal, a CI job's timeout) end the command as Ctrl-C does: Python
    unwinds and runs its exit handlers, so Prefect stops the temporary server it started for the run (with the
    default action the process vanishes and that server, a process of its own, keeps running)."""
    import signal

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)


stack_app = typer.Typer(
    help="A team's stack on this machine: PostgreSQL, an S3 store (moto), an MLflow tracking server on them, a "
         "Prefect server and a worker on each work pool. `show1 stack up`, then `eval \"$(show1 stack env)\"` "
         "points show1, MLflow, Prefect and DVC at it.",
    no_args_is_help=True)
app.add_typer(stack_app, name="stack")
StackDir = Annotated[Path, typer.Option("--dir", help="The stack's folder: state, logs, databases, saved bucket.")]


def _stack_state(folder: Path) -> Any:
    from show1.stack.processes import StackError
    from show1.stack.stack import read_state

    try:
        state = read_state(folder)
    except StackError as exc:
        fail(str(exc))
    if state is None:
        fail(f"no stack runs in {folder} (show1 stack up --dir {folder})")
    return state


def _progress_line(line: str) -> None:
    """What the stack and the UIs report while they start and stop: on stderr, never wrapped."""
    err.print(line, highlight=False, soft_wrap=True)


@stack_app.command("up")
def stack_up(
    folder: StackDir = Path(".stack"),
    host: Annotated[str, typer.Option(help="Where MLflow, Prefect and S3 listen: 0.0.0.0 serves other machines "
                                           "(PostgreSQL always listens on 127.0.0.1 only).")] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(min=1, help="Seconds each service may take to become healthy.")] = 300.0,
    mlflow_workers: Annotated[int, typer.Option(min=1, help="Worker processes of the MLflow server.")] = 2,
    workers: Annotated[bool, typer.Option(help="Start a Prefect worker on each work pool of --pools in this "
                                               "folder.")] = True,
    pools: Annotated[str, typer.Option(help="The work pools that get a worker on this machine, comma-separated. A "
                                            "team whose GPU runners are other machines gives `cpu`: each runner "
                                            "then serves `gpu` with `show1 worker --pool gpu`.")] = "cpu,gpu",
    credentials: Annotated[bool | None, typer.Option(
        show_default=False, help="Every service requires credentials (generated into DIR/credentials; `show1 stack "
                                 "env` prints them). Always on beyond 127.0.0.1; off there unless given, or the "
                                 "folder already has credentials.")] = None,
) -> None:
    """Start the stack and print its URLs. A running stack is left as it is; one running in part gets its stopped
    services started again on their own ports.

    Each service is waited for until healthy; a failure stops what was started and shows the end of its log.
    The workers run deployments' flows in this folder. `show1 stack down` stops it all.
    """
    from pydantic import ValidationError

    from show1.stack.processes import StackError
    from show1.stack.stack import StackSettings, up

    try:
        settings = StackSettings(folder=folder, host=host, timeout=timeout, mlflow_workers=mlflow_workers,
                                 workers=workers, credentials=credentials,
                                 pools=tuple(pool.strip() for pool in pools.split(",") if pool.strip()))
    except ValidationError as exc:
        fail(f"--pools {pools}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", code=2)
    try:
        state = up(settings, say=_progress_line)
    except StackError as exc:
        fail(str(exc))
    _print_stack(state)


def _print_stack(state: Any) -> None:
    env = state.client_env()
    out.print(f"MLflow:   {env['MLFLOW_TRACKING_URI']}  (runs and registry in PostgreSQL, artifacts in "
              f"s3://{state.bucket}/mlflow)", highlight=False)
    out.print(f"Prefect:  {env['PREFECT_API_URL'].removesuffix('/api')}  (API {env['PREFECT_API_URL']})",
              highlight=False)
    out.print(f"S3:       {env['AWS_ENDPOINT_URL']}  bucket {state.bucket}; DVC remote: dvc remote add -d stack "
              f"{state.dvc_remote()}", highlight=False)
    out.print(f"Use it:   eval \"$(show1 stack env --dir {state.folder})\"", highlight=False)
    out.print(_credentials_line(state), highlight=False)


def _credentials_line(state: Any) -> str:
    from show1.stack.credentials import path

    return (f"credentials: on ({path(state.folder)})" if state.credentials else
            "credentials: off (loopback only)")


@stack_app.command("env")
def stack_env(folder: StackDir = Path(".stack")) -> None:
    """Print `export` lines that point show1, MLflow, Prefect and DVC at the stack: eval "$(show1 stack env)"."""
    from show1.stack.stack import export_lines

    out.print("\n".join(export_lines(_stack_state(folder))), highlight=False)


@stack_app.command("status")
def stack_status(folder: StackDir = Path(".stack")) -> None:
    """Each service's URL and health; exit code 1 unless every one is healthy."""
    from show1.stack.stack import health

    state = _stack_state(folder)
    healthy = health(state)
    table = Table(title=f"stack in {state.folder}", header_style="bold")
    for column in ("service", "pid", "url", "health", "log"):
        table.add_column(column, overflow="fold")
    for name, service in state.services.items():
        table.add_row(name, str(service.pid), service.url, "ok" if healthy[name] else "DOWN", service.log)
    out.print(table)
    out.print(_credentials_line(state), highlight=False, soft_wrap=True)
    if not all(healthy.values()):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(
    folder: StackDir = Path(".stack"),
    purge: Annotated[bool, typer.Option(help="Also delete the stack's data (databases, saved bucket, Prefect "
                                             "home); logs stay.")] = False,
) -> None:
    """Stop the stack, workers first and PostgreSQL last. The bucket is saved into the stack folder and loaded by the
    next `up` (the S3 server keeps objects in memory); the databases stay unless --purge."""
    from show1.stack.processes import StackError
    from show1.stack.stack import down

    try:
        stopped = down(folder, purge=purge, say=_progress_line)
    except StackError as exc:
        fail(str(exc))
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}", highlight=False)


BackupDir = Annotated[Path, typer.Argument(metavar="DIR", show_default=False, help="The backup's folder.")]


@stack_app.command("backup")
def stack_backup(
    target: BackupDir,
    folder: StackDir = Path(".stack"),
    overwrite: Annotated[bool, typer.Option(help="Replace the backup in DIR (never a folder that is not a show1 "
                                                 "backup).")] = False,
) -> None:
    """Back up the running stack into DIR (absent or empty): pg_dump of the mlflow and prefect databases (runs,
    registry, aliases, tags; flows, deployments, flow runs), every object of the bucket (artifacts, a DVC remote)
    and manifest.json (versions, ports, each file's sha256). DIR appears whole or not at all.

    The servers keep running: each database is one consistent snapshot, taken before the bucket is copied, so the
    artifacts they name are in the backup; artifacts written while the backup runs may be missing from it.
    `show1 stack restore DIR` puts it back.
    """
    from show1.stack.backup import backup
    from show1.stack.processes import StackError

    try:
        manifest = backup(folder, target, overwrite=overwrite,
                          say=_progress_line)
    except StackError as exc:
        fail(str(exc))
    out.print(f"backup of the stack in {folder}: {target} ({manifest['objects']} objects)", highlight=False)


@stack_app.command("restore")
def stack_restore(
    source: BackupDir,
    folder: StackDir = Path(".stack"),
    force: Annotated[bool, typer.Option(help="Restore onto a stack that already holds runs or objects: its "
                                             "databases are replaced, objects of the same key overwritten.")] = False,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds each server may take to start again.")] = 300.0,
) -> None:
    """Restore a `show1 stack backup` onto the running stack, which must be empty (show1 stack down --purge, then
    show1 stack up): runs, versions, aliases, lineage, artifacts and the Prefect server's flow runs come back.

    Every file is checked against the manifest first (a damaged backup is refused, nothing written). Then, with
    the MLflow and Prefect servers and the workers stopped, both databases are replaced (pg_restore, one
    transaction each) and the objects uploaded; the servers start again on their own ports.
    """
    from show1.stack.backup import restore
    from show1.stack.processes import StackError

    try:
        manifest = restore(folder, source, force=force, timeout=timeout,
                           say=_progress_line)
    except StackError as exc:
        fail(str(exc))
    out.print(f"restored {source} (backed up {manifest['created']} from {manifest['stack']['folder']}) onto the "
              f"stack in {folder}", highlight=False)


@app.command("worker")
def worker(
    pool: Annotated[str, typer.Option(help="The work pool to serve: prefect.yaml deploys training and evaluation to "
                                           "`gpu`, curation and registration to `cpu`.")] = "gpu",
    name: Annotated[str | None, typer.Option(help="The worker's name on the Prefect server (default: "
                                                  "show1-POOL-HOSTNAME).")] = None,
    work_queue: Annotated[list[str] | None, typer.Option(
        help="Serve only this work queue of the pool (repeatable; `prefect work-queue create NAME --pool POOL` "
             "makes one): a queue per machine sends each node's flow run of a multi-node training to its own "
             "machine (README).")] = None,
) -> None:
    """Serve a work pool of a team's stack from this machine (a GPU runner): a Prefect process worker that runs the
    pool's flow runs in this clone, until stopped (Ctrl-C).

    Give it the stack's settings first, as `show1 stack env` printed them on the stack's host (the Prefect API and
    its auth string, the MLflow server and the runner account): `eval "$(cat stack.env)"; show1 worker --pool gpu`.
    The flow runs read params.yaml and the data of this clone and write their run folders here.
    """
    import socket

    from show1.config import OFFLINE_ENV
    from show1.stack.servers import worker_command

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        fail("PREFECT_API_URL is not set: run the `export` lines `show1 stack env` prints on the stack's host "
             "(eval \"$(show1 stack env)\" there; copy them to this machine), then this command again", code=2)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        err.print("warning: MLFLOW_TRACKING_URI is not set: the flow runs will track into this clone's own store, "
                  "not the stack's MLflow server", highlight=False)
    command = worker_command(pool, name or f"show1-{pool}-{socket.gethostname()}", work_queue or ())
    env = OFFLINE_ENV | dict(os.environ) | {"SHOW1_HOME": str(Path.cwd())}
    err.print(f"serving the work pool {pool!r} of {api} from {Path.cwd()}", highlight=False)
    sys.stderr.flush()
    os.execve(command[0], command, env)  # the worker itself: its signals, its exit status


@app.command("ui")
def ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Where both UIs listen: 0.0.0.0 serves other machines.")] = "127.0.0.1",
    mlflow_port: Annotated[int, typer.Option(min=0, max=65535, help="The MLflow UI's port (0: a free one).")] = 5000,
    prefect_port: Annotated[int, typer.Option(min=0, max=65535, help="The Prefect UI's port (0: a free one).")] = 4200,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds each server may take to answer.")] = 300.0,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the UIs `show1 ui` started in this folder.")] = False,
) -> None:
    """Serve the MLflow UI (runs, registry) and the Prefect UI (flow runs) on this project's own stores, in the
    background, and print their URLs.

    MLflow shows params' tracking store (mlruns/); Prefect keeps its runs in .show1-ui/. While it runs, show1's
    commands started in this folder with no PREFECT_API_URL (show1 run, make demo, python -m flows.*) report their
    flow runs to it. A second `show1 ui` prints the URLs of the running one; `show1 ui --stop` stops both.
    """
    from show1.config import show1_command
    from show1.stack import ui as local_ui
    from show1.stack.processes import StackError

    if stop:
        stopped = local_ui.down(Path.cwd(), say=_progress_line)
        out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}", highlight=False)
        return
    try:
        state = local_ui.up(Path.cwd(), ctx.obj.params().tracking, local_ui.UISettings(
            host=host, mlflow_port=mlflow_port, prefect_port=prefect_port, timeout=timeout), say=_progress_line)
    except (StackError, StoreError) as exc:
        fail(str(exc))
    if "mlflow" in state.services:
        out.print(f"MLflow:   {state.services['mlflow'].url}  (this project's store: {state.store})", highlight=False)
    else:
        out.print(f"MLflow:   {state.store}  (the tracking server's own UI)", highlight=False)
    out.print(f"Prefect:  {state.services['prefect'].url}  (the flow runs of show1's commands started in this folder "
              "from now on)", highlight=False)
    if state.host in ("0.0.0.0", "::"):
        out.print(f"Other machines: this machine's address, the same ports (served on {state.host})", highlight=False)
    out.print(f"Stop:     {show1_command()} ui --stop  (logs in {Path(state.folder) / 'logs'})", highlight=False)


def _quiet_libraries() -> None:
    """MLflow's INFO lines and transformers' weight-loading bars are noise next to show1's own status.

    transformers is not imported for this (0.8 s, and `show1 register` needs no model library): its bars follow
    huggingface_hub's switch, which the environment sets for a library not imported yet."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _check_stage(stage: str) -> None:
    from show1.models.configs import STAGES

    if stage not in STAGES:
        fail(f"--stage {stage!r} is not one of {', '.join(STAGES)}", code=2)


if __name__ == "__main__":
    app()
