"""Receive request bodies as they arrive: multipart forms straight to disk, JSON under a cap.

FastAPI's ``UploadFile`` would first spool every file to a temporary file of its own, unbounded,
and only then let us look at it; a declared JSON body is read whole into memory. So routes
declare no body and call these instead. A multipart body (``POST /v1/jobs``, an engine build's
result) is parsed as it arrives and each file part goes through ``core.storage.CappedWriter``
into a staging folder: hashed on the way, refused (413) the moment it passes its cap, never
held in memory; a full disk is a 507. Any error deletes the whole folder. A JSON body is read
up to a small cap, then validated.
"""

from __future__ import annotations

import codecs
import errno
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from core.errors import InputError, TooLargeError
from core.jobs import JobUpload, parse_metadata
from core.settings import Settings
from core.storage import CappedWriter, Storage, StoredFile, human_bytes, open_storage

CONFIG_MAX_BYTES = 64 * 1024
METADATA_MAX_BYTES = 16 * 1024  # 16 keys of 64 and values of 512 characters, escaped
JSON_MAX_BYTES = 64 * 1024  # a JSON request body (an engine build's claim or failure)
MAX_BOUNDARY_CHARS = 70  # RFC 2046; python-multipart itself fails past 256, as a 500
MULTIPART_OVERHEAD_BYTES = 16 * 1024  # boundaries and part headers, generously
# Kept from the client's file name so that readers that go by extension still can; anything
# else about the client's name is ignored (it never becomes part of a path).
DATA_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip", ".npz", ".npy")

Model = TypeVar("Model", bound=BaseModel)


class InsufficientStorage(InputError):
    """The disk filled up while an upload was written: the server's problem, not the caller's,
    but answered like the caller's errors (a JSON code) so that a client can retry later."""

    status_code = 507


@contextmanager
def disk_full_is_507() -> Iterator[None]:
    """Turn ENOSPC (and EDQUOT) raised inside the block into ``InsufficientStorage``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise InsufficientStorage(
            "insufficient_storage", "the server has no room left for this upload; retry later"
        ) from exc


@dataclass(frozen=True)
class FormField:
    """A field a multipart form may carry, up to ``max_bytes``: a file, streamed to the staging
    folder under the name ``stored_as`` gives it (from the client's file name), or, with
    ``stored_as`` None, a text kept in memory."""

    name: str
    max_bytes: int
    stored_as: Callable[[str | None], str] | None = None
    required: bool = True


@dataclass
class ReceivedForm:
    """What a multipart body held. The caller owns ``directory`` and deletes it when done."""

    directory: Path
    files: dict[str, StoredFile]
    texts: dict[str, bytes]
    filenames: dict[str, str | None]  # the client's name of each file, for display only


def _archive_name(field_name: str) -> Callable[[str | None], str]:
    def stored_as(filename: str | None) -> str:
        lowered = (filename or "").lower()
        suffix = next((s for s in DATA_SUFFIXES if lowered.endswith(s)), "")
        return field_name + suffix

    return stored_as


def job_form(settings: Settings) -> tuple[FormField, ...]:
    """The fields of ``POST /v1/jobs``, in the order error messages name them."""
    return (
        FormField("model", settings.max_model_bytes, lambda _: "model.onnx"),
        FormField("data", settings.max_data_bytes, _archive_name("data")),
        FormField("config", CONFIG_MAX_BYTES),
        FormField("eval_data", settings.max_data_bytes, _archive_name("eval_data"), required=False),
        FormField("metadata", METADATA_MAX_BYTES, required=False),
    )


def resource_form(kind: str, settings: Settings) -> tuple[FormField, ...]:
    """The one field of ``POST /v1/models`` or ``/v1/datasets`` (``kind``: model, dataset):
    ``file``, as OpenAI's files API names it."""
    if kind == "model":
        return (FormField("file", settings.max_model_bytes, lambda _: "model.onnx"),)
    return (FormField("file", settings.max_data_bytes, _archive_name("data")),)


def max_body_bytes(form: Sequence[FormField]) -> int:
    """The largest body a valid request can have: every field at its cap, plus the framing."""
    return sum(field.max_bytes for field in form) + MULTIPART_OVERHEAD_BYTES


@dataclass
class _Part:
    name: str
    filename: str | None
    writer: CappedWriter | None = None  # file parts
    text: bytearray = field(default_factory=bytearray)  # text parts


class _Receiver:
    """Turns python-multipart's callbacks into file writes; one instance per request."""

    def __init__(self, form: Sequence[FormField], directory: Path) -> None:
        self.fields = {form_field.name: form_field for form_field in form}
        self.directory = directory
        self.files: dict[str, StoredFile] = {}
        self.texts: dict[str, bytes] = {}
        self.filenames: dict[str, str | None] = {}
        self.seen: set[str] = set()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._part: _Part | None = None
        self.writers: list[CappedWriter] = []
        # Callbacks only queue writes (None: end of that file); ``drain`` runs them off the
        # event loop, since they touch the disk.
        self._writes: list[tuple[str, CappedWriter, bytes | None]] = []

    # python-multipart callbacks ---------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InputError("invalid_multipart", "a multipart part has no name", status_code=400)
        name = options[b"name"].decode("utf-8", "replace")
        form_field = self.fields.get(name)
        if form_field is None:
            raise InputError(
                "unknown_field",
                f"unknown multipart field {name!r}; expected {', '.join(self.fields)}",
            )
        if name in self.seen:
            raise InputError("duplicate_field", f"multipart field {name!r} was sent twice")
        self.seen.add(name)
        filename = (
            options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        )
        self._part = _Part(name, filename)
        self.filenames[name] = filename
        if form_field.stored_as is not None:
            path = self.directory / form_field.stored_as(filename)
            self._part.writer = CappedWriter(path, form_field.max_bytes, label=f"field {name!r}")
            self.writers.append(self._part.writer)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        if self._part.writer is not None:
            self._writes.append((self._part.name, self._part.writer, bytes(data[start:end])))
            return
        self._part.text += data[start:end]
        limit = self.fields[self._part.name].max_bytes
        if len(self._part.text) > limit:
            raise TooLargeError(
                "upload_too_large",
                f"field {self._part.name!r} is larger than {human_bytes(limit)}",
            )

    def on_part_end(self) -> None:
        part, self._part = self._part, None
        assert part is not None
        if part.writer is not None:
            self._writes.append((part.name, part.writer, None))
        else:
            self.texts[part.name] = bytes(part.text)

    # ------------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Apply the queued writes (run in a worker thread)."""
        writes, self._writes = self._writes, []
        for name, writer, chunk in writes:
            if chunk is None:
                self.files[name] = writer.close()
            else:
                writer.write(chunk)


def _names(names: Sequence[str]) -> str:
    """``a, b and c``."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _boundary(request: Request, form: Sequence[FormField]) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        required = [form_field.name for form_field in form if form_field.required]
        raise InputError(
            "unsupported_media_type",
            f"send multipart/form-data with the fields {_names(required)}",
            status_code=415,
        )
    boundary = params[b"boundary"]
    if not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS:
        raise InputError(
            "invalid_multipart",
            f"the multipart boundary is {len(boundary)} characters long; RFC 2046 allows 1 to "
            f"{MAX_BOUNDARY_CHARS}",
            status_code=400,
        )
    return boundary


def declared_body_bytes(request: Request) -> int:
    """The body size the client declared; 0 when chunked (the caps apply while streaming)."""
    declared = request.headers.get("content-length")
    if declared is None:
        return 0
    try:
        size = int(declared)
    except ValueError as exc:
        raise InputError("invalid_content_length", "Content-Length is not a number") from exc
    if size < 0:
        raise InputError("invalid_content_length", "Content-Length is negative")
    return size


def _check_content_length(request: Request, limit: int, caps: str) -> None:
    size = declared_body_bytes(request)
    if size > limit:
        raise TooLargeError(
            "upload_too_large",
            f"request body of {human_bytes(size)} exceeds the limit of {human_bytes(limit)} "
            f"({caps})",
        )


async def receive_form(
    request: Request, form: Sequence[FormField], settings: Settings
) -> ReceivedForm:
    """Stream a multipart body with the fields ``form`` to a fresh staging folder.

    On any error the folder is deleted before the error propagates; on success the caller
    owns it.
    """
    caps = ", ".join(f"{f.name} up to {human_bytes(f.max_bytes)}" for f in form)
    _check_content_length(request, max_body_bytes(form), caps)  # 413 before reading a byte
    boundary = _boundary(request, form)
    with disk_full_is_507():
        directory = open_storage(settings).new_upload_dir()
    receiver = _Receiver(form, directory)
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": receiver.on_part_begin,
                "on_part_data": receiver.on_part_data,
                "on_part_end": receiver.on_part_end,
                "on_header_field": receiver.on_header_field,
                "on_header_value": receiver.on_header_value,
                "on_header_end": receiver.on_header_end,
                "on_headers_finished": receiver.on_headers_finished,
            },
        )
        try:
            with disk_full_is_507():  # a file part's writes, and its creation in a callback
                async for chunk in request.stream():
                    parser.write(chunk)
                    await anyio.to_thread.run_sync(receiver.drain)
                parser.finalize()
                await anyio.to_thread.run_sync(receiver.drain)
        except FormParserError as exc:
            raise InputError(
                "invalid_multipart", f"malformed multipart body: {exc}", status_code=400
            ) from exc
        except ClientDisconnect as exc:
            raise InputError(
                "upload_incomplete",
                "the connection closed before the upload finished",
                status_code=400,
            ) from exc
        # A body cut short first: the fields after the cut are missing only because of it.
        if truncated := receiver.seen - set(receiver.files) - set(receiver.texts):
            raise InputError(
                "invalid_multipart",
                f"the body ended inside field {sorted(truncated)[0]!r}",
                status_code=400,
            )
        for form_field in form:
            if form_field.required and form_field.name not in receiver.seen:
                raise InputError(
                    "missing_field", f"multipart field {form_field.name!r} is required"
                )
        return ReceivedForm(directory, receiver.files, receiver.texts, receiver.filenames)
    except BaseException:
        for writer in receiver.writers:
            writer.abort()
        Storage.remove_tree(directory)
        raise


async def receive_job_upload(request: Request, settings: Settings) -> JobUpload:
    """Stream the ``POST /v1/jobs`` body to a fresh staging folder and describe what arrived.

    On any error the folder is deleted before the error propagates; on success the caller
    owns the folder (``core.jobs.submit_job`` adopts or deletes it).
    """
    form = await receive_form(request, job_form(settings), settings)
    try:
        try:
            config_text = codecs.decode(form.texts["config"], "utf-8")
        except UnicodeDecodeError as exc:
            raise InputError("invalid_config", "config is not UTF-8 text") from exc
        metadata = form.texts.get("metadata")
        try:
            user_metadata = parse_metadata(codecs.decode(metadata, "utf-8")) if metadata else {}
        except UnicodeDecodeError as exc:
            raise InputError("invalid_metadata", "metadata is not UTF-8 text") from exc
    except BaseException:
        Storage.remove_tree(form.directory)
        raise
    return JobUpload(
        directory=form.directory,
        config_text=config_text,
        model=form.files["model"],
        data=form.files["data"],
        eval_data=form.files.get("eval_data"),
        metadata=user_metadata,
    )


async def receive_json(
    request: Request, model: type[Model], max_bytes: int = JSON_MAX_BYTES
) -> Model:
    """Read a JSON body of at most ``max_bytes`` (413 past it, from Content-Length before a byte
    is read) and validate it as ``model`` (422, as FastAPI answers a declared body)."""
    _check_content_length(request, max_bytes, f"a JSON body up to {human_bytes(max_bytes)}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise TooLargeError(
                    "upload_too_large", f"the JSON body is larger than {human_bytes(max_bytes)}"
                )
    except ClientDisconnect as exc:
        raise InputError(
            "upload_incomplete", "the connection closed before the body arrived", status_code=400
        ) from exc
    try:
        # pydantic's own JSON parser: nesting past its recursion limit is a validation error.
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from exc
