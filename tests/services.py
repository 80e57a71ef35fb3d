"""Services the product starts (show1.stack), started alone for tests that need only one of them."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from show1.stack import object_store
from show1.stack.processes import free_port, stop


@contextlib.contextmanager
def s3_store(folder: Path) -> Iterator[str]:
    """The stack's S3 server (moto) with its bucket, logging into `folder`; yields its endpoint URL."""
    import s3fs

    # s3fs keeps one filesystem per set of arguments, with the endpoint it found in the environment then: a test
    # module's server must not be reached through the previous module's (stopped) one.
    s3fs.S3FileSystem.clear_instance_cache()
    service = object_store.start_server("127.0.0.1", free_port(), folder / "s3.log")
    try:
        object_store.wait_ready(service, timeout=300)
        object_store.ensure_bucket(service.url)
        yield service.url
    finally:
        stop(service)
        s3fs.S3FileSystem.clear_instance_cache()


def api(base: str, path: str, body: dict | None = None) -> dict | list:
    """GET (no body) or POST (a JSON body) a JSON API such as Prefect's REST API: the decoded answer."""
    request = urllib.request.Request(f"{base}{path}", data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
