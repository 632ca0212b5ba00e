"""Downloads of stored files with their checksum: job artifacts and sweep reports."""

from __future__ import annotations

import base64
from pathlib import Path

from fastapi.responses import FileResponse


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
    digest = base64.b64encode(bytes.fromhex(sha256)).decode()
    return FileResponse(
        path,
        filename=name,
        media_type=media_type,
        headers={
            "X-Checksum-SHA256": sha256,
            "Digest": f"sha-256={digest}",  # RFC 3230: base64 of the digest
            "Repr-Digest": f"sha-256=:{digest}:",  # RFC 9530, its successor
            "ETag": f'"{sha256}"',
            **(headers or {}),
        },
    )
