"""/v1/models and /v1/datasets, and POST /v1/jobs as JSON from them, on the real app, database,
Redis and files (uploads validated in the real isolated child)."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import jobs
from core.db import session_factory
from core.housekeeping import run_housekeeping
from core.models import Artifact, Job, Resource, utcnow
from core.settings import Settings
from core.storage import LocalStorage
from tests.api.test_auth import KEY_OF_A, KEY_OF_B, KEYS, bearer
from tests.api.test_jobs import queue_length, queued_settings  # noqa: F401 (a fixture)
from tests.api.test_quotas_and_deletion import age
from tests.factories import VALID_CONFIG, image_zip, make_job, post_job, zip_archive
from tests.utils import SettingsFactory, make_client
from worker.tasks import run_claimed_job

QUICK_CONFIG = VALID_CONFIG | {"export": {"onnx": False, "speed": False}}  # seconds saved
MODEL_INFO = {
    "input_name": "input",
    "input_shape": [None, 3, 16, 16],
    "num_outputs": 2,
    "opset": 17,
    "parameters": 10,
}
DATASET_INFO = {
    "archive_format": "zip",
    "image_count": 64,
    "image_bytes": 1000,
    "class_names": ["a", "b"],
    "class_folders": ["a", "b"],
    "formats": {"png": 64},
    "image_sizes": [{"width": 16, "height": 16, "count": 64}],
    "images_sampled": 64,
    "unreadable_in_sample": 0,
}


def upload(
    client: httpx.Client, kind: str, path: Path, headers: dict[str, str] | None = None
) -> httpx.Response:
    plural = {"model": "models", "dataset": "datasets"}[kind]
    files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    return client.post(f"/v1/{plural}", files=files, headers=headers)


def stored(
    session: Session, settings: Settings, kind: str, tenant: str = "local", **info: Any
) -> Resource:
    """A resource row with a file, as store_resource leaves it (no validation: for state tests)."""
    resource_id = str(uuid.uuid4())
    storage = LocalStorage(settings.data_dir)
    folder = storage.resource_dir(resource_id)
    folder.mkdir(parents=True)
    file = folder / ("model.onnx" if kind == "model" else "data.zip")
    file.write_bytes(b"x" * 1000)
    default = MODEL_INFO if kind == "model" else DATASET_INFO
    resource = Resource(
        id=resource_id,
        tenant=tenant,
        kind=kind,
        filename=file.name,
        path=storage.relative(file),
        sha256=uuid.uuid4().hex * 2,
        size=1000,
        info=default | info,
    )
    session.add(resource)
    session.commit()
    return resource


def json_job(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", json={"config": QUICK_CONFIG} | body, headers=headers)


def test_a_model_is_stored_once_with_what_validation_found(
    client: httpx.Client, settings: Settings, session: Session, onnx_model: Path
) -> None:
    first = upload(client, "model", onnx_model)

    assert first.status_code == 201, first.text
    model = first.json()
    assert model["kind"] == "model" and model["filename"] == "teacher.onnx"
    assert model["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert model["size"] == onnx_model.stat().st_size
    assert model["info"]["input_name"] == "input"
    assert model["info"]["input_shape"] == [None, 3, 16, 16]
    assert model["info"]["num_outputs"] == 2
    assert model["info"]["opset"] >= 17 and model["info"]["parameters"] == 4226
    storage = LocalStorage(settings.data_dir)
    stored_file = storage.resource_dir(model["id"]) / "model.onnx"
    assert stored_file.read_bytes() == onnx_model.read_bytes()
    assert not any(storage.uploads_dir.iterdir())

    again = upload(client, "model", onnx_model)

    assert again.status_code == 200, again.text
    assert again.json() == model
    assert session.scalar(select(func.count()).select_from(Resource)) == 1
    assert not any(storage.uploads_dir.iterdir())
    assert client.get(f"/v1/models/{model['id']}").json() == model
    assert client.get(f"/v1/datasets/{model['id']}").status_code == 404  # not a dataset


def test_a_dataset_reports_images_classes_formats_and_sizes(
    client: httpx.Client, settings: Settings, session: Session, tmp_path: Path, image_archive: Path
) -> None:
    response = upload(client, "dataset", image_archive)

    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["info"] == {
        "archive_format": "zip",
        "image_count": 64,
        "image_bytes": dataset["info"]["image_bytes"],
        "class_names": ["cats", "dogs"],
        "formats": {"png": 64},
        "image_sizes": [{"width": 16, "height": 16, "count": 64}],
        "images_sampled": 64,
        "unreadable_in_sample": 0,
        "source_url": None,  # uploaded, not registered by URL
    }
    assert (LocalStorage(settings.data_dir).resource_dir(dataset["id"]) / "data.zip").is_file()
    row = session.get(Resource, dataset["id"])
    assert row is not None and row.info["class_folders"] == ["cats", "dogs"]  # for class_names

    not_images = zip_archive(tmp_path / "notes.zip", {"a.txt": b"hello"})
    refused = upload(client, "dataset", not_images)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_images"
    assert not any(LocalStorage(settings.data_dir).uploads_dir.iterdir())


def test_a_tenant_sees_only_its_own_resources(
    make_settings: SettingsFactory, onnx_model: Path
) -> None:
    client = make_client(make_settings(api_keys=KEYS))
    model = upload(client, "model", onnx_model, bearer(KEY_OF_A)).json()

    as_b = bearer(KEY_OF_B)
    for method in ("GET", "DELETE"):
        response = client.request(method, f"/v1/models/{model['id']}", headers=as_b)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models", headers=as_b).json()["items"] == []
    # B storing the same bytes is B's own model.
    of_b = upload(client, "model", onnx_model, as_b)
    assert of_b.status_code == 201 and of_b.json()["id"] != model["id"]
    # B's job cannot name A's model.
    response = json_job(client, {"model_id": model["id"], "data_id": "x"}, **as_b)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_lists_are_cursor_pages_newest_first(
    client: httpx.Client, settings: Settings, session: Session
) -> None:
    models = [stored(session, settings, "model") for _ in range(3)]
    stored(session, settings, "dataset")

    first = client.get("/v1/models", params={"limit": 2}).json()
    second = client.get("/v1/models", params={"limit": 2, "cursor": first["next_cursor"]}).json()

    assert [m["id"] for m in first["items"] + second["items"]] == [m.id for m in models][::-1]
    assert second["next_cursor"] is None
    assert len(client.get("/v1/datasets").json()["items"]) == 1


def test_delete_answers_409_while_a_queued_job_uses_it_then_removes_row_and_file(
    client: httpx.Client, settings: Settings, session: Session
) -> None:
    dataset = stored(session, settings, "dataset")
    queued = make_job(session, status="queued", eval_data_id=dataset.id)
    finished = make_job(session, status="succeeded", data_id=dataset.id)
    folder = LocalStorage(settings.data_dir).resource_dir(dataset.id)

    refused = client.delete(f"/v1/datasets/{dataset.id}")

    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "resource_in_use"
    assert folder.is_dir()

    jobs.request_cancel(session, "local", queued.id)
    assert client.delete(f"/v1/datasets/{dataset.id}").status_code == 204

    assert not folder.exists()
    assert client.get(f"/v1/datasets/{dataset.id}").status_code == 404
    for job in (queued, finished):
        row = session.get(Job, job.id, populate_existing=True)
        assert row is not None and row.inputs_deleted_at is not None
        assert (row.data_id, row.eval_data_id) == (None, None)  # the foreign key's SET NULL


def test_a_json_job_shares_the_stored_files_and_trains(
    queued_settings: Settings,  # noqa: F811 (the fixture)
    onnx_model: Path,
    image_archive: Path,
) -> None:
    client = make_client(queued_settings)
    model = upload(client, "model", onnx_model).json()
    data = upload(client, "dataset", image_archive).json()
    body = {"model_id": model["id"], "data_id": data["id"], "eval_data_id": data["id"]}
    config = QUICK_CONFIG | {"preprocessing": {"input_size": None}}  # the model's 16x16

    response = json_job(
        client, body | {"config": config, "metadata": {"run": "a"}}, **{"Idempotency-Key": "k1"}
    )

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["inputs"]["model"] == {
        "size": model["size"],
        "sha256": model["sha256"],
        "id": model["id"],
    }
    assert job["inputs"]["eval_data"]["id"] == data["id"]
    assert job["config"]["preprocessing"]["input_size"] == [16, 16]
    assert job["metadata"] == {"run": "a"}
    assert queue_length(queued_settings) == 1
    replay = json_job(client, body, **{"Idempotency-Key": "k1"})
    assert (replay.status_code, replay.json()["id"]) == (200, job["id"])
    storage = LocalStorage(queued_settings.data_dir)
    with session_factory(queued_settings)() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        assert row.model_path == f"resources/{model['id']}/model.onnx"
        assert row.data_path == row.eval_data_path == f"resources/{data['id']}/data.zip"
        assert not storage.inputs_dir(job["id"]).exists()  # nothing copied

        # The worker's own path, on the claimed row: the shared files train a job.
        claimed = jobs.claim_job(session, job["id"], "me", queued_settings.lease_seconds)
        assert claimed is not None
        run_claimed_job(queued_settings, claimed, "me")

    finished = client.get(f"/v1/jobs/{job['id']}").json()
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["metrics"]["student_top1"] is not None  # eval_data's class folders
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").json()["artifacts"] == finished["artifacts"]
    # Deleting the job removes its own files only; the dataset's stay.
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not storage.job_dir(job["id"]).exists()
    assert (storage.resource_dir(data["id"]) / "data.zip").is_file()


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"model_id": "nope"}, 404, "model_not_found"),
        ({"data_id": "nope"}, 404, "dataset_not_found"),
        ({"eval_data_id": "nope"}, 404, "dataset_not_found"),
        ({"config": {"weight_bits": 99}}, 422, "invalid_config"),
        ({"config": {"preprocessing": {"input_size": [32, 32]}}}, 422, "input_shape_mismatch"),
        ({"metadata": {"k": "v" * 513}}, 422, "invalid_request"),
        ({"unlabelled_eval": True}, 422, "eval_data_unlabeled"),
        ({"dynamic_model": True, "config": {}}, 422, "unsupported_model"),
        ({"huge_dataset": True}, 413, "pixel_budget_exceeded"),
        # class_names that leave out a class folder: refused here, not by the worker later
        ({"config": QUICK_CONFIG | {"class_names": ["b", "c"]}}, 422, "unknown_class_folder"),
        (
            {"eval_folders": ["a", "z"], "config": QUICK_CONFIG | {"class_names": ["a", "b"]}},
            422,
            "unknown_class_folder",
        ),  # eval_data's folders, not data's, when there is one
    ],
)
def test_json_job_refusals(
    client: httpx.Client,
    settings: Settings,
    session: Session,
    change: dict[str, Any],
    status: int,
    code: str,
) -> None:
    model = stored(session, settings, "model")
    data = stored(session, settings, "dataset")
    body: dict[str, Any] = {"model_id": model.id, "data_id": data.id}
    if "eval_folders" in change:
        folders = change.pop("eval_folders")
        body["eval_data_id"] = stored(session, settings, "dataset", class_folders=folders).id
    if change.pop("unlabelled_eval", False):
        body["eval_data_id"] = stored(session, settings, "dataset", class_names=None).id
    if change.pop("dynamic_model", False):
        body["model_id"] = stored(session, settings, "model", input_shape=[None, 3, None, None]).id
    if change.pop("huge_dataset", False):
        body["data_id"] = stored(session, settings, "dataset", image_count=10**9).id

    response = json_job(client, body | change)

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_a_json_job_the_broker_refuses_keeps_the_stored_files(
    make_settings: SettingsFactory, session: Session
) -> None:
    settings = make_settings(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    model, data = stored(session, settings, "model"), stored(session, settings, "dataset")

    response = json_job(make_client(settings), {"model_id": model.id, "data_id": data.id})

    assert response.status_code == 503, response.text
    assert session.scalar(select(func.count()).select_from(Job)) == 0
    storage = LocalStorage(settings.data_dir)
    assert storage.absolute(model.path).is_file() and storage.absolute(data.path).is_file()


def test_stored_bytes_count_each_resource_once(
    make_settings: SettingsFactory, onnx_model: Path
) -> None:
    settings = make_settings(max_stored_bytes_per_tenant=5_000)
    with session_factory(settings)() as session:
        model, data = stored(session, settings, "model"), stored(session, settings, "dataset")
        for _ in range(3):  # jobs from the resources: their files are the resources'
            make_job(session, status="succeeded", model_id=model.id, data_id=data.id,
                     model_size=1000, data_size=1000)  # fmt: skip
        own = make_job(session, status="succeeded", model_size=700, data_size=300)
        session.add(Artifact(job_id=own.id, name="a", path="p", size=500, sha256="0" * 64))
        session.commit()

        assert jobs.stored_bytes(session, "local") == 2000 + 1000 + 500

    # The model (28 KB) would pass the quota: refused from Content-Length, before the body.
    response = upload(make_client(settings), "model", onnx_model)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "storage_quota_exceeded"
    assert not LocalStorage(settings.data_dir).uploads_dir.exists()


def test_housekeeping_keeps_resource_files_and_removes_rowless_resource_folders(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(input_retention_days=1, orphan_upload_seconds=600)
    storage = LocalStorage(settings.data_dir)
    with session_factory(settings)() as session:
        model, data = stored(session, settings, "model"), stored(session, settings, "dataset")
        make_job(session, status="succeeded", model_id=model.id, data_id=data.id,
                 model_path=model.path, data_path=data.path,
                 finished_at=utcnow() - dt.timedelta(days=2))  # fmt: skip
        age(storage.resource_dir(model.id), 3600)
        orphan = storage.resource_dir(str(uuid.uuid4()))
        orphan.mkdir()
        age(orphan, 3600)
        young_orphan = storage.resource_dir(str(uuid.uuid4()))
        young_orphan.mkdir()

        report = run_housekeeping(session, settings)

        assert (report.inputs_deleted, report.orphan_resource_dirs) == (1, 1)
        assert storage.absolute(model.path).is_file() and storage.absolute(data.path).is_file()
        assert not orphan.exists() and young_orphan.exists()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest, make_settings: SettingsFactory) -> Settings:
    if request.param == "sqlite":
        return make_settings()
    return make_settings(database_url=request.getfixturevalue("postgres_url"))


def test_the_job_list_filters_by_status_and_metadata(any_database: Settings) -> None:
    with session_factory(any_database)() as session:
        a = make_job(session, status="queued", user_metadata={"exp": "w4", "owner": "ana"})
        b = make_job(session, status="running", user_metadata={"exp": "w4", "owner": "bo"})
        c = make_job(session, status="succeeded", user_metadata={"exp": "w2"})
        d = make_job(session, status="failed", user_metadata={"note": "für \"x\" 'y' \\"})
    client = make_client(any_database)

    def ids(query: str) -> set[str]:
        response = client.get(f"/v1/jobs?{query}")
        assert response.status_code == 200, response.text
        return {job["id"] for job in response.json()["items"]}

    assert ids("status=queued,running") == ids("status=queued&status=running") == {a.id, b.id}
    assert ids("status=succeeded&status=failed") == {c.id, d.id}
    assert ids("metadata[exp]=w4") == {a.id, b.id}
    assert ids("metadata[exp]=w4&metadata[owner]=bo") == {b.id}
    assert ids("metadata[exp]=w4&status=succeeded") == set()
    assert ids("metadata[owner]=nobody") == set()
    note = client.get("/v1/jobs", params={"metadata[note]": "für \"x\" 'y' \\"}).json()
    assert [job["id"] for job in note["items"]] == [d.id]
    assert client.get(f"/v1/jobs/{a.id}").json()["metadata"] == {"exp": "w4", "owner": "ana"}
    for query, code in (
        ("status=done", "invalid_status"),
        ("metadata[a%22b]=x", "invalid_metadata"),
    ):
        response = client.get(f"/v1/jobs?{query}")
        assert (response.status_code, response.json()["error"]["code"]) == (422, code)


def test_multipart_jobs_take_metadata_too(
    queued_settings: Settings,  # noqa: F811 (the fixture)
    onnx_model: Path,
    tmp_path: Path,
) -> None:
    client = make_client(queued_settings)
    data = image_zip(tmp_path / "images.zip", per_class=2)

    def submit(metadata: str) -> httpx.Response:
        files = {
            "model": ("m.onnx", onnx_model.read_bytes()),
            "data": ("d.zip", data.read_bytes()),
        }
        form = {"config": '{"epochs": 1}', "metadata": metadata}
        return client.post("/v1/jobs", files=files, data=form)

    response = submit('{"team": "vision"}')
    assert response.status_code == 202, response.text
    assert response.json()["metadata"] == {"team": "vision"}
    assert response.json()["inputs"]["model"]["id"] is None
    refused = submit('{"team": 7}')
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "invalid_metadata")
    assert post_job(client, model=onnx_model, data=data).json()["metadata"] == {}
