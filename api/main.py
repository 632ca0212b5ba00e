"""The FastAPI app: routers, JSON errors for every failure, and the job-recovery sweep."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import OperationalError as DBAPIOperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import dashboard
from api.auth import ApiKeyAuth
from api.deps import current_settings
from api.event_stream import EventWakeups
from api.local_guard import LocalGuard
from api.routes import engines, events, health, jobs, resources, sweeps, webhooks
from api.validation import ValidationGate
from core import jobs as job_service
from core import sweeps as sweep_service
from core import webhooks as webhook_service
from core.db import session_scope
from core.errors import InputError
from core.housekeeping import run_housekeeping
from core.intake import PRELOAD
from core.isolation import shut_down as shut_down_validation
from core.isolation import warm_up
from core.models import utcnow
from core.settings import Settings, get_settings
from worker.app import (
    dispatch_webhooks_with,
    enqueue_train,
    enqueue_webhook_deliveries,
    job_ids_in_broker,
)

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "upload_too_large",
    416: "range_not_satisfiable",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


def error_response(
    status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status_code, headers=headers
    )


async def _input_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InputError)
    return error_response(exc.status_code, exc.code, exc.message, exc.headers)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors()[:5]:
        # ("query", "limit") -> "query.limit"; the body's own prefix adds nothing.
        where = ".".join(str(part) for part in error["loc"] if part != "body") or "request"
        problems.append(f"{where}: {error['msg']}")
    return error_response(
        status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_request", "; ".join(problems)
    )


DATABASE_RETRY_AFTER_S = 5


async def _database_busy(request: Request, exc: Exception) -> JSONResponse:
    """No database connection in time: the pool is exhausted (overload) or the database is
    away. The server's state, not a bug and not the caller's fault: 503, try again. Other
    operational errors (a statement the database refused: a missing table) stay 500s."""
    unreachable = isinstance(exc, PoolTimeout) or (
        isinstance(exc, DBAPIOperationalError)
        and (exc.connection_invalidated or exc.statement is None)  # lost, or never connected
    )
    if not unreachable:
        return await _unexpected_error(request, exc)
    log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
    return error_response(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "database_unavailable",
        "the database is busy or unreachable; try again shortly",
        {"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(
        status.HTTP_500_INTERNAL_SERVER_ERROR, "internal_error", "internal server error"
    )


def sweep(settings: Settings, *, include_queued: bool) -> None:
    """Re-enqueue jobs whose worker died (lease expired), and queued jobs whose message is gone.

    A queued job's message can be lost: the embedded broker keeps nothing across a restart
    (hence every queued job at startup), Redis persistence has a window, and a task whose
    claim hit a database error is acknowledged all the same. Jobs sent more than a lease ago
    that the broker no longer holds are sent again. A duplicate is harmless (its claim fails).
    """
    with session_scope(settings) as session:
        ids = set(job_service.requeue_expired(session))
        if include_queued:
            ids.update(job_service.queued_job_ids(session))
        else:
            cutoff = utcnow() - dt.timedelta(seconds=settings.lease_seconds)
            if stale := job_service.queued_job_ids(session, sent_before=cutoff):
                in_broker = job_ids_in_broker(settings)
                if in_broker is not None:
                    ids.update(set(stale) - in_broker)
    for job_id in sorted(ids):
        enqueue_train(settings, job_id)
    if ids:
        with session_scope(settings) as session:
            job_service.mark_enqueued(session, ids)
        log.info("sweep: enqueued %d job(s) again", len(ids))
    # Sweeps whose last job ended outside a worker (lost worker, deletion, a crash before the
    # worker's hook) get their report here.
    with session_scope(settings) as session:
        sweep_service.complete_finished(session, settings)


def redispatch_webhooks(settings: Settings) -> None:
    """Send again the webhook messages whose delivery task the broker lost (long overdue)."""
    with session_scope(settings) as session:
        message_ids = webhook_service.overdue_message_ids(session)
    if message_ids:
        enqueue_webhook_deliveries(settings, message_ids)
        log.info("sweep: sent %d webhook message(s) again", len(message_ids))


async def _every(interval_s: float, name: str, step: Callable[[bool], None]) -> None:
    """Run ``step(first)`` in a thread now and every ``interval_s``; log failures, go on."""
    first = True
    while True:
        try:
            await run_in_threadpool(step, first)
            first = False
        except Exception:
            log.exception("%s failed; retrying", name)
        await asyncio.sleep(interval_s)


def _housekeeping(settings: Settings) -> None:
    with session_scope(settings) as session:
        run_housekeeping(session, settings)


def create_app(settings: Settings | None = None, *, sweeper: bool = True) -> FastAPI:
    """The app; ``settings`` overrides the environment's (tests), ``sweeper`` the recovery loop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = settings or get_settings()
        tasks = []
        if sweeper:
            tasks = [
                asyncio.create_task(
                    _every(
                        current.lease_seconds / 2,
                        "recovery sweep",
                        lambda first: sweep(current, include_queued=first),
                    )
                ),
                asyncio.create_task(
                    _every(
                        webhook_service.REDISPATCH_AFTER.total_seconds(),
                        "webhook redelivery",
                        lambda _first: redispatch_webhooks(current),
                    )
                ),
                asyncio.create_task(
                    _every(
                        current.maintenance_interval_seconds,
                        "housekeeping",
                        lambda _first: _housekeeping(current),
                    )
                ),
            ]
        # Start the validation forkserver now: it imports torch, seconds the first upload
        # would otherwise wait.
        warming = asyncio.create_task(run_in_threadpool(warm_up, PRELOAD))
        app.state.event_wakeups.start()
        yield
        for task in [*tasks, warming]:
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
        await app.state.event_wakeups.stop()
        await run_in_threadpool(shut_down_validation)

    app = FastAPI(
        title="SQAKD service",
        version="1",
        summary="Quantize a full-precision vision model with SQAKD, as a service.",
        lifespan=lifespan,
        # Operation ids are the route functions' names ("create_job"; unique, a test checks),
        # so generated clients keep their method names. A router's tags are not on its routes
        # yet when this runs, which is why the ids never carried them.
        generate_unique_id_function=lambda route: route.name,
    )
    if settings is not None:

        async def given_settings() -> Settings:
            assert settings is not None
            return settings

        app.dependency_overrides[current_settings] = given_settings
    app.state.validation_gate = ValidationGate(settings or get_settings())
    # One Redis subscription per process wakes every event stream (api/routes/events.py).
    app.state.event_wakeups = EventWakeups((settings or get_settings()).celery_broker_url)
    # Webhook messages committed in this process leave through this app's broker.
    dispatch_webhooks_with(settings or get_settings())
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(resources.router)
    app.include_router(sweeps.router)
    app.include_router(engines.router)
    app.include_router(webhooks.router)
    app.include_router(dashboard.router)
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(PoolTimeout, _database_busy)
    app.add_exception_handler(DBAPIOperationalError, _database_busy)
    app.add_exception_handler(Exception, _unexpected_error)
    # Keyless mode: refuse requests from web pages and re-bound DNS names (api/local_guard.py).
    app.add_middleware(LocalGuard, settings=settings)
    # API keys from the headers, before anything reads a body; added last, so it runs first.
    # Public: the probes (api/routes/health.py), the API's docs and the dashboard (its calls to
    # /v1 send the key).
    probes = {route.path for route in health.router.routes if isinstance(route, APIRoute)}
    docs = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url}
    app.add_middleware(
        ApiKeyAuth,
        settings=settings,
        public_paths={p for p in probes | docs | {dashboard.PAGE_PATH} if p},
        public_prefixes=[dashboard.STATIC_PREFIX + "/"],
    )
    return app


app = create_app()
