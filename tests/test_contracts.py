"""Data contracts (`show1 validate`) on a real curated demo folder and on corrupted copies of its index."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from show1 import atomic
from show1.config import Params, load_params
from show1.data.contracts import ContractError, ContractReport, validate_data
from show1.data.curate import INDEX, curate

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "manifests" / "demo.csv"

Rows = list[dict[str, Any]]


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory) -> Params:
    loaded = load_params(ROOT / "params.yaml")
    cache = tmp_path_factory.mktemp("cache")
    return loaded.model_copy(update={"paths": loaded.paths.model_copy(update={"cache": cache})})


@pytest.fixture(scope="module")
def curated(params: Params, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("curated")
    curate(DEMO, out, params)
    return out


def _with_index(folder: Path, rows: Rows) -> Path:
    folder.mkdir(parents=True)
    atomic.write_jsonl(folder / INDEX, rows)
    return folder


def _failures(report: ContractReport) -> set[tuple[str, str, str | None]]:
    return {(suite, f["expectation"], f["column"]) for suite, s in report.suites.items() for f in s["failed"]}


def test_curated_demo_passes_every_suite_and_writes_result_and_docs(
        curated: Path, params: Params, tmp_path: Path) -> None:
    report = validate_data(curated, params, tmp_path / "validate", manifest=DEMO)

    assert report.success, report.failed_expectations()
    assert report.failed_expectations() == []
    assert set(report.suites) == {"manifest", "clips", "splits"}
    assert all(s["success"] and s["evaluated"] > 0 for s in report.suites.values())
    saved = json.loads(report.result_path.read_text())
    assert report.result_path == tmp_path / "validate" / "result.json"
    assert saved["success"] is True
    assert set(saved["suites"]) == set(saved["gx"]) == {"manifest", "clips", "splits"}
    assert saved["gx"]["clips"]["statistics"]["evaluated_expectations"] == report.suites["clips"]["evaluated"]
    assert report.docs_path is not None and report.docs_path.is_file()
    index = report.docs_path.read_text()
    for suite in ("manifest", "clips", "splits"):
        assert f"validations/{suite}/" in index
        assert (report.docs_path.parent / "expectations" / f"{suite}.html").is_file()


def test_rerun_replaces_the_docs_site_instead_of_piling_up_old_runs(
        curated: Path, params: Params, tmp_path: Path) -> None:
    out = tmp_path / "validate"
    validate_data(curated, params, out)
    report = validate_data(curated, params, out)

    assert report.docs_path is not None
    pages = sorted(p.name for p in (report.docs_path.parent / "validations").rglob("*.html"))
    assert pages == ["show1-clips.html", "show1-splits.html"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def _duplicate_clip_id(rows: Rows, params: Params) -> None:
    rows[1]["clip_id"] = rows[0]["clip_id"]


def _null_caption(rows: Rows, params: Params) -> None:
    rows[0]["caption"] = None


def _wrong_num_frames(rows: Rows, params: Params) -> None:
    rows[3]["num_frames"] = params.curate.clip.frames - 1


def _source_in_both_splits(rows: Rows, params: Params) -> None:
    first = next(r for r in rows if r["split"] == "train")
    first["split"] = "val"


def _no_train_clips(rows: Rows, params: Params) -> None:
    for row in rows:
        row["split"] = "val"


def _missing_resolution(rows: Rows, params: Params) -> None:
    rows[0]["resolutions"] = rows[0]["resolutions"][:1]


def _end_not_after_start(rows: Rows, params: Params) -> None:
    rows[2]["end"] = rows[2]["start"]


def _bad_content_hash(rows: Rows, params: Params) -> None:
    rows[0]["content_hash"] = rows[0]["content_hash"].upper()


def _bad_source_hash(rows: Rows, params: Params) -> None:
    rows[0]["source_hash"] = "not-a-hash"


def _too_small_source(rows: Rows, params: Params) -> None:
    rows[0]["source_width"] = params.curate.filters.min_width - 1


def _missing_column(rows: Rows, params: Params) -> None:
    for row in rows:
        del row["tensor"]


@pytest.mark.parametrize(("corrupt", "expected"), [
    (_duplicate_clip_id, ("clips", "expect_column_values_to_be_unique", "clip_id")),
    (_null_caption, ("clips", "expect_column_values_to_not_be_null", "caption")),
    (_wrong_num_frames, ("clips", "expect_column_values_to_be_between", "num_frames")),
    (_source_in_both_splits, ("splits", "expect_column_values_to_be_unique", "source_hash")),
    (_no_train_clips, ("splits", "expect_column_sum_to_be_between", "clips")),
    (_missing_resolution, ("clips", "expect_column_values_to_be_in_set", "resolution_keys")),
    (_end_not_after_start, ("clips", "expect_column_pair_values_a_to_be_greater_than_b", "end > start")),
    (_bad_content_hash, ("clips", "expect_column_values_to_match_regex", "content_hash")),
    (_bad_source_hash, ("clips", "expect_column_values_to_match_regex", "source_hash")),
    (_too_small_source, ("clips", "expect_column_values_to_be_between", "source_width")),
    (_missing_column, ("clips", "expect_table_columns_to_match_set", None)),
])
def test_corrupted_index_fails_exactly_the_expectation_that_guards_it(
        curated: Path, params: Params, tmp_path: Path, corrupt: Callable[[Rows, Params], None],
        expected: tuple[str, str, str | None]) -> None:
    rows = atomic.read_jsonl(curated / INDEX)
    corrupt(rows, params)
    report = validate_data(_with_index(tmp_path / "cur", rows), params, tmp_path / "validate")

    assert not report.success
    assert _failures(report) == {expected}
    suite, expectation, column = expected
    lines = report.failed_expectations()
    assert len(lines) == 1
    assert lines[0].startswith(f"{suite}: {expectation}({'' if column is None else f'column={column}'}) observed ")
    assert json.loads(report.result_path.read_text())["success"] is False


def test_fewer_clips_than_the_contract_asks_for_fails_the_row_count(
        curated: Path, params: Params, tmp_path: Path) -> None:
    strict = params.model_copy(update={"contracts": params.contracts.model_copy(update={"min_clips": 1000})})
    report = validate_data(curated, strict, tmp_path / "validate")

    assert _failures(report) == {("clips", "expect_table_row_count_to_be_between", None)}
    assert report.suites["clips"]["failed"][0]["observed"] == len(atomic.read_jsonl(curated / INDEX))


@pytest.mark.parametrize(("empty_captions", "passes"), [(1, True), (3, False)])
def test_manifest_suite_needs_most_rows_to_have_a_caption(
        curated: Path, params: Params, tmp_path: Path, empty_captions: int, passes: bool) -> None:
    lines = DEMO.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    assert len(rows) == 4 and params.contracts.manifest_min_complete_fraction == 0.5
    blanked = [f"id{i},clip{i}.mp4,{'  ' if i < empty_captions else 'A caption.'}," for i in range(len(rows))]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join([header, *blanked]) + "\n")

    report = validate_data(curated, params, tmp_path / "validate", manifest=manifest)

    assert report.suites["manifest"]["success"] is passes
    assert report.suites["clips"]["success"] and report.suites["splits"]["success"]
    if not passes:
        assert _failures(report) == {("manifest", "expect_column_values_to_not_be_null", "caption")}
        assert any(line.startswith("manifest: expect_column_values_to_not_be_null(column=caption)")
                   for line in report.failed_expectations())


def test_manifest_with_a_repeated_id_fails_the_manifest_suite(
        curated: Path, params: Params, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,video,caption\na,one.mp4,First clip.\na,two.mp4,Second clip.\n")

    report = validate_data(curated, params, tmp_path / "validate", manifest=manifest)

    assert _failures(report) == {("manifest", "expect_column_values_to_be_unique", "id")}


def test_missing_index_raises_contract_error_naming_the_file(params: Params, tmp_path: Path) -> None:
    (tmp_path / "cur").mkdir()
    with pytest.raises(ContractError, match=r"cur/index\.jsonl: clip index not found"):
        validate_data(tmp_path / "cur", params, tmp_path / "validate")
    assert not (tmp_path / "validate").exists()


def test_index_that_is_not_json_lines_raises_contract_error_naming_file_and_line(
        params: Params, tmp_path: Path) -> None:
    folder = tmp_path / "cur"
    folder.mkdir()
    (folder / INDEX).write_text('{"clip_id": "a"}\n{"clip_id": \n')
    with pytest.raises(ContractError, match=r"index\.jsonl:2: not valid JSON"):
        validate_data(folder, params, tmp_path / "validate")
    (folder / INDEX).write_text('{"clip_id": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(ContractError, match=r"index\.jsonl: row 2 is a JSON list"):
        validate_data(folder, params, tmp_path / "validate")
