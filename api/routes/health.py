"""Liveness, readiness and Prometheus metrics: unauthenticated, for orchestrators and scrapers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep, StorageDep
from api.schemas import Health, Readiness
from core import jobs
from core.db import session_factory
from core.settings import Settings
from worker.app import ping_broker

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process answers. Says nothing about the database or the broker: see /readyz."""
    return Health(status="ok")


def _check(name: str, probe: Callable[[], object]) -> str:
    try:
        probe()
    except Exception as exc:
        log.warning("readiness check %s failed: %s", name, exc)
        return f"failed: {type(exc).__name__}"
    return "ok"


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(session: SessionDep, settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    """200 when the database (migrated), the broker and the data directory all work; else 503."""

    def storage_writable() -> None:
        if not storage.is_writable():
            raise PermissionError(settings.storage_url or str(settings.data_dir))

    checks = {
        # Reading the jobs table proves the connection and that migrations ran.
        "database": _check("database", lambda: session.execute(text("SELECT 1 FROM jobs LIMIT 1"))),
        "broker": _check("broker", lambda: ping_broker(settings)),
        "storage": _check("storage", storage_writable),
    }
    ready = all(result == "ok" for result in checks.values())
    body = Readiness(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(
        body.model_dump(),
        status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
    )


class JobsCollector(Collector):
    """Reads job counts from the database at scrape time: right across API replicas."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("sqakd_jobs", "Jobs by status.", labels=["status"])
        with session_factory(self.settings)() as session:
            for job_status, count in jobs.count_by_status(session).items():
                family.add_metric([job_status], count)
        yield family


@router.get("/metrics", response_class=Response)
def metrics(settings: SettingsDep) -> Response:
    """Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(settings))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
