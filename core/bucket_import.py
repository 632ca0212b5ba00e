"""Datasets registered from object storage by URL: ``POST /v1/datasets`` with
``{"url": "s3://bucket/key"}`` (``core.resources.register_dataset_from_url``).

A 200 GB archive that already sits in a bucket need not travel through HTTP. The API reads it
with the service's own credentials, so it reads only where the operator allows
(``STORAGE_IMPORT_BUCKETS``; by default the service's bucket) and never the service's own
objects (other tenants' inputs and artifacts). The object is then treated as an upload:

1. ``locate``: HEAD. The object exists and passes the dataset size cap; its ETag names this
   version of it.
2. ``download``: to the request's staging folder, in ranged GETs that are each ``If-Match`` the
   ETag (never more bytes than the HEAD said), then hashed; validated as an uploaded archive is.
3. ``copy_into``: a server-side copy into the service's key layout (``resources/<id>/``), in
   parts from STORAGE_MULTIPART_BYTES on, ``If-Match`` the ETag again. So the stored bytes are
   the validated ones, and the user may later delete or overwrite the source without breaking
   the dataset or its jobs (a recorded source could not promise either).

An object that changes meanwhile is refused with 409 ``source_changed``: register it again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import S3DownloadFailedError
from s3transfer.subscribers import BaseSubscriber

from core.errors import InputError, TooLargeError
from core.settings import Settings
from core.storage import S3Storage, Storage, StoredFile, hash_file, human_bytes

URL_MAX_CHARS = 1100  # s3:// + a bucket name (63) + a key (1,024 bytes)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SERVICE_FOLDERS = (Storage.JOBS, Storage.RESOURCES, Storage.SWEEPS)


@dataclass(frozen=True)
class ObjectUrl:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class SourceObject:
    """An object as its HEAD found it."""

    url: ObjectUrl
    size: int
    etag: str


def parse_object_url(url: str) -> ObjectUrl:
    """``s3://bucket/key``; 422 ``invalid_url`` for any other scheme or a key that servers
    could read as a path (empty, ``.`` or ``..`` segments)."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() != "s3":
        raise InputError(
            "invalid_url", "only s3://bucket/key URLs can be registered (no http://, file://)"
        )
    bucket, _, key = rest.partition("/")
    segments = key.split("/")
    if (
        not _BUCKET.fullmatch(bucket)
        or not key.isprintable()
        or any(segment in ("", ".", "..") for segment in segments)
    ):
        raise InputError("invalid_url", f"{url!r} does not name an object: s3://bucket/key")
    return ObjectUrl(bucket, key)


def allowed_locations(settings: Settings, tenant: str) -> list[ObjectUrl]:
    """Where ``tenant`` may register from: buckets and folders (``key`` a prefix ending in / or
    empty), with ``{tenant}`` filled in. A tenant name with a / would reach into other
    folders: it gets no ``{tenant}`` entry."""
    locations = []
    for entry in settings.import_buckets:
        bucket, _, prefix = entry.partition("/")
        if "{tenant}" in prefix:
            if "/" in tenant:
                continue
            prefix = prefix.replace("{tenant}", tenant)
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # a folder: "in/acme" must not also allow "in/acme-other/"
        locations.append(ObjectUrl(bucket, prefix))
    return locations


def _service_owned(settings: Settings, source: ObjectUrl) -> bool:
    bucket, prefix = settings.storage_bucket
    root = f"{prefix}/" if prefix else ""
    return source.bucket == bucket and any(
        source.key.startswith(f"{root}{folder}/") for folder in _SERVICE_FOLDERS
    )


def check_allowed(settings: Settings, tenant: str, source: ObjectUrl) -> None:
    """422 ``url_not_allowed`` unless ``source`` lies where ``tenant`` may register from."""
    locations = allowed_locations(settings, tenant)
    if not _service_owned(settings, source) and any(
        source.bucket == place.bucket and source.key.startswith(place.key) for place in locations
    ):
        return
    where = ", ".join(str(place) for place in locations) or "nowhere (STORAGE_IMPORT_BUCKETS)"
    raise InputError(
        "url_not_allowed",
        f"this service does not read {source}; datasets may be registered from {where}, "
        "outside the service's own jobs/, resources/ and sweeps/",
    )


@contextmanager
def _reading(source: SourceObject | ObjectUrl) -> Iterator[None]:
    """S3's answers about the caller's object as the caller's errors."""
    url = source.url if isinstance(source, SourceObject) else source
    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise InputError("object_not_found", f"there is no object {url}") from exc
        if code in ("403", "AccessDenied", "InvalidObjectState"):
            raise InputError(
                "object_unreadable",
                f"the service may not read {url} ({code}): grant its credentials s3:GetObject "
                "on it, or restore it from an archive storage class",
            ) from exc
        if code in ("412", "PreconditionFailed"):
            raise _changed(url) from exc
        raise
    except S3DownloadFailedError as exc:  # s3transfer's word for a GET's PreconditionFailed
        raise _changed(url) from exc
    except BotoCoreError as exc:  # no answer at all: the storage's state, not the caller's
        raise InputError(
            "storage_unavailable", f"object storage did not answer: {exc}", status_code=503
        ) from exc


def _changed(url: ObjectUrl) -> InputError:
    return InputError(
        "source_changed",
        f"{url} changed while it was being registered; register it again",
        status_code=409,
    )


def locate(storage: S3Storage, settings: Settings, tenant: str, url: str) -> SourceObject:
    """Parse, authorise and HEAD ``url``; 413 past the dataset cap (MAX_DATA_BYTES)."""
    source = parse_object_url(url)
    check_allowed(settings, tenant, source)
    with _reading(source):
        head = storage.client.head_object(Bucket=source.bucket, Key=source.key)
    found = SourceObject(source, int(head["ContentLength"]), str(head["ETag"]))
    if found.size > settings.max_data_bytes:
        raise TooLargeError(
            "upload_too_large",
            f"{source} holds {human_bytes(found.size)}, more than the dataset limit of "
            f"{human_bytes(settings.max_data_bytes)}",
        )
    if found.size == 0:
        raise InputError("object_empty", f"{source} is empty")
    return found


class _KnownVersion(BaseSubscriber):
    """Gives s3transfer the size and ETag that ``locate`` saw: it skips its own HEAD, and every
    GET or part copy it makes is If-Match that ETag."""

    def __init__(self, source: SourceObject) -> None:
        self.source = source

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.source.size)
        future.meta.provide_object_etag(self.source.etag)


def download(storage: S3Storage, source: SourceObject, target: Path) -> StoredFile:
    """The object's bytes in ``target``, hashed. In ranged GETs even when small: a single GET
    would not be If-Match, and could bring a larger object that replaced this one."""
    config = TransferConfig(
        multipart_threshold=1, multipart_chunksize=storage.transfer.multipart_chunksize
    )
    with _reading(source), create_transfer_manager(storage.client, config) as manager:
        manager.download(
            source.url.bucket, source.url.key, str(target), subscribers=[_KnownVersion(source)]
        ).result()
    stored = hash_file(target)
    if stored.size != source.size:
        raise _changed(source.url)
    return stored


def copy_into(storage: S3Storage, source: SourceObject, key: str) -> None:
    """Server-side copy of the object (the version ``locate`` saw) to the service's ``key``."""
    with _reading(source), create_transfer_manager(storage.client, storage.transfer) as manager:
        manager.copy(
            {"Bucket": source.url.bucket, "Key": source.url.key},
            storage.bucket,
            storage._key(key),  # the one mapping of our keys to the bucket's
            extra_args={"CopySourceIfMatch": source.etag},  # CopyObject, below the part size
            subscribers=[_KnownVersion(source)],
            source_client=storage.client,
        ).result()
