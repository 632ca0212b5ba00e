"""Receive the one-shot ``POST /v1/jobs`` multipart body straight to disk.

FastAPI's ``UploadFile`` would first spool every file to a temporary file of its own, unbounded,
and only then let us look at it. Instead the body is parsed as it arrives and each file part
goes through ``core.storage.CappedWriter`` into a staging folder: hashed on the way, refused
(413) the moment it passes its cap, never held in memory. Any error deletes the whole folder.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from core.errors import InputError, TooLargeError
from core.jobs import JobUpload
from core.settings import Settings
from core.storage import CappedWriter, Storage, StoredFile, human_bytes

CONFIG_MAX_BYTES = 64 * 1024
FILE_FIELDS = ("model", "data", "eval_data")
REQUIRED_FIELDS = ("model", "data", "config")
# Kept from the client's file name so that readers that go by extension still can; anything
# else about the client's name is ignored (it never becomes part of a path).
DATA_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip", ".npz", ".npy")


def _stored_name(field_name: str, filename: str | None) -> str:
    if field_name == "model":
        return "model.onnx"
    lowered = (filename or "").lower()
    suffix = next((s for s in DATA_SUFFIXES if lowered.endswith(s)), "")
    return field_name + suffix


MULTIPART_OVERHEAD_BYTES = 16 * 1024  # boundaries and part headers, generously


def max_body_bytes(settings: Settings) -> int:
    """The largest body a valid request can have: every file at its cap, plus the form."""
    return (
        settings.max_model_bytes
        + 2 * settings.max_data_bytes
        + CONFIG_MAX_BYTES
        + MULTIPART_OVERHEAD_BYTES
    )


@dataclass
class _Part:
    name: str
    filename: str | None
    writer: CappedWriter | None = None  # file parts
    text: bytearray = field(default_factory=bytearray)  # the config field


class _Receiver:
    """Turns python-multipart's callbacks into file writes; one instance per request."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory
        self.files: dict[str, StoredFile] = {}
        self.config: str | None = None
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
            raise InputError("invalid_multipart", "a multipart part has no name")
        name = options[b"name"].decode("utf-8", "replace")
        if name not in (*FILE_FIELDS, "config"):
            raise InputError(
                "unknown_field",
                f"unknown multipart field {name!r}; expected model, data, config, eval_data",
            )
        if name in self.seen:
            raise InputError("duplicate_field", f"multipart field {name!r} was sent twice")
        self.seen.add(name)
        filename = (
            options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        )
        self._part = _Part(name, filename)
        if name in FILE_FIELDS:
            cap = self.settings.max_model_bytes if name == "model" else self.settings.max_data_bytes
            path = self.directory / _stored_name(name, filename)
            self._part.writer = CappedWriter(path, cap, label=f"field {name!r}")
            self.writers.append(self._part.writer)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        if self._part.writer is not None:
            self._writes.append((self._part.name, self._part.writer, bytes(data[start:end])))
            return
        self._part.text += data[start:end]
        if len(self._part.text) > CONFIG_MAX_BYTES:
            raise TooLargeError(
                "upload_too_large", f"field 'config' is larger than {human_bytes(CONFIG_MAX_BYTES)}"
            )

    def on_part_end(self) -> None:
        part, self._part = self._part, None
        assert part is not None
        if part.writer is not None:
            self._writes.append((part.name, part.writer, None))
            return
        try:
            self.config = codecs.decode(part.text, "utf-8")
        except UnicodeDecodeError as exc:
            raise InputError("invalid_config", "config is not UTF-8 text") from exc

    # ------------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Apply the queued writes (run in a worker thread)."""
        writes, self._writes = self._writes, []
        for name, writer, chunk in writes:
            if chunk is None:
                self.files[name] = writer.close()
            else:
                writer.write(chunk)


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InputError(
            "unsupported_media_type",
            "send multipart/form-data with the fields model, data and config",
            status_code=415,
        )
    return params[b"boundary"]


def _check_content_length(request: Request, settings: Settings) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return  # chunked: the per-file caps still apply while streaming
    try:
        size = int(declared)
    except ValueError as exc:
        raise InputError("invalid_content_length", "Content-Length is not a number") from exc
    limit = max_body_bytes(settings)
    if size > limit:
        raise TooLargeError(
            "upload_too_large",
            f"request body of {human_bytes(size)} exceeds the limit of {human_bytes(limit)} "
            f"(model up to {human_bytes(settings.max_model_bytes)}, "
            f"data and eval_data up to {human_bytes(settings.max_data_bytes)} each)",
        )


async def receive_job_upload(request: Request, settings: Settings) -> JobUpload:
    """Stream the body to a fresh staging folder and describe what arrived.

    On any error the folder is deleted before the error propagates; on success the caller
    owns the folder (``core.jobs.submit_job`` adopts or deletes it).
    """
    _check_content_length(request, settings)  # 413 before reading a byte
    boundary = _boundary(request)
    directory = Storage(settings.data_dir).new_upload_dir()
    receiver = _Receiver(settings, directory)
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
            async for chunk in request.stream():
                parser.write(chunk)
                await anyio.to_thread.run_sync(receiver.drain)
            parser.finalize()
        except FormParserError as exc:
            raise InputError("invalid_multipart", f"malformed multipart body: {exc}") from exc
        except ClientDisconnect as exc:
            raise InputError(
                "upload_incomplete",
                "the connection closed before the upload finished",
                status_code=400,
            ) from exc
        await anyio.to_thread.run_sync(receiver.drain)
        for name in REQUIRED_FIELDS:
            if name not in receiver.seen:
                raise InputError("missing_field", f"multipart field {name!r} is required")
        complete = set(receiver.files) | ({"config"} if receiver.config is not None else set())
        if truncated := receiver.seen - complete:
            raise InputError(
                "invalid_multipart", f"the body ended inside field {sorted(truncated)[0]!r}"
            )
        assert receiver.config is not None
        return JobUpload(
            directory=directory,
            config_text=receiver.config,
            model=receiver.files["model"],
            data=receiver.files["data"],
            eval_data=receiver.files.get("eval_data"),
        )
    except BaseException:
        for writer in receiver.writers:
            writer.abort()
        Storage.remove_tree(directory)
        raise
