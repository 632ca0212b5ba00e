"""Shared request dependencies, as ``Annotated`` aliases routes declare in their signatures."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.db import session_factory
from core.settings import LOCAL_TENANT, Settings, get_settings
from core.storage import Storage
from worker.app import enqueue_train

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_factory(settings)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_storage(settings: SettingsDep) -> Storage:
    return Storage(settings.data_dir)


StorageDep = Annotated[Storage, Depends(get_storage)]

_bearer = HTTPBearer(auto_error=False, description="An API key from the API_KEYS setting.")


def get_tenant(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's tenant: from its API key, or ``local`` in the keyless embedded mode."""
    if not settings.auth_required:
        return LOCAL_TENANT
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Compare against every key in constant time, so timing reveals nothing about valid keys.
    tenant = None
    for key, key_tenant in settings.api_keys.items():
        if hmac.compare_digest(key.encode(), credentials.credentials.encode()):
            tenant = key_tenant
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]

Enqueue = Callable[[str], None]


def get_enqueue(settings: SettingsDep) -> Enqueue:
    """Sends a job id to the training queue (a dependency, so one seam decides the broker)."""
    return lambda job_id: enqueue_train(settings, job_id)


EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]
