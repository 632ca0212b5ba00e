"""Hostile uploads against the real service (``python -m scripts.serve``: uvicorn, a worker and
its broker), one of each class of the hardened-intake issue that reaches the API as an upload.

Every input is built here and is small (bytes to a few MB). Each must be answered with a 4xx
and a named code within a few seconds, leave no file behind, and cost the API process under
256 MiB of peak memory: the parsers run in the validation child (core.isolation), whose own
limits hold the rest. The function-level tests of each class are beside its code's tests.
"""

from __future__ import annotations

import base64
import json
import socket
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import image_zip
from tests.hostile_inputs import (
    END,
    MiB,
    compressed,
    end_records,
    image_model,
    long_name_tar,
    pax_header,
    pax_record,
    png_flood,
    tar_member,
)
from tests.utils import children, free_port, start_launcher, wait_ready

pytestmark = pytest.mark.e2e

ANSWER_SECONDS = 5.0
API_PEAK_GROWTH = 256 * MiB
CONFIG_16 = {"preprocessing": {"input_size": [16, 16]}}


@dataclass
class Service:
    url: str
    data_dir: Path
    api_pid: int

    def peak_rss(self) -> int:
        """The API process's peak resident memory so far (VmHWM), bytes."""
        for line in Path(f"/proc/{self.api_pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def leftovers(self) -> list[Path]:
        folders = (self.data_dir / "uploads", self.data_dir / "jobs")
        return [item for folder in folders if folder.is_dir() for item in folder.iterdir()]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("hostile")
    port = free_port()
    log = (data_dir / "serve.log").open("wb")
    launcher = start_launcher(data_dir, port, {}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, launcher, 90, lambda: (data_dir / "serve.log").read_text())
        api = next(pid for pid, cmd in children(launcher.pid).items() if "uvicorn" in cmd)
        # The first upload waits for the validation forkserver to import torch (seconds, once
        # per API process); a bad one first, so each test times its own input only.
        warm = httpx.post(
            f"{url}/v1/jobs",
            files={"model": ("m.onnx", b"not onnx"), "data": ("d.zip", b"")},
            data={"config": "{}"},
            timeout=120,
        )
        assert warm.status_code == 422, warm.text
        yield Service(url, data_dir, api)
    finally:
        launcher.terminate()
        launcher.wait(60)


@pytest.fixture(scope="module")
def good_data(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return image_zip(tmp_path_factory.mktemp("good") / "images.zip", per_class=2).read_bytes()


def post(
    service: Service,
    *,
    model: bytes,
    data: bytes,
    config: dict[str, Any] | str = CONFIG_16,
    data_name: str = "images.zip",
) -> httpx.Response:
    text = config if isinstance(config, str) else json.dumps(config)
    return httpx.post(
        f"{service.url}/v1/jobs",
        files={"model": ("m.onnx", model), "data": (data_name, data)},
        data={"config": text},
        timeout=60,
    )


def assert_refused(service: Service, send: Any, status: int, code: str) -> httpx.Response:
    """Send, then check the answer, its time, the API's peak memory and the data directory."""
    peak_before = service.peak_rss()
    started = time.monotonic()
    response: httpx.Response = send()
    seconds = time.monotonic() - started
    print(f"{code}: {response.status_code} in {seconds:.2f} s")  # the figures, with -s
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert seconds < ANSWER_SECONDS
    assert service.peak_rss() - peak_before < API_PEAK_GROWTH
    assert service.leftovers() == []
    return response


def test_tar_long_name_of_128_mib_in_a_20_kb_upload(service: Service) -> None:
    data = compressed(long_name_tar(tarfile.GNUTYPE_LONGNAME, 128 * MiB), "xz")
    assert len(data) < 64 * 1024

    assert_refused(
        service,
        lambda: post(service, model=image_model(16, 16), data=data, data_name="d.tar.xz"),
        422,
        "archive_path_too_long",
    )


def test_pax_header_of_a_million_digits(service: Service) -> None:
    record = b"%d path=" % (10**6) + b"9" * 1_000_000 + b"\n"
    data = compressed([pax_header(record), tar_member(b"a/b.png"), END], "gz")

    assert_refused(
        service,
        lambda: post(service, model=image_model(16, 16), data=data, data_name="d.tar.gz"),
        413,
        "archive_header_too_large",
    )


def test_path_of_sixteen_thousand_components(service: Service) -> None:
    name = b"a/" * 16_000 + b"x.png"
    chunks = [pax_header(pax_record(b"path", name)), tar_member(b"placeholder"), END]
    data = compressed(chunks, "gz")
    assert len(data) < 1000

    assert_refused(
        service,
        lambda: post(service, model=image_model(16, 16), data=data, data_name="d.tar.gz"),
        422,
        "archive_path_too_long",
    )


def test_zip_claiming_ten_million_entries(service: Service) -> None:
    data = end_records(10_000_000, 46 * 10_000_000, 0)

    assert_refused(
        service, lambda: post(service, model=image_model(16, 16), data=data), 413,
        "archive_too_large",
    )  # fmt: skip


def test_static_model_input_of_40000_squared(service: Service, good_data: bytes) -> None:
    assert_refused(
        service,
        lambda: post(service, model=image_model(40_000, 40_000), data=good_data, config={}),
        422,
        "input_size_out_of_range",
    )


def test_eighty_thousand_tiny_pngs_at_1024_squared(service: Service) -> None:
    # 252 GB of dataset store, over the 200 GB per dataset (MAX_DATASET_PIXELS)
    config = {"preprocessing": {"input_size": [1024, 1024]}}

    assert_refused(
        service,
        lambda: post(service, model=image_model("h", "w"), data=png_flood(80_000), config=config),
        413,
        "pixel_budget_exceeded",
    )


def test_multipart_boundary_of_300_characters(service: Service) -> None:
    boundary = "b" * 300
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="config"\r\n\r\n{{}}\r\n'
        f"--{boundary}--\r\n"
    ).encode()

    def send() -> httpx.Response:
        return httpx.post(
            f"{service.url}/v1/jobs",
            content=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )

    assert_refused(service, send, 400, "invalid_multipart")


def test_config_nested_thirty_thousand_deep(service: Service, good_data: bytes) -> None:
    config = "[" * 30_000 + "]" * 30_000  # under the config field's 64 KiB

    assert_refused(
        service,
        lambda: post(service, model=image_model(16, 16), data=good_data, config=config),
        422,
        "invalid_config",
    )


def test_cursor_with_a_naive_datetime(service: Service) -> None:
    raw = json.dumps(["2026-01-01T00:00:00", "some-id"]).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")

    assert_refused(
        service,
        lambda: httpx.get(f"{service.url}/v1/jobs", params={"cursor": cursor}),
        422,
        "invalid_cursor",
    )


def test_the_service_still_accepts_a_good_upload(service: Service, good_data: bytes) -> None:
    response = post(service, model=image_model(16, 16), data=good_data)

    assert response.status_code == 202, response.text
    assert httpx.post(f"{service.url}/v1/jobs/{response.json()['id']}/cancel").status_code == 200


def test_stalled_uploads_leave_the_api_answering(service: Service) -> None:
    """More uploads stalled mid-body than the database pool has connections (5 + 10): each is
    inside its route, past the quota check; none may hold a connection while it waits."""
    address = httpx.URL(service.url)
    boundary = "stalled"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {address.host}:{address.port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {10 * MiB}\r\n\r\n{part}"
    )
    stalled = []
    try:
        for _ in range(24):
            connection = socket.create_connection((address.host, address.port))
            connection.sendall(head.encode() + b"\0" * 4096)
            stalled.append(connection)
        time.sleep(1.0)  # every one of them is now waiting for the rest of its body

        started = time.monotonic()
        response = httpx.get(f"{service.url}/v1/jobs", timeout=30)

        assert response.status_code == 200
        assert time.monotonic() - started < 1.0
    finally:
        for connection in stalled:
            connection.close()
    uploads = service.data_dir / "uploads"
    deadline = time.monotonic() + 10
    while any(uploads.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(uploads.iterdir()) == []  # each cut-off upload removed its folder
