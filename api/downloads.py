"""Downloads of stored files with their checksum: job artifacts and sweep reports.

From a local store, a file (``Range`` requests get a 206, several ranges a multipart one); from
a bucket, streamed through the API (one range gets a 206; several, the whole file), or, where
the caller allows it (``STORAGE_DOWNLOAD_REDIRECT``), a ``307`` to a presigned URL.
"""

from __future__ import annotations

import base64
from pathlib import Path

from fastapi import Request, Response, status
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from core.storage import Storage


def checksum_headers(sha256: str) -> dict[str, str]:
    """The file's SHA-256 in the headers clients check it by."""
    digest = base64.b64encode(bytes.fromhex(sha256)).decode()
    return {
        "X-Checksum-SHA256": sha256,
        "Digest": f"sha-256={digest}",  # RFC 3230: base64 of the digest
        "Repr-Digest": f"sha-256=:{digest}:",  # RFC 9530, its successor
        "ETag": f'"{sha256}"',
    }


def checksummed_file(
    path: Path,
    name: str,
    sha256: str,
    *,
    media_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
) -> FileResponse:
    """``path`` as an attachment named ``name``, streamed from disk (``Range`` requests get a
    206), with its SHA-256 in the headers clients check it by."""
    return FileResponse(
        path,
        filename=name,
        media_type=media_type,
        headers={**checksum_headers(sha256), **(headers or {})},
    )


def stored_download(
    request: Request,
    storage: Storage,
    key: str,
    *,
    name: str,
    size: int,
    sha256: str,
    media_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
    redirect: bool = False,
) -> Response:
    """The object ``key`` as an attachment named ``name`` with its checksum headers (see the
    module); ``redirect`` allows a 307 to a presigned URL where the store has them."""
    path = storage.file_path(key)
    if path is not None:
        return checksummed_file(path, name, sha256, media_type=media_type, headers=headers)
    extra = {**checksum_headers(sha256), **(headers or {})}
    if redirect and (url := storage.presigned_url(key, filename=name, media_type=media_type)):
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers=extra)
    extra |= {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{name}"'}
    # If-Range: a range of another version of the file is no use; send this one whole.
    if_range = request.headers.get("if-range")
    wanted = request.headers.get("range") if if_range in (None, f'"{sha256}"') else None
    try:
        byte_range = single_range(wanted, size) if wanted else None
    except RangeNotSatisfiable:
        return Response(
            status_code=status.HTTP_416_RANGE_NOT_SATISFIABLE,
            headers={"Content-Range": f"bytes */{size}"},
        )
    if byte_range is None:
        chunks = storage.iter_bytes(key)
        return StreamingResponse(
            chunks, media_type=media_type, headers=extra | {"Content-Length": str(size)}
        )
    start, end = byte_range
    chunks = storage.iter_bytes(key, start, end)
    extra |= {
        "Content-Length": str(end - start),
        "Content-Range": f"bytes {start}-{end - 1}/{size}",
    }
    return StreamingResponse(
        chunks, status_code=status.HTTP_206_PARTIAL_CONTENT, media_type=media_type, headers=extra
    )


class RangeNotSatisfiable(ValueError):
    pass


def single_range(header: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a ``Range`` header of one byte range (``bytes=0-99``, ``bytes=100-``,
    ``bytes=-100``) within a file of ``size`` bytes; None for a header to ignore (RFC 9110
    lets a server send the whole file): another unit, several ranges, or a malformed one."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or "," in spec or not dash:
        return None
    try:
        if not first.strip():  # a suffix: the last N bytes
            start, end = max(size - int(last), 0), size
            if int(last) <= 0:
                raise RangeNotSatisfiable(header)
        else:
            start = int(first)
            end = min(int(last) + 1, size) if last.strip() else size
    except ValueError:
        return None
    if start < 0 or start >= size or end <= start:
        raise RangeNotSatisfiable(header)
    return start, end
