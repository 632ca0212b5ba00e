"""Safe reading of uploaded image archives: zip, tar and compressed tar.

Every entry is checked before a byte is extracted, and the first unsafe entry refuses the whole
archive, images or not: an archive that tries one trick is not trusted with the rest. Sizes are
checked against the headers up front and again while reading, because headers can lie.

`inspect_archive` (API, at upload), `extract_images` and `open_image_archive` (worker, see
`core.inputs.images`) all go through the same `ImageArchive`, so they accept exactly the same
archives.
"""

from __future__ import annotations

import io
import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from core.errors import DataImportError, TooLargeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# Folders that archivers add and users never meant as data (macOS Finder's resource forks).
_JUNK_FOLDERS = frozenset({"__MACOSX"})

# "C:", "C:/x" or "C:x": drive-relative or absolute on Windows.
_DRIVE = re.compile(r"[A-Za-z]:")

# Bit 0 of a zip entry's general-purpose flags: the entry is encrypted.
_ZIP_ENCRYPTED = 0x1

# What decompressors and archive parsers raise on truncated or corrupt input.
_READ_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,
)

_TAR_KINDS = {
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "device",
    tarfile.BLKTYPE: "device",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass(frozen=True, kw_only=True)
class ArchiveLimits:
    """Caps that keep a hostile or mistaken upload from filling memory or disk."""

    max_entries: int = 200_000  # all entries, directories and non-images included
    max_total_bytes: int = 4 * 2**30  # uncompressed bytes of all regular files
    max_entry_bytes: int = 64 * 2**20  # uncompressed bytes of one image

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_total_bytes", "max_entry_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"ArchiveLimits.{name} must be positive, got {getattr(self, name)}"
                )


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class ArchiveSummary:
    format: str  # "zip" | "tar"
    image_count: int
    total_bytes: int  # uncompressed bytes of the image entries
    class_names: list[str] | None  # sorted class-folder names; None when not labelled


@dataclass(frozen=True)
class _Entry:
    name: str  # as written in the archive
    kind: str  # "file", "dir", or what else it is: "symlink", "hardlink", "device", ...
    size: int  # uncompressed size, as the header claims
    ref: zipfile.ZipInfo | tarfile.TarInfo


class _Reader(Protocol):
    format: str

    def entries(self) -> Iterator[_Entry]: ...

    def open(self, entry: _Entry) -> IO[bytes]: ...

    def check_target(self, entry: _Entry, root: Path) -> None: ...


class _ZipReader:
    format = "zip"

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self._zip = archive

    def entries(self) -> Iterator[_Entry]:
        for info in self._zip.infolist():
            if info.flag_bits & _ZIP_ENCRYPTED:
                raise DataImportError(
                    "unsupported_archive", f"entry {info.orig_filename!r} is encrypted"
                )
            # orig_filename: zipfile's own `filename` is already cut at NUL, hiding tricks.
            yield _Entry(info.orig_filename, _zip_kind(info), info.file_size, info)

    def open(self, entry: _Entry) -> IO[bytes]:
        assert isinstance(entry.ref, zipfile.ZipInfo)
        try:
            return self._zip.open(entry.ref)
        except NotImplementedError as exc:  # a compression method zipfile cannot read
            raise DataImportError("unsupported_archive", f"entry {entry.name!r}: {exc}") from exc

    def check_target(self, entry: _Entry, root: Path) -> None:
        pass  # zipfile has no second opinion to offer


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """Zip has no link entries of its own, but Unix zips keep the file type in the high bits."""
    if info.is_dir():
        return "dir"
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type in (0, stat.S_IFREG):
        return "file"
    if file_type == stat.S_IFDIR:
        return "dir"
    return "symlink" if file_type == stat.S_IFLNK else "special file"


class _TarReader:
    format = "tar"

    def __init__(self, archive: tarfile.TarFile) -> None:
        self._tar = archive

    def entries(self) -> Iterator[_Entry]:
        with _as_corrupt("the archive"):
            for member in self._tar:
                kind = "file" if member.isreg() else _TAR_KINDS.get(member.type, "special file")
                yield _Entry(member.name, kind, member.size, member)

    def open(self, entry: _Entry) -> IO[bytes]:
        assert isinstance(entry.ref, tarfile.TarInfo)
        stream = self._tar.extractfile(entry.ref)
        assert stream is not None  # regular files always have data
        return stream

    def check_target(self, entry: _Entry, root: Path) -> None:
        """tarfile's "data" filter, a second opinion on top of `_validate`, with the real root."""
        assert isinstance(entry.ref, tarfile.TarInfo)
        try:
            tarfile.data_filter(entry.ref, str(root))
        except tarfile.FilterError as exc:
            raise _unsafe(entry.name, f"is refused by tarfile's data filter: {exc}") from exc


@contextmanager
def _as_corrupt(what: str) -> Iterator[None]:
    """A truncated or corrupt upload is the caller's mistake: a 422, not a 500."""
    try:
        yield
    except _READ_ERRORS as exc:
        raise DataImportError("corrupt_archive", f"cannot read {what}: {exc}") from exc


def _unsafe(name: str, why: str) -> DataImportError:
    return DataImportError("unsafe_archive_entry", f"archive entry {name!r} {why}")


@contextmanager
def _open_reader(path: Path) -> Iterator[_Reader]:
    """Pick the reader by content: the upload's file name says nothing we can trust.

    Tar is tried first: a tar whose last member is a zip can pass `zipfile.is_zipfile`, while a
    zip never has a valid tar header checksum.
    """
    with ExitStack() as stack:
        reader: _Reader
        with _as_corrupt("the archive"):  # only the opening: errors of the caller's body pass
            if tarfile.is_tarfile(path):
                reader = _TarReader(stack.enter_context(tarfile.open(path, "r:*")))
            elif zipfile.is_zipfile(path):
                reader = _ZipReader(stack.enter_context(zipfile.ZipFile(path)))
            else:
                raise DataImportError(
                    "unsupported_archive", "the upload is not a zip, tar or compressed tar archive"
                )
        yield reader


def _safe_path(name: str) -> str | None:
    """The entry's path relative to the archive root, "/"-separated (None for the root itself).

    Raises for anything that could land outside the destination on any OS. Plain string work,
    not pathlib: this runs for every entry of archives with 100,000s of them.
    """
    if "\\" in name or "\x00" in name:
        raise _unsafe(name, "contains a backslash or NUL character")
    if name.startswith("/"):
        raise _unsafe(name, "is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if parts and _DRIVE.match(parts[0]):
        raise _unsafe(name, "starts with a drive letter")
    if ".." in parts:
        raise _unsafe(name, "climbs out of the archive with '..'")
    return "/".join(parts) or None


def _is_image(path: str) -> bool:
    """Image by extension, at any depth; hidden files and macOS junk are not the user's pictures."""
    if any(part.startswith(".") or part in _JUNK_FOLDERS for part in path.split("/")):
        return False
    return path.lower().endswith(IMAGE_SUFFIXES)


def _class_folder(path: str) -> str:
    return path.rpartition("/")[0].rpartition("/")[2]  # "" for an image at the root


def _class_names(paths: Collection[str]) -> list[str] | None:
    """Immediate parent folders are classes when every image has one and there are at least two."""
    folders = {_class_folder(path) for path in paths}
    if "" in folders or len(folders) < 2:
        return None
    return sorted(folders)


def _validate(reader: _Reader, limits: ArchiveLimits) -> dict[str, _Entry]:
    """Check every entry; return the image entries by relative path, in archive order."""
    images: dict[str, _Entry] = {}
    entry_count = total_bytes = 0
    for entry in reader.entries():
        entry_count += 1
        if entry_count > limits.max_entries:
            raise TooLargeError(
                "archive_too_large", f"the archive has more than {limits.max_entries} entries"
            )
        path = _safe_path(entry.name)
        if entry.kind not in ("file", "dir"):
            raise _unsafe(entry.name, f"is a {entry.kind}")
        if entry.kind == "dir":
            continue
        total_bytes += entry.size
        if total_bytes > limits.max_total_bytes:
            raise TooLargeError(
                "archive_too_large",
                f"the archive expands to more than {limits.max_total_bytes} bytes",
            )
        if path is None or not _is_image(path):
            continue
        if entry.size > limits.max_entry_bytes:
            raise TooLargeError(
                "archive_too_large",
                f"archive entry {entry.name!r} is larger than {limits.max_entry_bytes} bytes",
            )
        if path in images:
            raise _unsafe(entry.name, "appears twice")
        images[path] = entry
    if not images:
        raise DataImportError(
            "no_images", f"the archive holds no {', '.join(IMAGE_SUFFIXES)} files"
        )
    for path in images:  # "a.jpg" and "a.jpg/b.jpg" cannot both be extracted
        parts = path.split("/")
        if any("/".join(parts[:depth]) in images for depth in range(1, len(parts))):
            raise _unsafe(path, "lies inside another image's path")
    return images


class _CappedStream(io.RawIOBase):
    """One entry's bytes; fails as soon as it yields more than `cap`, whatever the header said."""

    def __init__(self, raw: IO[bytes], name: str, cap: int) -> None:
        super().__init__()
        self._raw = raw
        self._name = name
        self._cap = cap
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        with _as_corrupt(repr(self._name)):
            data = self._raw.read(len(buffer))
        self.consumed += len(data)
        if self.consumed > self._cap:
            raise TooLargeError(
                "archive_too_large",
                f"archive entry {self._name!r} expands beyond {self._cap} bytes, "
                "the per-file or total limit",
            )
        buffer[: len(data)] = data
        return len(data)


class ImageArchive:
    """A validated archive: its image members (sorted), labels, and reads within the limits."""

    def __init__(self, reader: _Reader, limits: ArchiveLimits) -> None:
        self._reader = reader
        self._limits = limits
        self._entries = _validate(reader, limits)
        self.members: list[str] = sorted(self._entries)
        class_names = _class_names(self.members)
        self.labels: list[int] | None = None
        if class_names is not None:
            index = {name: i for i, name in enumerate(class_names)}
            self.labels = [index[_class_folder(member)] for member in self.members]
        self.summary = ArchiveSummary(
            format=reader.format,
            image_count=len(self.members),
            total_bytes=sum(entry.size for entry in self._entries.values()),
            class_names=class_names,
        )

    def stream(self, members: Collection[str] | None = None) -> Iterator[tuple[str, io.RawIOBase]]:
        """Yield (member, its bytes) for `members` (default all images), in archive order.

        Archive order keeps a compressed tar to one forward pass. Each stream is valid until the
        next one is yielded, and stops at the per-image limit or the total left, whichever is less.
        """
        wanted = self._entries.keys() if members is None else set(members)
        bytes_left = self._limits.max_total_bytes
        for path, entry in self._entries.items():
            if path not in wanted:
                continue
            with _as_corrupt(repr(entry.name)), self._reader.open(entry) as raw:
                cap = min(self._limits.max_entry_bytes, bytes_left)
                capped = _CappedStream(raw, entry.name, cap)
                yield path, capped
                bytes_left -= capped.consumed

    def target(self, member: str, root: Path) -> Path:
        """Where `member` goes under `root` (a resolved directory), checked once more."""
        target = root / member
        # `_validate` keeps `member` inside `root`; this catches symlinks already under `root`.
        if not target.resolve().is_relative_to(root):
            raise _unsafe(member, f"would be written outside {root}")
        self._reader.check_target(self._entries[member], root)
        return target


@contextmanager
def open_image_archive(
    path: Path, limits: ArchiveLimits = DEFAULT_LIMITS
) -> Iterator[ImageArchive]:
    """Open and validate an archive (reading only its member list) for reading its images."""
    with _open_reader(path) as reader:
        yield ImageArchive(reader, limits)


def inspect_archive(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> ArchiveSummary:
    """Validate an upload from its member list alone, without extracting anything."""
    with open_image_archive(path, limits) as archive:
        return archive.summary


def extract_images(path: Path, dest: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> list[Path]:
    """Write the image entries under `dest` at their archive paths; return them (absolute, sorted).

    Nothing else in the archive is written. On failure, files already written stay in `dest`
    (callers extract into a directory of their own and remove it).
    """
    root = dest.resolve()
    with open_image_archive(path, limits) as archive:
        for member, source in archive.stream():
            target = archive.target(member, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as sink:
                shutil.copyfileobj(source, sink)
        return [root / member for member in archive.members]
