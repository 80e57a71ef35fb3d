"""Data contracts behind `show1 validate`: Great Expectations suites over a manifest and a curated folder.

Each suite runs on its own pandas DataFrame asset in an ephemeral GX context (nothing is kept or sent
anywhere but `out_dir`):

  manifest  the manifest as `read_manifest` reads it, with what makes a row unreadable and whether its video
            exists (only when a manifest is given)
  clips     OUT/index.jsonl, one row per clip, checked against `params.curate`
  splits    the distinct (source_hash, split) pairs with their clip counts: no source in both splits,
            enough train clips

`validate_data` writes `out_dir/result.json` and a Data Docs site under `out_dir/data_docs/` that works
offline (show1/data/data_docs.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from show1 import atomic
from show1.config import Curate, Params, apply_environment_defaults
from show1.data.curate import INDEX, locate_video
from show1.data.errors import ManifestError, Rejected
from show1.data.folder import DataFolder
from show1.data.manifest import SPLITS, ManifestRow, read_manifest

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.expectations import Expectation

RESULT = "result.json"
DOCS = "data_docs"
SITE = "show1"
# Every key curation writes to an index row.
INDEX_COLUMNS = (
    "row", "clip_id", "caption", "source", "source_id", "source_hash", "start", "end", "fps", "num_frames",
    "resolutions", "source_width", "source_height", "source_fps", "shard", "tensor", "frame_start",
    "content_hash", "split",
)
NOT_NULL = ("clip_id", "caption", "source", "source_hash", "shard", "content_hash", "split", "num_frames", "fps")
SHA256 = r"^[0-9a-f]{64}$"
MANIFEST_COLUMNS = ("row", "video", "caption", "id", "start", "end", "split")


class ContractError(ValueError):
    """The data cannot be validated at all (missing or unreadable input); the message names the file."""


@dataclass
class ContractReport:
    """The outcome of `validate_data`: overall success, a summary per suite and where the outputs are."""

    success: bool
    suites: dict[str, dict[str, Any]]
    result_path: Path
    docs_path: Path | None

    def metrics(self) -> dict[str, Any]:
        """Small numbers for a metrics file (DVC): 1/0 success and expectation counts per suite."""
        return {
            "success": int(self.success),
            "evaluated": sum(s["evaluated"] for s in self.suites.values()),
            "failed": sum(len(s["failed"]) for s in self.suites.values()),
            "suites": {name: {"success": int(s["success"]), "evaluated": s["evaluated"], "failed": len(s["failed"])}
                       for name, s in self.suites.items()},
        }

    def failed_expectations(self) -> list[str]:
        """One readable line per failed expectation: `suite: expectation_type(column=…) observed …`."""
        lines = []
        for suite, summary in self.suites.items():
            for failure in summary["failed"]:
                column = f"column={failure['column']}" if failure["column"] else ""
                lines.append(f"{suite}: {failure['expectation']}({column}) observed "
                             f"{_describe_observed(failure['observed'])}")
        return lines


def validate_data(curated_dir: Path | str, params: Params, out_dir: Path,
                  manifest: Path | None = None) -> ContractReport:
    """Run the contract suites on `curated_dir` (a folder or an fsspec URL such as `s3://bucket/curated`; and
    `manifest`, when given) and record the outcome.

    Writes `out_dir/result.json` and the Data Docs site `out_dir/data_docs/`. A failed expectation is a
    report with `success=False`; an index or manifest that cannot be read raises `ContractError`.
    """
    apply_environment_defaults()  # before great_expectations is imported
    curated_dir, out_dir = DataFolder(curated_dir), Path(out_dir).resolve()  # GX wants absolute paths
    clips = clips_frame(read_index(curated_dir))
    frames = {"clips": clips, "splits": splits_frame(clips)}
    suites = {"clips": clip_expectations(params), "splits": split_expectations(params)}
    if manifest is not None:
        manifest_df = manifest_frame(Path(manifest), params)
        frames = {"manifest": manifest_df, **frames}
        suites = {"manifest": manifest_expectations(manifest_df, params), **suites}

    out_dir.mkdir(parents=True, exist_ok=True)
    site = out_dir / DOCS
    # Build the site beside the old one and swap it in, so a rerun leaves no stale validation pages.
    staging = Path(tempfile.mkdtemp(prefix=f".{DOCS}.staging-", dir=out_dir))
    try:
        results = _run_suites(frames, suites, staging)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the site from other users
        shutil.rmtree(site, ignore_errors=True)
        staging.rename(site)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    summaries = {name: _summarise(result) for name, result in results.items()}
    success = all(s["success"] for s in summaries.values())
    docs_path = site / "index.html"
    result_path = out_dir / RESULT
    atomic.write_json(result_path, {
        "success": success,
        "curated_dir": str(curated_dir),
        "manifest": None if manifest is None else str(manifest),
        "data_docs": str(docs_path),
        "suites": summaries,
        "gx": {name: result.describe_dict() for name, result in results.items()},
    })
    return ContractReport(success=success, suites=summaries, result_path=result_path,
                          docs_path=docs_path if docs_path.is_file() else None)


def read_index(curated_dir: Path | str | DataFolder) -> list[dict[str, Any]]:
    """The rows of `curated_dir/index.jsonl`; `ContractError` when it is missing or not JSON lines."""
    folder = DataFolder(curated_dir)
    path = folder.name(INDEX)
    try:
        rows = atomic.parse_jsonl(folder.read_text(INDEX), path)
    except (FileNotFoundError, IsADirectoryError):
        raise ContractError(f"{path}: clip index not found (run `show1 curate` first)") from None
    except UnicodeDecodeError:
        raise ContractError(f"{path}: not UTF-8 text, so not a clip index") from None
    except ValueError as exc:
        raise ContractError(str(exc)) from None  # read_jsonl's message names the file and line
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ContractError(f"{path}: row {number} is a JSON {type(row).__name__}, not an object")
    return rows


def clips_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The index as a DataFrame, plus `resolution_keys`: each clip's sizes, sorted and comma-joined."""
    frame = pd.DataFrame(rows)
    if "resolutions" in frame:
        # Not a list (null included) becomes its JSON text, so it can never match the configured sizes.
        frame["resolution_keys"] = frame["resolutions"].map(
            lambda v: ",".join(sorted(map(str, v))) if isinstance(v, list) else json.dumps(v))
    return frame


def splits_frame(clips: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct (source_hash, split) pair with its number of clips."""
    if not {"source_hash", "split"} <= set(clips.columns):
        return pd.DataFrame({"source_hash": [], "split": [], "clips": []})
    pairs = clips.groupby(["source_hash", "split"], dropna=False).size()
    return pairs.reset_index(name="clips")


def manifest_frame(path: Path, params: Params) -> pd.DataFrame:
    """The manifest's rows as a DataFrame; blank captions count as missing.

    Two more columns say what is wrong with a row, each value naming the row (`row N`, 0-based among the data rows,
    as in quarantine.jsonl), or null when nothing is: `row_error`, a row that cannot be read (a malformed CSV or JSON
    line, a bad start/end or split), and `video_error`, a video that cannot be found (a local path, relative to the
    manifest's folder, or a `package://` path that does not exist or escapes its allowed roots; an unsupported
    scheme). http(s) URLs are not checked: that needs the network.
    """
    try:
        rows = read_manifest(path, params.curate.columns)
    except ManifestError as exc:
        raise ContractError(str(exc)) from exc
    frame = pd.DataFrame([{name: getattr(r, name) for name in MANIFEST_COLUMNS} for r in rows],
                         columns=list(MANIFEST_COLUMNS))
    frame["caption"] = frame["caption"].map(lambda c: c if isinstance(c, str) and c.strip() else None)
    frame[["start", "end"]] = frame[["start", "end"]].astype("float64")
    frame["row_error"] = [None if r.rejection is None else f"row {r.row}: {r.rejection.message}" for r in rows]
    located: dict[str, Any] = {}  # by video: a manifest naming one file a million times checks it once
    frame["video_error"] = [_video_error(r, path.parent, params.curate, located) for r in rows]
    return frame


def _video_error(row: ManifestRow, manifest_dir: Path, cfg: Curate, located: dict[str, Any]) -> str | None:
    """Why `row`'s video cannot be found (curation's own check, `locate_video`), or None (also for no video: the
    completeness check counts those)."""
    video = row.video.strip() if row.video else None
    found = locate_video(video, manifest_dir, cfg, located) if video else None
    return f"row {row.row}: {found.message}" if isinstance(found, Rejected) else None


def manifest_expectations(frame: pd.DataFrame, params: Params) -> list[Expectation]:
    """The `manifest` suite: enough complete rows, every row readable, every named video there, unique ids, sane
    spans and splits.

    A row without a video or a caption is a gap the manifest admits (curation quarantines it), and
    `contracts.manifest_min_complete_fraction` says how many the contract tolerates. A row that cannot be read, or a
    video that is named but is not there, is a mistake in the manifest: one of them fails the contract, and the
    failure names the rows.
    """
    import great_expectations as gx

    mostly = params.contracts.manifest_min_complete_fraction
    ex = gx.expectations
    expectations: list[Expectation] = [
        ex.ExpectTableRowCountToBeBetween(min_value=1),
        ex.ExpectColumnValuesToNotBeNull(column="video", mostly=mostly),
        ex.ExpectColumnValuesToNotBeNull(column="caption", mostly=mostly),
        ex.ExpectColumnValuesToBeNull(column="row_error"),
        ex.ExpectColumnValuesToBeNull(column="video_error"),
        ex.ExpectColumnValuesToBeBetween(column="start", min_value=0),
        ex.ExpectColumnValuesToBeBetween(column="end", min_value=0),
        ex.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
    ]
    if frame["id"].notna().any():  # ids are optional; when used, no two rows may share one
        expectations.append(ex.ExpectColumnValuesToBeUnique(column="id"))
    return expectations


def clip_expectations(params: Params) -> list[Expectation]:
    """The `clips` suite: every index row is complete and matches the clip settings and filters."""
    import great_expectations as gx

    ex = gx.expectations
    cfg = params.curate
    sizes = ",".join(sorted(size.key for size in cfg.clip.sizes))
    return [
        ex.ExpectTableColumnsToMatchSet(column_set=list(INDEX_COLUMNS), exact_match=False),
        ex.ExpectTableRowCountToBeBetween(min_value=params.contracts.min_clips),
        *(ex.ExpectColumnValuesToNotBeNull(column=column) for column in NOT_NULL),
        ex.ExpectColumnValuesToBeUnique(column="clip_id"),
        ex.ExpectColumnValuesToBeBetween(column="num_frames", min_value=cfg.clip.frames, max_value=cfg.clip.frames),
        ex.ExpectColumnValuesToBeBetween(column="fps", min_value=cfg.clip.fps, max_value=cfg.clip.fps),
        ex.ExpectColumnValuesToBeBetween(column="source_width", min_value=cfg.filters.min_width),
        ex.ExpectColumnValuesToBeBetween(column="source_height", min_value=cfg.filters.min_height),
        ex.ExpectColumnValuesToBeBetween(column="source_fps", min_value=cfg.filters.min_fps,
                                         max_value=cfg.filters.max_fps),
        ex.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=cfg.caption.min_chars,
                                               max_value=cfg.caption.max_chars),
        ex.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        ex.ExpectColumnValuesToBeInSet(column="resolution_keys", value_set=[sizes]),
        # A missing start or end is a failure here too: only rows missing both are skipped.
        ex.ExpectColumnPairValuesAToBeGreaterThanB(column_A="end", column_B="start"),
        ex.ExpectColumnValuesToMatchRegex(column="content_hash", regex=SHA256),
        ex.ExpectColumnValuesToMatchRegex(column="source_hash", regex=SHA256),
    ]


def split_expectations(params: Params) -> list[Expectation]:
    """The `splits` suite: no source in both train and val, and at least `min_train_clips` train clips."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    ex = gx.expectations
    return [
        ex.ExpectColumnValuesToBeUnique(column="source_hash"),
        ex.ExpectColumnSumToBeBetween(column="clips", min_value=params.contracts.min_train_clips,
                                      row_condition=Column("split") == "train"),
    ]


def _run_suites(frames: dict[str, pd.DataFrame], suites: dict[str, list[Expectation]],
                site_dir: Path) -> dict[str, ExpectationSuiteValidationResult]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from show1.data.data_docs import make_offline

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    # An ephemeral context comes with a site in a temporary folder; the docs go to `site_dir` only.
    for name in context.get_site_names():
        context.delete_data_docs_site(name)
    context.add_data_docs_site(SITE, {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
        # The index's tables as HTML, not filled in by a CDN's bootstrap-table: see show1/data/data_docs.py.
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                               "view": {"module_name": "show1.data.data_docs", "class_name": "StaticIndexPageView"}},
    })
    source = context.data_sources.add_pandas(name="show1")
    results = {}
    for name, expectations in suites.items():
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        # The run stores its result in the context, which is what build_data_docs renders.
        results[name] = definition.run(batch_parameters={"dataframe": frames[name]}, result_format="SUMMARY")
    context.build_data_docs(site_names=[SITE])
    make_offline(site_dir)  # the pages load local copies, never a CDN
    return results


def _summarise(result: ExpectationSuiteValidationResult) -> dict[str, Any]:
    doc = result.to_json_dict()
    failed = []
    for item in doc["results"]:
        if item["success"]:
            continue
        config = item["expectation_config"]
        kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
        column = kwargs.get("column") or (
            f"{kwargs['column_A']} > {kwargs['column_B']}" if "column_A" in kwargs else None)
        failed.append({"expectation": config["type"], "column": column, "kwargs": kwargs,
                       "observed": _observed(item)})
    summary = {"success": doc["success"], "evaluated": doc["statistics"]["evaluated_expectations"],
               "failed": failed}
    # GX leaves numpy scalars in some results (pair values, sums): make the summary plain JSON.
    return json.loads(json.dumps(summary, default=_plain))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _observed(item: dict[str, Any]) -> Any:
    result = item.get("result") or {}
    if "observed_value" in result:
        return result["observed_value"]
    if "unexpected_count" in result:
        return {"unexpected_count": result["unexpected_count"],
                "unexpected_percent": result.get("unexpected_percent"),
                "examples": result.get("partial_unexpected_list", [])[:5]}
    # An expectation that could not be computed (a missing column, wrong types) fails with an exception.
    info = item.get("exception_info") or {}
    infos = [info] if "exception_message" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = dict.fromkeys(i["exception_message"] for i in infos if i.get("exception_message"))
    return {"error": "; ".join(messages) or "no result"}


def _describe_observed(observed: Any) -> str:
    if isinstance(observed, dict) and "unexpected_count" in observed:
        return f"{observed['unexpected_count']} unexpected, e.g. {observed['examples']}"
    if isinstance(observed, dict) and "error" in observed:
        return f"an error: {observed['error']}"
    return json.dumps(observed, default=str)
