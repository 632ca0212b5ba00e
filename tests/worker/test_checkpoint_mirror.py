"""mirrored_checkpoint: a training job's checkpoint reaches the bucket while it trains."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from core.pipeline import CHECKPOINT
from core.settings import Settings
from core.storage import open_storage
from worker.tasks import mirrored_checkpoint

JOB = "5f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f"


def mirrored(s3_client: Any, bucket: str) -> bytes:
    key = f"p/jobs/{JOB}/work/{CHECKPOINT}"
    return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def wait_for(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not mirrored in time"
        time.sleep(0.05)


def test_each_new_checkpoint_is_mirrored(
    tmp_path: Path, bucket: str, moto_endpoint: str, s3_client: Any
) -> None:
    settings = Settings(
        data_dir=tmp_path, storage_url=f"s3://{bucket}/p", storage_endpoint_url=moto_endpoint
    )
    storage = open_storage(settings)
    checkpoint = storage.work_dir(JOB) / CHECKPOINT
    checkpoint.parent.mkdir(parents=True)

    with mirrored_checkpoint(storage, JOB, interval=0.05):
        time.sleep(0.2)  # no checkpoint yet: nothing to do, no error
        for step in (1, 2):
            # As the trainer saves: a new file swapped in by name.
            partial = checkpoint.with_name("partial")
            partial.write_bytes(f"step {step}".encode())
            os.replace(partial, checkpoint)
            wait_for(lambda step=step: _holds(s3_client, bucket, f"step {step}".encode()))

    assert [p.name for p in checkpoint.parent.iterdir()] == [CHECKPOINT]  # no snapshot left


def _holds(s3_client: Any, bucket: str, content: bytes) -> bool:
    try:
        return mirrored(s3_client, bucket) == content
    except s3_client.exceptions.NoSuchKey:
        return False
