"""Bad input to POST /v1/jobs: a 4xx JSON error that names the problem, and nothing stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from core.db import migrate, session_factory
from core.models import Job
from core.settings import Settings
from tests.factories import VALID_CONFIG, png_bytes, post_job, zip_archive
from tests.utils import SettingsFactory, make_client


def with_config(**changes: Any) -> dict[str, Any]:
    return VALID_CONFIG | changes


def assert_rejected(
    response: httpx.Response, settings: Settings, status: int, code: str, *mentions: str
) -> None:
    """The error is JSON with the expected code, names the problem, and left nothing behind."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for mention in mentions:
        assert mention in error["message"], error
    with session_factory(settings)() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    uploads = settings.data_dir / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir()), list(uploads.iterdir())
    assert not (settings.data_dir / "jobs").exists()


@pytest.mark.parametrize(
    ("config", "mentions"),
    [
        (with_config(method="fancy"), ("config.method",)),
        (with_config(weight_bits=0), ("config.weight_bits", "greater than or equal to 1")),
        (with_config(activation_bits=9), ("config.activation_bits", "less than or equal to 8")),
        (with_config(epochs=1, steps=10), ("epochs or steps",)),
        (with_config(learning_rate=0.1), ("config.learning_rate",)),
        (with_config(layer_bits={"layer1.*": 9}), ("config.layer_bits", "1..8")),
        (with_config(method="lsq", ewgs_delta=0.1), ("ewgs_delta", "'ewgs' only")),
        (with_config(devices=0), ("config.devices", "greater than or equal to 1")),
        (with_config(devices=32, batch_size=16), ("devices (32) cannot exceed batch_size",)),
        (
            with_config(export={"target": "cpu", "tensorrt_targets": ["x86-sm90"]}),
            ("config.export", "need target 'tensorrt'"),
        ),
        ("{not json", ("not valid JSON",)),
        ("[1, 2]", ("JSON object",)),
    ],
    ids=[
        "unknown-method",
        "bits-0",
        "bits-9",
        "epochs-and-steps",
        "unknown-key",
        "layer-bits-9",
        "ewgs-delta-for-lsq",
        "devices-0",
        "devices-over-batch",
        "engines-for-the-cpu-target",
        "not-json",
        "list",
    ],
)
def test_invalid_config(
    client: httpx.Client,
    settings: Settings,
    onnx_model: Path,
    image_archive: Path,
    config: Any,
    mentions: tuple[str, ...],
) -> None:
    response = post_job(client, model=onnx_model, data=image_archive, config=config)
    assert_rejected(response, settings, 422, "invalid_config", *mentions)


@pytest.mark.parametrize("missing", ["model", "data", "config"])
def test_missing_field(
    client: httpx.Client, settings: Settings, onnx_model: Path, image_archive: Path, missing: str
) -> None:
    fields: dict[str, Any] = {"model": onnx_model, "data": image_archive, "config": VALID_CONFIG}
    fields[missing] = None
    response = post_job(client, **fields)
    assert_rejected(response, settings, 422, "missing_field", repr(missing))


def test_model_not_onnx(client: httpx.Client, settings: Settings, image_archive: Path) -> None:
    response = post_job(client, model=b"this is not a protobuf at all", data=image_archive)
    assert_rejected(response, settings, 422, "invalid_model", "ONNX")


def test_model_input_contradicts_input_size(
    client: httpx.Client, settings: Settings, onnx_model: Path, image_archive: Path
) -> None:
    config = with_config(preprocessing=VALID_CONFIG["preprocessing"] | {"input_size": [32, 32]})
    response = post_job(client, model=onnx_model, data=image_archive, config=config)
    assert_rejected(response, settings, 422, "input_shape_mismatch", "16", "[32, 32]")


def test_archive_without_images(
    client: httpx.Client, settings: Settings, onnx_model: Path, tmp_path: Path
) -> None:
    archive = zip_archive(tmp_path / "notes.zip", {"readme.txt": b"no pictures here"})
    response = post_job(client, model=onnx_model, data=archive)
    assert_rejected(response, settings, 422, "no_images", ".png")


def test_archive_with_path_traversal(
    client: httpx.Client, settings: Settings, onnx_model: Path, tmp_path: Path
) -> None:
    entries = {f"cats/{i}.png": png_bytes(i) for i in range(4)} | {"../evil.png": png_bytes(99)}
    archive = zip_archive(tmp_path / "evil.zip", entries)
    response = post_job(client, model=onnx_model, data=archive)
    assert_rejected(response, settings, 422, "unsafe_archive_entry", "../evil.png")


def test_eval_data_without_labels(
    client: httpx.Client, settings: Settings, onnx_model: Path, image_archive: Path, tmp_path: Path
) -> None:
    flat = zip_archive(tmp_path / "flat.zip", {f"{i}.png": png_bytes(i) for i in range(4)})
    response = post_job(client, model=onnx_model, data=image_archive, eval_data=flat)
    assert_rejected(response, settings, 422, "eval_data_unlabeled", "class folders")


def test_class_names_that_leave_out_a_class_folder(
    client: httpx.Client, settings: Settings, onnx_model: Path, image_archive: Path
) -> None:
    """The archive's folders are cats/ and dogs/: refused on upload, not when the job runs."""
    config = with_config(class_names=["cats", "birds"])
    response = post_job(client, model=onnx_model, data=image_archive, config=config)
    assert_rejected(response, settings, 422, "unknown_class_folder", "'dogs'")


def test_unknown_field(client: httpx.Client, settings: Settings, onnx_model: Path) -> None:
    response = client.post(
        "/v1/jobs",
        files={"model": ("m.onnx", onnx_model.read_bytes()), "weights": ("w.bin", b"123")},
        data={"config": "{}"},
    )
    assert_rejected(response, settings, 422, "unknown_field", "'weights'")


def test_not_multipart(client: httpx.Client, settings: Settings) -> None:
    response = client.post("/v1/jobs", content=b"{}", headers={"Content-Type": "text/plain"})
    assert_rejected(
        response, settings, 415, "unsupported_media_type", "multipart/form-data", "application/json"
    )


def test_file_over_its_cap(
    make_settings: SettingsFactory, onnx_model: Path, image_archive: Path
) -> None:
    settings = make_settings(max_model_bytes=1024)
    response = post_job(make_client(settings), model=onnx_model, data=image_archive)
    assert_rejected(response, settings, 413, "upload_too_large", "'model'", "1.0 KiB")


def test_body_over_the_caps_refused_before_reading(
    make_settings: SettingsFactory, onnx_model: Path
) -> None:
    # The body is larger than all caps together: answered from Content-Length alone.
    settings = make_settings(max_model_bytes=1024, max_data_bytes=1024)
    response = post_job(make_client(settings), model=onnx_model, data=bytes(200_000))
    assert_rejected(response, settings, 413, "upload_too_large", "request body")


def test_cap_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, onnx_model: Path, image_archive: Path
) -> None:
    """The caps are settings: MAX_DATA_BYTES in the environment applies to ``data``."""
    monkeypatch.setenv("MAX_DATA_BYTES", "2048")
    monkeypatch.setenv("SQAKD_DATA_DIR", str(tmp_path / "env-data"))
    settings = Settings()
    assert settings.max_data_bytes == 2048
    migrate(settings)
    # Room for the body as a whole (large model cap), so the streaming cap on 'data' decides.
    response = post_job(make_client(settings), model=onnx_model, data=image_archive)
    assert_rejected(response, settings, 413, "upload_too_large", "'data'")


def test_truncated_body(client: httpx.Client, settings: Settings, onnx_model: Path) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
    ).encode() + onnx_model.read_bytes()[:1000]
    response = client.post(
        "/v1/jobs",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert 400 <= response.status_code < 500, response.text
    assert_rejected(response, settings, response.status_code, response.json()["error"]["code"])
