"""Stored models and datasets (``/v1/models``, ``/v1/datasets``): upload once (or register a
dataset from object storage by URL), name by id.

Also the base of every object the SDK returns (``ApiObject``: the raw JSON as ``.data``, its
fields as attributes) and how a job's or sweep's ``model=``/``data=`` argument (an id, an
object or a local path) becomes an id.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    ClassVar,
    Dict,
    Generic,
    Iterator,
    Optional,
    Type,
    TypeVar,
    Union,
)

import httpx

from .progress import byte_bar

if TYPE_CHECKING:
    from .client import Client


def field(name: str, doc: str = "") -> Any:
    """A read-only attribute that is the key ``name`` of the object's JSON (None if absent)."""
    return property(lambda self: self.data.get(name), doc=doc or f"The JSON's {name!r}.")


Self = TypeVar("Self", bound="ApiObject")


class ApiObject:
    """An object of the API, as its last answer described it; ``refresh()`` reads it again."""

    id: str = field("id")
    created_at: str = field("created_at", "ISO 8601, UTC.")
    _collection: ClassVar[str]  # its route: "/v1/jobs"

    def __init__(self, client: Client, data: Dict[str, Any]) -> None:
        self._client = client
        self.data = data

    @property
    def _path(self) -> str:
        return f"{self._collection}/{self.id}"

    def refresh(self: Self) -> Self:
        self.data = self._client._transport.request("GET", self._path).json()
        return self

    def delete(self) -> None:
        """Delete it (and its files); ``Conflict`` while it is in use or running."""
        self._client._transport.request("DELETE", self._path)

    def _cancel(self: Self) -> Self:
        """``POST .../cancel``: jobs and sweeps."""
        self.data = self._client._transport.request("POST", f"{self._path}/cancel").json()
        return self

    def __repr__(self) -> str:
        status = self.data.get("status")
        return f"<{type(self).__name__} {self.id}" + (f" {status}>" if status else ">")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.id == self.id  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.id))


class StoredFile(ApiObject):
    sha256: str = field("sha256")
    size: int = field("size", "Bytes.")
    filename: Optional[str] = field("filename", "The uploaded file's name, for display.")
    info: Dict[str, Any] = field("info", "What the service's validation found.")


class Model(StoredFile):
    """A stored ONNX model: ``info`` has input_name, input_shape, num_outputs, opset,
    parameters."""

    _collection = "/v1/models"


class Dataset(StoredFile):
    """A stored image archive: ``info`` has image_count, class_names, formats, image_sizes."""

    _collection = "/v1/datasets"


Local = Union[str, "os.PathLike[str]"]
InputArgument = Union[str, "os.PathLike[str]", StoredFile, None]
F = TypeVar("F", bound=StoredFile)


class StoredFiles(Generic[F]):
    """``client.models`` or ``client.datasets``."""

    def __init__(self, client: Client, object_class: Type[F]) -> None:
        self._client = client
        self._path = object_class._collection
        self._class = object_class

    def upload(self, path: Local, progress: bool = False) -> F:
        """Store the file (streamed from disk, never read whole into memory); the same bytes
        again answer with the stored one. ``progress``: a bar of bytes sent, on stderr."""
        source = existing_file(path)
        size = source.stat().st_size
        with byte_bar(progress, source.name, size) as bar, source.open("rb") as file:
            reader = ProgressReader(file, lambda position: bar.update(completed=position))
            files = {"file": (source.name, reader, "application/octet-stream")}
            answer = self._client._transport.request("POST", self._path, files=files)
        return self._class(self._client, answer.json())

    def get(self, resource_id: str) -> F:
        answer = self._client._transport.request("GET", f"{self._path}/{resource_id}")
        return self._class(self._client, answer.json())

    def list(self, page_size: int = 50) -> Iterator[F]:
        """Every stored one, newest first (all pages)."""
        for item in self._client._transport.pages(self._path, {"limit": page_size}):
            yield self._class(self._client, item)

    def delete(self, resource_id: str) -> None:
        """Delete it and its file; ``Conflict`` (resource_in_use) while a job uses it."""
        self._client._transport.request("DELETE", f"{self._path}/{resource_id}")

    def resolve(self, value: InputArgument, progress: bool = False) -> Optional[str]:
        """The id a job or sweep names: a stored object's, an id as given, or a local file's
        after uploading it (see ``local_file``)."""
        if is_object_url(value):
            raise ValueError(f"{value!r}: only datasets can be registered from a URL")
        path = local_file(value)
        if path is not None:
            return str(self.upload(path, progress=progress).id)
        return value.id if isinstance(value, StoredFile) else value


class Datasets(StoredFiles[Dataset]):
    """``client.datasets``: also registered from object storage by URL."""

    def register(self, url: str, name: Optional[str] = None) -> Dataset:
        """Store the archive at ``url`` (``s3://bucket/key``, in a bucket the service may
        read: its operator says which) without sending it: the service checks, validates and
        copies it as it does an upload, which may take minutes for large archives. The same
        bytes again answer with the stored dataset."""
        body: Dict[str, Any] = {"url": url}
        if name is not None:
            body["name"] = name
        # No read timeout: the answer comes once the service has fetched and validated it.
        timeout = httpx.Timeout(self._client._transport.http.timeout.connect, read=None)
        answer = self._client._transport.request("POST", self._path, json=body, timeout=timeout)
        return Dataset(self._client, answer.json())

    def resolve(self, value: InputArgument, progress: bool = False) -> Optional[str]:
        """As ``StoredFiles.resolve``, and an ``s3://`` URL is registered (``register``)."""
        if isinstance(value, str) and is_object_url(value):
            return str(self.register(value).id)
        return super().resolve(value, progress)


def is_object_url(value: InputArgument) -> bool:
    """An object storage URL (``s3://bucket/key``), which the service fetches itself."""
    return isinstance(value, str) and value.startswith("s3://")


def local_file(value: InputArgument) -> Optional[Path]:
    """``value`` as a local file to upload, or None for a stored object, an id, an ``s3://``
    URL or None. A str
    is a path if such a file exists, or if it looks like one (a separator, a dot or a leading
    ``~``: ids have none), and then it must be a file: else ``FileNotFoundError``."""
    if value is None or isinstance(value, StoredFile) or is_object_url(value):
        return None
    text = os.fspath(value)
    looks_like_path = text.startswith("~") or "." in text or "/" in text or os.sep in text
    if not isinstance(value, str) or os.path.exists(text) or looks_like_path:
        return existing_file(os.path.expanduser(text))
    return None


def input_ids(
    client: Client,
    model: InputArgument,
    data: InputArgument,
    eval_data: InputArgument,
    progress: bool,
) -> Dict[str, Optional[str]]:
    """The ``model_id``, ``data_id`` and ``eval_data_id`` of a job or sweep, local files
    uploaded; every path is checked before anything is uploaded."""
    for value in (model, data, eval_data):
        local_file(value)
    return {
        "model_id": client.models.resolve(model, progress),
        "data_id": client.datasets.resolve(data, progress),
        "eval_data_id": client.datasets.resolve(eval_data, progress),
    }


def existing_file(path: Local) -> Path:
    """``path`` as a Path; ``FileNotFoundError`` (before any request) if it is no file."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(source))
    return source


class ProgressReader:
    """A binary file whose reads and seeks report the position (httpx streams a multipart
    upload by reading its file in chunks, and rewinds it when a retry sends it again)."""

    def __init__(self, file: BinaryIO, report: Callable[[int], None]) -> None:
        self._file = file
        self._report = report

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._report(self._file.tell())
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._file.seek(offset, whence)
        self._report(position)
        return position

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()  # httpx sizes the upload with fstat: a Content-Length
