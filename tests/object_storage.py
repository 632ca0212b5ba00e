"""An S3-compatible server for the tests: moto's standalone server, in a thread of this process.

``moto_endpoint`` starts it once per session on a free port; ``s3_env`` is what a process needs
to reach it (credentials, region, endpoint); ``bucket`` makes a fresh bucket per test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

# moto accepts any credentials; these keep boto3 from looking for real ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto S3 server; AWS credentials for it are in this process's environment."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_client(moto_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A fresh, empty bucket."""
    name = f"sqakd-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(moto_endpoint: str, bucket: str) -> dict[str, str]:
    """The settings (as environment variables) of a service that stores in ``bucket``."""
    return CREDENTIALS | {
        "STORAGE_URL": f"s3://{bucket}/service",
        "STORAGE_ENDPOINT_URL": moto_endpoint,
    }


def bucket_keys(s3_client: Any, bucket: str, prefix: str = "") -> set[str]:
    """Every key in ``bucket`` under ``prefix``."""
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}
