"""``client.datasets.register(url)``: the SDK registers a dataset from object storage (moto's
server) on the real app, served by uvicorn; the API's side: tests/api/test_datasets_from_url.py."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

import pytest
from sqakd_client import Client, InvalidRequest

from api.main import create_app
from tests.utils import SettingsFactory, served_by_uvicorn


def test_the_sdk_registers_a_dataset_by_url(
    make_settings: SettingsFactory,
    bucket: str,
    moto_endpoint: str,
    s3_client: Any,
    image_archive: Path,
) -> None:
    key = secrets.token_urlsafe(32)
    settings = make_settings(
        storage_url=f"s3://{bucket}/svc", storage_endpoint_url=moto_endpoint, api_keys={key: "acme"}
    )
    s3_client.upload_file(str(image_archive), bucket, "incoming/images.zip")
    url = f"s3://{bucket}/incoming/images.zip"

    with (
        served_by_uvicorn(create_app(settings, sweeper=False), lifespan="off") as port,
        Client(f"http://127.0.0.1:{port}", api_key=key) as client,
    ):
        dataset = client.datasets.register(url, name="train")
        # What a job's data=... does with a URL: the same bytes, the same dataset.
        same = client.datasets.resolve(url)
        with pytest.raises(InvalidRequest) as refused:
            client.datasets.register(f"s3://{bucket}/svc/resources/{dataset.id}/data.zip")
        with pytest.raises(ValueError, match="only datasets"):
            client.models.resolve(url)

    assert dataset.filename == "train" and dataset.info["source_url"] == url
    assert dataset.sha256 == hashlib.sha256(image_archive.read_bytes()).hexdigest()
    assert dataset.info["image_count"] == 64
    assert same == dataset.id
    assert refused.value.code == "url_not_allowed"
