"""``Client``: the service's address and key, and its resources as attributes."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Optional, Type

from ._http import Transport
from .jobs import Jobs
from .resources import Dataset, Datasets, Model, StoredFiles
from .sweeps import Sweeps
from .webhooks import Webhooks

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """The SQAKD service at ``url`` (else ``$SQAKD_URL``, else the local ``make serve``) with
    ``api_key`` (else ``$SQAKD_API_KEY``, else none: the keyless local mode).

    ``timeout``: seconds for each connect, read or write; ``retries``: how many times an
    idempotent request or a create is tried again after a connection error, 429 or 503.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = 60.0,
        retries: int = 4,
    ) -> None:
        url = url or os.environ.get("SQAKD_URL") or DEFAULT_URL
        api_key = api_key if api_key is not None else os.environ.get("SQAKD_API_KEY")
        self._transport = Transport(url, api_key, timeout, retries)
        self.models: StoredFiles[Model] = StoredFiles(self, Model)
        self.datasets = Datasets(self, Dataset)
        self.jobs = Jobs(self)
        self.sweeps = Sweeps(self)
        self.webhooks = Webhooks(self)

    @property
    def url(self) -> str:
        return self._transport.url

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.url}>"
