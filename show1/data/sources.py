"""Where a manifest's `video` points: a local path under an allowed root, a `package://` path inside
an allowed installed package, or an http(s) URL fetched into a content-addressed cache."""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from show1 import atomic
from show1.config import Download
from show1.data.errors import Rejected

PACKAGE_SCHEME = "package://"
CHUNK = 1 << 20


def package_root(name: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise Rejected("missing_file", f"package '{name}' is not installed (pip install it, e.g. show1[demo])")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_local(video: str, manifest_dir: Path, allowed_roots: list[Path],
                  allowed_packages: list[str]) -> Path:
    """Resolve a path or `package://pkg/rel/path`; reject anything outside the allowed roots."""
    if video.startswith(PACKAGE_SCHEME):
        package, _, rel = video[len(PACKAGE_SCHEME):].partition("/")
        if package not in allowed_packages:
            raise Rejected("path_outside_root",
                           f"package '{package}' is not in curate.allowed_packages {allowed_packages}")
        if not rel or PurePosixPath(rel).is_absolute():
            raise Rejected("path_outside_root", f"{video}: needs a path inside the package")
        root = package_root(package)
        with _no_such_path(video):
            path = (root / rel).resolve()
        if not _inside(path, root):
            raise Rejected("path_outside_root", f"{video} resolves to {path}, outside package '{package}'")
    else:
        roots = [manifest_dir.resolve(), *(Path(r).expanduser().resolve() for r in allowed_roots)]
        with _no_such_path(video):
            path = (manifest_dir / Path(video).expanduser()).resolve()
        if not any(_inside(path, root) for root in roots):
            raise Rejected("path_outside_root",
                           f"{video} resolves to {path}, outside the manifest folder {roots[0]}"
                           + (f" and curate.allowed_roots {[str(r) for r in roots[1:]]}" if roots[1:] else ""))
    try:
        found = path.is_file()
    except OSError as exc:  # a name longer than the file system allows
        raise Rejected("missing_file", f"{path}: {exc.strerror or exc}") from None
    if not found:
        raise Rejected("missing_file", f"{path} does not exist or is not a file")
    return path


@contextmanager
def _no_such_path(video: str) -> Iterator[None]:
    """A path that resolves to no file (a NUL byte, a lone surrogate, a link to itself, the home of an unknown user)
    is a missing file, not a crash of the whole run."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop, ~nobody; ValueError: NUL, unencodable
        raise Rejected("missing_file", f"{video!r}: cannot be resolved to a file ({exc})") from None


def _scheme(video: str) -> str | None:
    """The URL scheme of `video` ("" for a path), or None when it is not a URL Python can parse (`http://[x`)."""
    try:
        return urlparse(video).scheme.lower()
    except ValueError:  # an unbalanced IPv6 bracket in the host
        return None


def is_url(video: str) -> bool:
    return _scheme(video) in ("http", "https")


def check_scheme(video: str) -> None:
    scheme = _scheme(video)
    if scheme is None:
        raise Rejected("unsupported_scheme", f"{video}: not a URL that can be parsed (use a path or http(s))")
    if video.startswith(PACKAGE_SCHEME) or scheme in ("", "http", "https") or len(scheme) == 1:
        return  # len 1: a Windows drive letter, not a scheme
    raise Rejected("unsupported_scheme", f"{video}: scheme '{scheme}' is not supported (use a path or http(s))")


class _Permanent(Exception):
    """A download error that retrying will not fix."""


def download(url: str, cache_dir: Path, cfg: Download) -> Path:
    """Fetch `url` into `cache_dir/blobs/<sha256>` once; later calls reuse it without the network.

    Retries transient failures with exponential backoff; stops at `cfg.max_bytes`.
    """
    if not cfg.enabled:
        raise Rejected("download_failed", f"{url}: downloads are disabled (curate.download.enabled)")
    record_path = cache_dir / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()}.json"
    if record_path.is_file():
        try:
            blob = cache_dir / json.loads(record_path.read_text())["blob"]
        except (ValueError, KeyError, TypeError):
            blob = None  # a damaged record: download again and rewrite it
        if blob is not None and blob.is_file():
            return blob
    last_error = "no attempt made"
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        try:
            blob, size = _fetch_once(url, cache_dir, cfg)
        except _Permanent as exc:
            raise Rejected("download_failed", f"{url}: {exc}") from None
        except Rejected:
            raise
        except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
            last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            continue
        atomic.write_json(record_path, {"url": url, "blob": str(blob.relative_to(cache_dir)), "bytes": size})
        return blob
    raise Rejected("download_failed", f"{url}: gave up after {cfg.retries + 1} attempts ({last_error})")


def _fetch_once(url: str, cache_dir: Path, cfg: Download) -> tuple[Path, int]:
    request = urllib.request.Request(url, headers={"User-Agent": "show1-curate"})
    try:
        response = urllib.request.urlopen(request, timeout=cfg.timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code in (408, 429) or exc.code >= 500:
            raise
        raise _Permanent(f"HTTP {exc.code} {exc.reason}") from None
    with response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
            raise Rejected("too_large", f"{url}: {declared} bytes > curate.download.max_bytes {cfg.max_bytes}")
        digest, size = hashlib.sha256(), 0
        suffix = Path(urlparse(url).path).suffix[:8] or ".bin"
        staging = cache_dir / "blobs"
        with atomic.temporary_in(staging, "incoming") as tmp:
            with open(tmp, "wb") as out:
                while chunk := response.read(CHUNK):
                    size += len(chunk)
                    if size > cfg.max_bytes:
                        raise Rejected("too_large", f"{url}: more than curate.download.max_bytes {cfg.max_bytes}")
                    digest.update(chunk)
                    out.write(chunk)
            if declared and declared.isdigit() and size != int(declared):
                raise OSError(f"connection closed after {size} of {declared} bytes")
            blob = staging / digest.hexdigest()[:2] / f"{digest.hexdigest()}{suffix}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            atomic.publish(tmp, blob)
    return blob, size
