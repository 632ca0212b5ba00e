"""Jobs (``/v1/jobs``): create from stored resources or local files, follow, wait, download."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

from . import events as job_events
from .downloads import download_listed
from .events import FINAL_JOB_STATUSES, Event
from .progress import JobBar
from .resources import ApiObject, Dataset, InputArgument, Model, field, input_ids

if TYPE_CHECKING:
    from .client import Client


class Job(ApiObject):
    """A quantization job. ``status``: queued, running, succeeded, failed or canceled; while
    running, ``stage`` and ``progress`` say where it is."""

    _collection = "/v1/jobs"
    status: str = field("status")
    stage: Optional[str] = field("stage")
    progress: Optional[Dict[str, Any]] = field(
        "progress", "step, total_steps, epoch, epochs, loss, eta_seconds, images_per_second."
    )
    metrics: Optional[Dict[str, Any]] = field("metrics", "A succeeded job's metrics.json.")
    error: Optional[Dict[str, Any]] = field("error", "A failed job's {code, message}.")
    engines: List[Dict[str, Any]] = field("engines", "TensorRT engine builds.")
    config: Dict[str, Any] = field("config")
    metadata: Dict[str, str] = field("metadata")
    sweep_id: Optional[str] = field("sweep_id")
    started_at: Optional[str] = field("started_at")
    finished_at: Optional[str] = field("finished_at")
    stage_seconds: Dict[str, float] = field("stage_seconds", "Seconds in each finished stage.")
    latest_metrics: Optional[Dict[str, Any]] = field(
        "latest_metrics", "The newest training-curve point."
    )

    @property
    def artifacts(self) -> List[Dict[str, Any]]:
        """The job's files: ``name``, ``size``, ``sha256``, ``created_at`` each."""
        return list(self.data.get("artifacts") or [])

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_JOB_STATUSES

    def cancel(self) -> Job:
        """Queued: canceled at once. Running: stops at its next step (``wait()`` for it)."""
        return self._cancel()

    def events(self, follow: bool = False, after: int = 0) -> Iterator[Event]:
        """The events after ``after``, oldest first. ``follow=False``: what the log holds now;
        ``follow=True``: live (Server-Sent Events, resumed after a cut) until the job is
        final."""
        transport = self._client._transport
        if follow:
            return job_events.follow(transport, self.id, after)
        return job_events.read_pages(transport, self.id, after)

    def wait(
        self,
        progress: bool = False,
        timeout: Optional[float] = None,
        on_event: Optional[Callable[[Event], None]] = None,
    ) -> Job:
        """Follow the job's events until it is final; then read it again and return it,
        whatever its final status. ``progress``: a live bar on stderr. ``on_event``: called
        with each event, from the first. ``timeout`` seconds passed: ``WaitTimeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with JobBar(progress) as bar:
            for event in job_events.follow(self._client._transport, self.id, 0, deadline):
                bar.show(event)
                if on_event is not None:
                    on_event(event)
        return self.refresh()

    def download(
        self,
        directory: Union[str, os.PathLike],
        names: Optional[Sequence[str]] = None,
        progress: bool = False,
    ) -> List[Path]:
        """Every artifact (or those ``names``) into ``directory``, each SHA-256 checked; a cut
        download resumes with ``Range``, a file already there and right is not fetched."""
        transport = self._client._transport
        listing = transport.request("GET", f"{self._path}/artifacts").json()["items"]
        return download_listed(
            transport, f"{self._path}/artifacts", listing, directory, names, progress
        )


class Jobs:
    """``client.jobs``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        model: Union[InputArgument, Model],
        data: Union[InputArgument, Dataset],
        eval_data: Union[InputArgument, Dataset] = None,
        config: Optional[Mapping[str, Any]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        progress: bool = False,
        **config_fields: Any,
    ) -> Job:
        """Start a job. ``model``, ``data``, ``eval_data``: ids, stored objects or local
        files (uploaded first, ``progress`` showing a bar each). The config is ``config``
        with ``config_fields`` over it, e.g. ``create(m, d, weight_bits=4, epochs=3)``.
        Retried safely: every try carries the same Idempotency-Key."""
        client = self._client
        body = {
            **input_ids(client, model, data, eval_data, progress),
            "config": {**(config or {}), **config_fields},
            "metadata": dict(metadata) if metadata else None,
        }
        answer = client._transport.request("POST", "/v1/jobs", json=body, create=True)
        return Job(client, answer.json())

    def get(self, job_id: str) -> Job:
        return Job(
            self._client, self._client._transport.request("GET", f"/v1/jobs/{job_id}").json()
        )

    def list(
        self,
        status: Union[str, Sequence[str], None] = None,
        metadata: Optional[Mapping[str, str]] = None,
        page_size: int = 50,
    ) -> Iterator[Job]:
        """Every job (newest first, all pages), or those in ``status`` (one or several) whose
        metadata holds every pair of ``metadata``."""
        params: Dict[str, Any] = {"limit": page_size}
        if status:
            params["status"] = status if isinstance(status, str) else ",".join(status)
        for key, value in (metadata or {}).items():
            params[f"metadata[{key}]"] = value
        for item in self._client._transport.pages("/v1/jobs", params):
            yield Job(self._client, item)
