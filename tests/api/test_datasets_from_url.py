"""POST /v1/datasets with JSON ``{"url": "s3://bucket/key"}``: a dataset registered from object
storage (moto's server), on the real app and database, validated in the real isolated child.
That a job trains from one, on a worker of its own: tests/test_storage_e2e.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from core import bucket_import
from core.errors import InputError
from core.settings import Settings
from core.storage import S3Storage, open_storage
from tests.factories import zip_archive
from tests.object_storage import bucket_keys
from tests.utils import SettingsFactory, make_client

SOURCE_KEY = "incoming/images.zip"


@pytest.fixture
def s3_settings(make_settings: SettingsFactory, bucket: str, moto_endpoint: str) -> Settings:
    return make_settings(storage_url=f"s3://{bucket}/svc", storage_endpoint_url=moto_endpoint)


def put(s3_client: Any, bucket: str, key: str, path_or_bytes: Path | bytes) -> None:
    body = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    s3_client.put_object(Bucket=bucket, Key=key, Body=body)


def test_a_dataset_registered_by_url_is_a_stored_copy_of_the_object(
    s3_settings: Settings, bucket: str, s3_client: Any, image_archive: Path
) -> None:
    put(s3_client, bucket, SOURCE_KEY, image_archive)
    client = make_client(s3_settings)

    response = client.post("/v1/datasets", json={"url": f"s3://{bucket}/{SOURCE_KEY}"})

    assert response.status_code == 201, response.text
    dataset = response.json()
    content = image_archive.read_bytes()
    assert dataset["kind"] == "dataset" and dataset["filename"] == "images.zip"
    assert dataset["size"] == len(content)
    assert dataset["sha256"] == hashlib.sha256(content).hexdigest()
    assert dataset["info"]["image_count"] == 64
    assert dataset["info"]["class_names"] == ["cats", "dogs"]
    assert dataset["info"]["source_url"] == f"s3://{bucket}/{SOURCE_KEY}"
    assert client.get("/v1/datasets").json()["items"] == [dataset]
    copy = f"svc/resources/{dataset['id']}/data.zip"
    assert s3_client.get_object(Bucket=bucket, Key=copy)["Body"].read() == content
    assert not any(open_storage(s3_settings).uploads_dir.iterdir())  # the staging file went

    # The same bytes again, under another name: the stored dataset (200), nothing copied.
    put(s3_client, bucket, "incoming/again.zip", image_archive)
    again = client.post(
        "/v1/datasets", json={"url": f"s3://{bucket}/incoming/again.zip", "name": "x"}
    )
    assert (again.status_code, again.json()) == (200, dataset)

    # The copy is the service's: the user's objects may go, and deletion takes the copy only.
    s3_client.delete_object(Bucket=bucket, Key=SOURCE_KEY)
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert bucket_keys(s3_client, bucket) == {"incoming/again.zip"}


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("http://example.com/images.zip", 422, "invalid_url"),
        ("file:///etc/passwd", 422, "invalid_url"),
        ("s3://{bucket}/incoming//images.zip", 422, "invalid_url"),
        ("s3://another-bucket/images.zip", 422, "url_not_allowed"),
        ("s3://{bucket}/svc/resources/some-id/data.zip", 422, "url_not_allowed"),
        ("s3://{bucket}/incoming/missing.zip", 422, "object_not_found"),
        ("s3://{bucket}/incoming/notes.zip", 422, "no_images"),  # the archive's own checks
        ("s3://{bucket}/incoming/big.zip", 413, "upload_too_large"),
    ],
)
def test_refusals(
    make_settings: SettingsFactory,
    bucket: str,
    moto_endpoint: str,
    s3_client: Any,
    tmp_path: Path,
    url: str,
    status: int,
    code: str,
) -> None:
    settings = make_settings(
        storage_url=f"s3://{bucket}/svc",
        storage_endpoint_url=moto_endpoint,
        max_data_bytes=1000,
    )
    notes = zip_archive(tmp_path / "notes.zip", {"a.txt": b"hello"})
    put(s3_client, bucket, "incoming/notes.zip", notes)
    put(s3_client, bucket, "incoming/big.zip", b"x" * 1001)
    put(s3_client, bucket, "svc/resources/some-id/data.zip", notes.read_bytes())

    response = make_client(settings).post("/v1/datasets", json={"url": url.format(bucket=bucket)})

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert bucket_keys(s3_client, bucket, "svc/resources/") == {"svc/resources/some-id/data.zip"}
    assert not any(open_storage(settings).uploads_dir.glob("*"))


def test_a_service_on_a_local_directory_registers_no_urls(client: Any) -> None:
    response = client.post("/v1/datasets", json={"url": "s3://datasets/images.zip"})

    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "url_datasets_need_s3"


def test_where_a_tenant_may_register_from(make_settings: SettingsFactory) -> None:
    settings = make_settings(
        storage_url="s3://service/svc",
        storage_import_buckets=["shared", "incoming/{tenant}", "service/uploads/"],
    )

    def allowed(tenant: str, url: str) -> bool:
        try:
            bucket_import.check_allowed(settings, tenant, bucket_import.parse_object_url(url))
        except InputError as exc:
            assert exc.code == "url_not_allowed"
            return False
        return True

    assert allowed("acme", "s3://shared/any/key.zip")
    assert allowed("acme", "s3://incoming/acme/data.tar")
    assert not allowed("acme", "s3://incoming/acme-other/data.tar")  # a folder, not a prefix
    assert not allowed("acme", "s3://incoming/beta/data.tar")
    assert not allowed("a/b", "s3://incoming/a/b/data.tar")  # no {tenant} for such a name
    assert allowed("acme", "s3://service/uploads/data.tar")
    assert not allowed("acme", "s3://service/svc/resources/id/data.zip")
    assert not allowed("acme", "s3://service/other.zip")  # STORAGE_IMPORT_BUCKETS replaces it
    # By default the service's bucket, outside its own objects; [] allows nothing.
    default = make_settings(storage_url="s3://service/svc")
    for folder in ("jobs", "resources", "sweeps"):
        with pytest.raises(InputError):
            bucket_import.check_allowed(
                default, "acme", bucket_import.ObjectUrl("service", f"svc/{folder}/x")
            )
    bucket_import.check_allowed(default, "acme", bucket_import.ObjectUrl("service", "svc/in/x"))
    nothing = make_settings(storage_url="s3://service/svc", storage_import_buckets=[])
    with pytest.raises(InputError, match="nowhere"):
        bucket_import.check_allowed(nothing, "acme", bucket_import.ObjectUrl("service", "x"))


def test_large_objects_move_in_parts_and_a_changed_object_is_refused(
    make_settings: SettingsFactory, bucket: str, moto_endpoint: str, s3_client: Any
) -> None:
    """Ranged GETs and a multipart server-side copy (5 MiB parts, S3's smallest), each pinned
    to the ETag that the HEAD saw."""
    settings = make_settings(
        storage_url=f"s3://{bucket}/svc",
        storage_endpoint_url=moto_endpoint,
        storage_multipart_bytes=5 * 1024 * 1024,
    )
    storage = open_storage(settings)
    assert isinstance(storage, S3Storage)
    content = os.urandom(11 * 1024 * 1024)
    put(s3_client, bucket, "incoming/big.bin", content)
    source = bucket_import.locate(storage, settings, "local", f"s3://{bucket}/incoming/big.bin")
    staging = storage.new_upload_dir()

    fetched = bucket_import.download(storage, source, staging / "data.bin")
    bucket_import.copy_into(storage, source, "resources/r/data.bin")

    assert fetched.sha256 == hashlib.sha256(content).hexdigest() and fetched.size == len(content)
    copied = s3_client.get_object(Bucket=bucket, Key="svc/resources/r/data.bin")
    assert copied["Body"].read() == content
    assert copied["ETag"].endswith('-3"')  # three parts

    changed_content = content[:-1] + bytes([content[-1] ^ 0xFF])  # never equal to the old bytes
    put(s3_client, bucket, "incoming/big.bin", changed_content)  # same size, new version
    with pytest.raises(InputError) as changed:
        bucket_import.download(storage, source, staging / "again.bin")
    assert (changed.value.code, changed.value.status_code) == ("source_changed", 409)
