"""Downloads of listed files (a job's artifacts, a sweep's report): each streamed to
``<name>.part``, resumed with ``Range`` after a cut, checked against the listing's SHA-256 and
only then renamed to ``<name>``."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union
from urllib.parse import quote

import httpx

from ._http import Transport, backoff_seconds
from .errors import ChecksumMismatch, ConnectionFailed, NotFound
from .progress import Bar, byte_bar


def download_listed(
    transport: Transport,
    base_path: str,
    listing: Sequence[Dict[str, Any]],
    directory: Union[str, os.PathLike],
    names: Optional[Sequence[str]],
    progress: bool,
) -> List[Path]:
    """The files of ``listing`` (``name``, ``size``, ``sha256`` each), or those ``names``,
    from ``<base_path>/<name>`` into ``directory``; the paths written."""
    by_name = {str(item["name"]): item for item in listing}
    wanted = list(by_name) if names is None else list(names)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise NotFound(
            404, "artifact_not_found", f"no file {unknown} here; there are {sorted(by_name)}"
        )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        download_file(
            transport,
            f"{base_path}/{quote(name, safe='')}",
            folder / name,
            int(by_name[name]["size"]),
            str(by_name[name]["sha256"]),
            progress,
        )
        for name in wanted
    ]


def download_file(
    transport: Transport, path: str, target: Path, size: int, sha256: str, progress: bool
) -> Path:
    """``target``, fetched unless it is there with the right SHA-256. Resumes ``target.part``
    (left by an earlier call, or by a cut connection) with ``Range: bytes=<have>-``."""
    if target.is_file() and file_sha256(target) == sha256:
        return target
    part = target.with_name(target.name + ".part")
    failures = 0
    with byte_bar(progress, target.name, size) as bar:
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()  # not a prefix of this file: start again
                continue
            if part.exists() and have == size:
                break
            try:
                _fetch_rest(transport, path, part, have, bar)
            except httpx.TransportError as cut:
                grew = part.exists() and part.stat().st_size > have
                failures = 0 if grew else failures + 1
                if failures > transport.retries:
                    raise ConnectionFailed(
                        f"download of {target.name} cut {failures} times without a new byte: "
                        f"{str(cut) or type(cut).__name__}"
                    ) from cut
                time.sleep(backoff_seconds(failures))
    if file_sha256(part) != sha256:
        part.unlink()
        raise ChecksumMismatch(f"{target.name}: the SHA-256 of the bytes received is not {sha256}")
    os.replace(part, target)
    return target


def _fetch_rest(transport: Transport, path: str, part: Path, have: int, bar: Bar) -> None:
    """Append what the server has from byte ``have`` on (all of it when it ignores Range)."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    with transport.stream("GET", path, headers=headers) as response:
        if response.status_code != 206:
            have = 0
        with part.open("ab" if have else "wb") as file:
            for chunk in response.iter_bytes():  # as received: a cut keeps what came
                file.write(chunk)
                have += len(chunk)
                bar.update(completed=have)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
