"""Shared request dependencies, as ``Annotated`` aliases routes declare in their signatures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import TENANT_STATE
from core.db import session_factory
from core.settings import Settings, get_settings
from core.storage import Storage, open_storage
from worker.app import enqueue_train

# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` one in the thread
# pool, a hop that costs more than the work (GET /v1/jobs/{id} is polled hundreds of times a
# second).


async def current_settings() -> Settings:
    """The process's settings; ``api.main.create_app`` overrides this with the ones it is given."""
    return get_settings()


SettingsDep = Annotated[Settings, Depends(current_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_factory(settings)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_storage(settings: SettingsDep) -> Storage:
    return open_storage(settings)


StorageDep = Annotated[Storage, Depends(get_storage)]

_bearer = HTTPBearer(auto_error=False, description="An API key from the API_KEYS setting.")


async def get_tenant(
    request: Request,
    # Only for OpenAPI's security scheme: api.auth.ApiKeyAuth checked the key from the headers.
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's tenant, which ``api.auth.ApiKeyAuth`` resolved from its API key (``local``
    in the keyless embedded mode) before anything read the request's body."""
    tenant = getattr(request.state, TENANT_STATE, None)
    if tenant is None:  # fail closed: an app assembled without the middleware serves nobody
        raise RuntimeError("api.auth.ApiKeyAuth is not installed: no tenant for this request")
    return str(tenant)


TenantDep = Annotated[str, Depends(get_tenant)]

Enqueue = Callable[[str], None]


async def get_enqueue(settings: SettingsDep) -> Enqueue:
    """Sends a job id to the training queue (a dependency, so one seam decides the broker)."""
    return lambda job_id: enqueue_train(settings, job_id)


EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]
