"""The S3-compatible object store of the local stack: moto's S3 server (`moto[server]`, from PyPI).

MinIO, the usual local S3, is a Go binary that no Python package registry ships, so it cannot be installed where
show1 installs; moto's server speaks the same S3 API that MLflow (boto3) and DVC (s3fs) use, which is all the stack
needs from it. It keeps objects in memory: `show1 stack down` saves the bucket to the stack folder (`s3/`) and
`show1 stack up` loads it back, so a stopped and restarted stack keeps its artifacts. A stack killed outright
loses what was written since it last started. For a team, point the same settings at a real S3 or MinIO.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from show1.stack.processes import Service, StackError, http_ok, start, wait_until

BUCKET = "show1"
# moto accepts any credentials; the clients (boto3, s3fs) still need some to sign requests with.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "show1-local", "AWS_SECRET_ACCESS_KEY": "show1-local-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def client_env(endpoint: str) -> dict[str, str]:
    """What boto3 (MLflow), s3fs (DVC) and the AWS CLI need to reach the store."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def start_server(host: str, port: int, log: Path) -> Service:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise StackError("the S3 server is not installed: pip install 'show1[stack]' (moto[server])") from None
    argv = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    return start("s3", argv, log=log, url=f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}")


def healthy(service: Service) -> bool:
    return http_ok(f"{service.url}/moto-api/")


def wait_ready(service: Service, timeout: float) -> None:
    wait_until(service, lambda: healthy(service), timeout, "answering")


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=CREDENTIALS["AWS_DEFAULT_REGION"])


def ensure_bucket(endpoint: str, bucket: str = BUCKET) -> None:
    client = s3_client(endpoint)
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)


def keys(endpoint: str, bucket: str = BUCKET, prefix: str = "") -> list[str]:
    """Every key in the bucket under `prefix`."""
    paginator = s3_client(endpoint).get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def is_empty(endpoint: str, bucket: str = BUCKET) -> bool:
    return not s3_client(endpoint).list_objects_v2(Bucket=bucket, MaxKeys=1).get("Contents")


def save(endpoint: str, folder: Path, bucket: str = BUCKET) -> int:
    """Copy every object of the bucket into `folder` (replaced whole: a new copy is made beside it, then swapped
    in). Returns the number of objects."""
    from show1.atomic import folder_in_place

    client = s3_client(endpoint)
    names = keys(endpoint, bucket)
    with folder_in_place(folder) as staging:
        for key in names:
            target = staging / key
            if staging.resolve() not in target.resolve().parents:
                raise StackError(f"object key {key!r} would be saved outside {folder}")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    return len(names)


def load(endpoint: str, folder: Path, bucket: str = BUCKET) -> int:
    """Upload what `save` wrote back into the bucket. Returns the number of objects."""
    if not folder.is_dir():
        return 0
    client = s3_client(endpoint)
    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    for path in files:
        client.upload_file(str(path), bucket, path.relative_to(folder).as_posix())
    return len(files)

