"""The artifact store, the same tests on both backends: the data directory and an S3 bucket
(moto's server); then what only the bucket does (its cache, multipart, presigned URLs)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.errors import InputError
from core.settings import MiB, Settings
from core.storage import LocalStorage, S3Storage, Storage, open_storage
from tests.object_storage import bucket_keys

JOB = "0b7c4c47-5d8e-4a8e-9d7e-1f6f3c0a2b11"


@pytest.fixture(params=["local", "s3"])
def settings_of(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Any:  # a factory: (**overrides) -> Settings
    def make(**overrides: Any) -> Settings:
        if request.param == "s3":
            overrides = {
                "storage_url": f"s3://{request.getfixturevalue('bucket')}/some/prefix",
                "storage_endpoint_url": request.getfixturevalue("moto_endpoint"),
                **overrides,
            }
        return Settings(**{"data_dir": tmp_path / "data", **overrides})

    return make


@pytest.fixture
def storage(settings_of: Any) -> Storage:
    return open_storage(settings_of())


def staged(storage: Storage, files: dict[str, bytes]) -> Path:
    folder = storage.new_upload_dir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def read(storage: Storage, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(storage.iter_bytes(key, start, end))


def test_the_setting_picks_the_backend(storage: Storage, settings_of: Any) -> None:
    settings = settings_of()
    expected = LocalStorage if settings.storage_url is None else S3Storage
    assert type(storage) is expected
    assert storage.is_writable()


def test_an_adopted_upload_is_stored_whole_and_its_staging_folder_goes(storage: Storage) -> None:
    files = {"model.onnx": b"onnx" * 1000, "data.zip": bytes(range(256)) * 100}
    folder = staged(storage, files)

    key = storage.adopt(folder, storage.inputs_key(JOB))

    assert key == f"jobs/{JOB}/inputs" and not folder.exists()
    for name, content in files.items():
        local = storage.local_file(f"{key}/{name}", hashlib.sha256(content).hexdigest())
        assert local.read_bytes() == content and local.name == name
        assert read(storage, f"{key}/{name}") == content
    data = files["data.zip"]
    assert read(storage, f"{key}/data.zip", 100, 200) == data[100:200]
    assert read(storage, f"{key}/data.zip", len(data) - 7) == data[-7:]


def test_artifacts_are_hashed_moved_and_replaced(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "metrics.json"
    source.write_bytes(b'{"agreement": 0.9}')

    stored = storage.store_artifact(JOB, "metrics.json", source)

    assert stored.key == f"jobs/{JOB}/artifacts/metrics.json" and stored.name == "metrics.json"
    assert (stored.size, stored.sha256) == (18, hashlib.sha256(b'{"agreement": 0.9}').hexdigest())
    assert not source.exists()
    storage.put_bytes(stored.key, b"new")
    assert read(storage, stored.key) == b"new"


def test_removing_a_folder_removes_it_alone(storage: Storage) -> None:
    storage.adopt(staged(storage, {"a.bin": b"a"}), storage.inputs_key(JOB))
    neighbour = JOB[:-1] + "2"  # the same prefix but one character
    storage.adopt(staged(storage, {"b.bin": b"b"}), storage.inputs_key(neighbour))
    storage.work_dir(JOB).mkdir(parents=True)

    storage.remove_job_files(JOB)

    assert storage.folder_names("jobs") == {neighbour}
    assert not storage.work_dir(JOB).exists()
    with pytest.raises(FileNotFoundError):
        storage.iter_bytes(f"jobs/{JOB}/inputs/a.bin")
    with pytest.raises(FileNotFoundError):
        storage.local_file(f"jobs/{JOB}/inputs/a.bin", hashlib.sha256(b"a").hexdigest())
    assert read(storage, f"jobs/{neighbour}/inputs/b.bin") == b"b"
    storage.remove(storage.job_key(JOB))  # nothing left there: fine


def test_folders_and_when_they_last_changed(storage: Storage) -> None:
    before = time.time() - 5  # S3 stamps have whole seconds
    storage.adopt(staged(storage, {"m.onnx": b"m"}), storage.resource_key("r1"))
    storage.put_bytes(storage.sweep_artifact_key("s1", "report.html"), b"<html>")

    assert storage.folder_names("resources") == {"r1"}
    assert storage.folder_names("sweeps") == {"s1"}
    assert storage.folder_names("jobs") == set()
    changed = storage.last_change("resources/r1")
    assert changed is not None and before <= changed <= time.time() + 5
    assert storage.last_change("resources/r2") is None


def test_a_checkpoint_mirrored_by_one_worker_is_restored_by_another(
    settings_of: Any, tmp_path: Path
) -> None:
    # Two machines' data directories on one store (a bucket); a local store is one directory.
    first = open_storage(settings_of())
    other_dir = tmp_path / "other" if isinstance(first, S3Storage) else tmp_path / "data"
    second = open_storage(settings_of(data_dir=other_dir))
    checkpoint = first.work_dir(JOB) / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"step 100")

    first.mirror_work_file(JOB, checkpoint)
    second.restore_work_file(JOB, "checkpoint.pt")

    assert (second.work_dir(JOB) / "checkpoint.pt").read_bytes() == b"step 100"
    assert checkpoint.read_bytes() == b"step 100"  # mirrored, not moved
    second.discard_work_dir(JOB)  # the job ended
    (third := open_storage(settings_of(data_dir=tmp_path / "third"))).restore_work_file(
        JOB, "checkpoint.pt"
    )
    assert not (third.work_dir(JOB) / "checkpoint.pt").exists()


def test_a_worker_takes_a_newer_mirrored_checkpoint_over_its_own_older_one(
    bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    """A job that went from the first worker to a second and back resumes where the second
    got to; a worker whose own copy is the newer keeps it. (A local store is one directory:
    its workers share one checkpoint file.)"""
    first, second = (
        open_storage(
            Settings(
                data_dir=tmp_path / machine,
                storage_url=f"s3://{bucket}/some/prefix",
                storage_endpoint_url=moto_endpoint,
            )
        )
        for machine in ("first", "second")
    )
    old = first.work_dir(JOB) / "checkpoint.pt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"step 100")
    saved = old.stat().st_mtime_ns - 10**9  # a second before the second worker's save
    os.utime(old, ns=(saved, saved))
    first.mirror_work_file(JOB, old)
    first.restore_work_file(JOB, "checkpoint.pt")  # its own mirror: nothing fetched
    assert old.stat().st_mtime_ns == saved
    newer = second.work_dir(JOB) / "checkpoint.pt"
    newer.parent.mkdir(parents=True)
    newer.write_bytes(b"step 200")
    second.mirror_work_file(JOB, newer)

    first.restore_work_file(JOB, "checkpoint.pt")

    assert old.read_bytes() == b"step 200"
    newer.write_bytes(b"step 300")  # saved after its mirror
    second.restore_work_file(JOB, "checkpoint.pt")
    assert newer.read_bytes() == b"step 300"


def test_keys_cannot_climb_out_of_the_store(storage: Storage) -> None:
    with pytest.raises(ValueError):
        storage.iter_bytes("jobs/../../etc/passwd")
    with pytest.raises(InputError, match="not a valid file name"):
        storage.artifact_key(JOB, "../x")


# -- the bucket alone ----------------------------------------------------------------------------


@pytest.fixture
def s3_settings(tmp_path: Path, bucket: str, moto_endpoint: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "worker",
        storage_url=f"s3://{bucket}/p",
        storage_endpoint_url=moto_endpoint,
        storage_multipart_bytes=5 * MiB,
    )


def test_inputs_are_fetched_once_per_content_and_checked(
    s3_settings: Settings, s3_client: Any, bucket: str
) -> None:
    storage = open_storage(s3_settings)
    content = b"images" * 1000
    digest = hashlib.sha256(content).hexdigest()
    key = storage.adopt(staged(storage, {"data.zip": content}), storage.resource_key("r1"))

    with pytest.raises(ValueError, match="sha256"):
        storage.local_file(f"{key}/data.zip", "0" * 64)  # another content than recorded
    cached = storage.local_file(f"{key}/data.zip", digest)
    s3_client.delete_object(Bucket=bucket, Key=f"p/{key}/data.zip")

    assert cached == s3_settings.data_dir / "cache" / "objects" / digest / "data.zip"
    assert storage.local_file(f"{key}/data.zip", digest) == cached  # no second fetch
    assert cached.read_bytes() == content
    assert [p.name for p in cached.parent.iterdir()] == ["data.zip"]  # no partial left


def test_big_files_go_up_in_parts(
    s3_settings: Settings, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    storage = open_storage(s3_settings)
    content = bytes(range(256)) * (11 * MiB // 256)  # 3 parts of 5 MiB
    source = tmp_path / "model_qdq.onnx"
    source.write_bytes(content)

    stored = storage.store_artifact(JOB, source.name, source)

    head = s3_client.head_object(Bucket=bucket, Key=f"p/{stored.key}")
    assert head["ContentLength"] == len(content) and head["ETag"].endswith('-3"')
    assert storage.local_file(stored.key, stored.sha256).read_bytes() == content


def test_presigned_urls_download_without_the_api(
    s3_settings: Settings, s3_client: Any, bucket: str
) -> None:
    storage = open_storage(s3_settings)
    key = storage.artifact_key(JOB, "metrics.json")
    storage.put_bytes(key, b"{}")

    url = storage.presigned_url(key, filename="metrics.json", media_type="application/json")

    assert url is not None
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"{}"
    assert response.headers["content-disposition"] == 'attachment; filename="metrics.json"'
    assert bucket_keys(s3_client, bucket) == {f"p/{key}"}  # under the prefix


def test_a_missing_bucket_is_not_ready(s3_settings: Settings) -> None:
    missing = s3_settings.model_copy(update={"storage_url": "s3://no-such-bucket-here/p"})
    assert not open_storage(missing).is_writable()


@pytest.mark.parametrize(
    "url", ["s3://", "s3://B/x", "http://bucket/x", "s3://bucket/../x", "s3://a/x"]
)
def test_storage_urls_are_checked(url: str) -> None:
    with pytest.raises(ValueError, match="STORAGE_URL"):
        Settings(storage_url=url)


def test_cached_inputs_unused_for_the_cache_days_go(s3_settings: Settings) -> None:
    storage = open_storage(s3_settings)
    contents = {name: name.encode() * 100 for name in ("old.zip", "used.zip", "new.zip")}
    key = storage.adopt(staged(storage, contents), storage.resource_key("r1"))
    digests = {name: hashlib.sha256(content).hexdigest() for name, content in contents.items()}
    cached = {name: storage.local_file(f"{key}/{name}", digests[name]) for name in contents}
    cached.pop("new.zip").unlink()  # fetched again below
    eight_days_ago = time.time() - 8 * 24 * 3600
    for path in cached.values():
        os.utime(path, (eight_days_ago, eight_days_ago))
    storage.local_file(f"{key}/used.zip", digests["used.zip"])  # a job uses it: fresh again

    storage.local_file(f"{key}/new.zip", digests["new.zip"])

    assert not cached["old.zip"].parent.exists()
    assert cached["used.zip"].read_bytes() == contents["used.zip"]


def test_the_cache_outlives_the_longest_job() -> None:
    with pytest.raises(ValueError, match="STORAGE_CACHE_DAYS"):
        Settings(storage_cache_days=1, max_job_seconds=2 * 24 * 3600)
