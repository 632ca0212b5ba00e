"""Sweeps (``/v1/sweeps``): one job per configuration of a grid, and their Pareto table."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from . import render
from .downloads import download_listed
from .errors import WaitTimeout
from .events import FINAL_JOB_STATUSES
from .jobs import Job
from .progress import count_bar
from .resources import ApiObject, Dataset, InputArgument, Model, field, input_ids

if TYPE_CHECKING:
    from .client import Client


class Sweep(ApiObject):
    """A sweep: ``rows`` has one entry per job (``label``, ``config``, ``status``,
    ``agreement``, ``student_top1``, ``packed_bytes``, ``int8_latency_ms``, ``pareto``)."""

    status: str = field("status", "running, completed or canceled.")
    counts: Dict[str, int] = field("counts", "Its jobs by status.")
    rows: List[Dict[str, Any]] = field("rows")
    pareto_metric: str = field("pareto_metric", "student_top1 or agreement.")
    recommended_job_id: Optional[str] = field("recommended_job_id")
    artifacts: List[Dict[str, Any]] = field("artifacts", "report.html and pareto.svg.")
    completed_at: Optional[str] = field("completed_at", "When every job was final.")
    _collection = "/v1/sweeps"

    @property
    def is_final(self) -> bool:
        """Every job final and the report stored (completed, or canceled and stopped)."""
        return self.completed_at is not None

    def cancel(self) -> Sweep:
        """Cancel its jobs: queued ones at once, running ones at their next step."""
        return self._cancel()

    def wait(
        self, progress: bool = False, timeout: Optional[float] = None, poll_interval: float = 1.0
    ) -> Sweep:
        """Read the sweep every ``poll_interval`` seconds until ``is_final``. ``progress``: a
        bar of final jobs on stderr. ``timeout`` seconds passed: ``WaitTimeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with count_bar(progress, "sweep", len(self.rows or [])) as bar:
            while not self.refresh().is_final:
                bar.update(completed=_final_jobs(self.counts), total=len(self.rows))
                if deadline is not None and time.monotonic() + poll_interval > deadline:
                    raise WaitTimeout(f"sweep {self.id} was not final before the timeout")
                time.sleep(poll_interval)
            bar.update(completed=_final_jobs(self.counts), total=len(self.rows))
        return self

    def jobs(self) -> List[Job]:
        return [self._client.jobs.get(row["job_id"]) for row in self.rows]

    def table(self) -> str:
        """A plain-text table, one row per job: configuration, status, agreement, top-1,
        packed size, int8 latency and job id; ``*`` marks the Pareto front, and the
        recommended row says so (the table ``sqakd sweep`` prints)."""
        return render.as_text(render.sweep_table(self.data))

    def download(
        self,
        directory: Union[str, os.PathLike],
        names: Optional[Sequence[str]] = None,
        progress: bool = False,
    ) -> List[Path]:
        """``report.html`` and ``pareto.svg`` (or those ``names``), SHA-256 checked."""
        transport = self._client._transport
        listing = self.refresh().artifacts
        return download_listed(
            transport, f"{self._path}/artifacts", listing, directory, names, progress
        )


def _final_jobs(counts: Mapping[str, int]) -> int:
    return sum(counts.get(status, 0) for status in FINAL_JOB_STATUSES)


class Sweeps:
    """``client.sweeps``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        model: Union[InputArgument, Model],
        data: Union[InputArgument, Dataset],
        eval_data: Union[InputArgument, Dataset] = None,
        grid: Optional[Mapping[str, Sequence[Any]]] = None,
        configs: Optional[Sequence[Mapping[str, Any]]] = None,
        tie: Optional[Sequence[str]] = None,
        base_config: Optional[Mapping[str, Any]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        progress: bool = False,
    ) -> Sweep:
        """One job per configuration: each point of ``grid`` (``tie``: keys that advance
        together, by default weight_bits and activation_bits) or each of ``configs``, over
        ``base_config``. ``model``/``data``/``eval_data`` as for ``jobs.create``."""
        client = self._client
        body: Dict[str, Any] = {
            **input_ids(client, model, data, eval_data, progress),
            "base_config": dict(base_config or {}),
        }
        optional = {"grid": grid, "configs": configs, "tie": tie, "metadata": metadata}
        body.update({key: value for key, value in optional.items() if value is not None})
        answer = client._transport.request("POST", "/v1/sweeps", json=body, create=True)
        return Sweep(client, answer.json())

    def get(self, sweep_id: str) -> Sweep:
        return Sweep(
            self._client, self._client._transport.request("GET", f"/v1/sweeps/{sweep_id}").json()
        )

    def list(self, page_size: int = 50) -> Iterator[Sweep]:
        for item in self._client._transport.pages("/v1/sweeps", {"limit": page_size}):
            yield Sweep(self._client, item)
