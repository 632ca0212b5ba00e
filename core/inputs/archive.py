"""Safe reading of uploaded image archives: zip, tar and compressed tar.

Every entry is checked before a byte is extracted, and the first unsafe entry refuses the whole
archive, images or not: an archive that tries one trick is not trusted with the rest. Sizes are
checked against the headers up front and again while reading, because headers can lie.

Every upload is bounded before a parser trusts it (`ArchiveLimits`: entries, bytes, path length
and depth, tar metadata). `tarfile` reads a GNU long name or a pax header whole into memory
before it hands us the member they belong to, and the CPython the project runs on here, 3.11.7
(pyproject allows any 3.11 or 3.12), carries CVE-2024-6232: its pax parsing takes time quadratic
in a run of digits (fixed in 3.11.10 and 3.12.6), holding the GIL. So
`_TarHeaderScan` first walks the (decompressed) tar stream itself, header by header exactly as
`tarfile` will, in constant memory and time linear in the stream, and refuses oversized or
malformed metadata before `tarfile` reads any; that pass bounds the headers whatever the
interpreter. Likewise `_scan_zip_directory` walks the zip central directory record by record
before `zipfile`, which reads and parses it whole, opens the archive.

Labels: class folders name the model's outputs (see `_class_names`): by number when every folder
is a number, in the job's `class_names` order when it gives one, else in sorted order.

`inspect_archive` (API, at upload), `extract_images` and `open_image_archive` (worker, see
`core.inputs.images`) all go through the same `ImageArchive`, so they accept exactly the same
archives.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, NamedTuple, Protocol

from core.config import MAX_CLASSES
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

# The tar compressions `tarfile.open(mode="r:*")` tries, in its order, and how it opens each.
_TAR_COMPRESSIONS: dict[str, Callable[[Path], IO[bytes]]] = {
    "": lambda path: path.open("rb"),
    "gz": gzip.GzipFile,
    "bz2": bz2.BZ2File,
    "xz": lzma.LZMAFile,
}
# What opening the wrong decompressor raises on the first block (tarfile then tries the next).
_NOT_THIS_COMPRESSION = (OSError, EOFError, zlib.error, lzma.LZMAError)

_BLOCK = tarfile.BLOCKSIZE
# The number fields of a tar header that tarfile parses (besides the checksum): mode, uid, gid,
# size, mtime, devmajor, devminor. A block where one of them is no number holds no header.
_TAR_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))
_TAR_CHECKSUM = slice(148, 156)
_ASCII = bytes(range(128))  # `translate(None, _ASCII)` leaves the bytes a signed sum counts < 0
_TAR_LONG_NAMES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_TAR_LOCAL_PAX = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_TAR_PAX = (*_TAR_LOCAL_PAX, tarfile.XGLTYPE)
# Metadata headers in a row before one member; tarfile recurses once per header.
_MAX_CHAINED_HEADERS = 8
# Longest run of digits in a pax header: the runs are what CVE-2024-6232's parse is quadratic in.
_MAX_PAX_DIGITS = 64
_PAX_DIGIT_RUN = re.compile(rb"\d{%d}" % (_MAX_PAX_DIGITS + 1))
_PAX_LENGTH = re.compile(rb"(\d+) ")
_ASCII_DIGITS = b"0123456789"  # what `\d` means in tarfile's bytes patterns
# Pax records tarfile keeps: every member gets its own copy of the global records (a global
# header of 64 KiB holds ~8,000), plus its local ones. Charged per record (a dict slot and its
# share of the strings) and per byte, the whole archive may keep this much per member on average.
_PAX_RECORD_COST = 64
_PAX_KEPT_PER_MEMBER = 2 * 2**10
_SKIP_CHUNK = 2**20  # data of compressed tars is skipped by reading it in chunks this big

_ZIP_RECORD = struct.Struct(zipfile.structCentralDir)  # a central-directory record's fixed part
_ZIP_SIGNATURE = b"PK\x01\x02"
_ZIP_UTF8_NAME = 0x800  # general-purpose flag: the name is UTF-8 (else cp437)
# Extra fields and comment of one central-directory record, on average over `max_entries`.
_ZIP_RECORD_EXTRA = 256


@dataclass(frozen=True, kw_only=True)
class ArchiveLimits:
    """Caps that keep a hostile or mistaken upload from filling memory or disk."""

    # Issue 16: 1,000,000 images and 200 GB per dataset.
    max_images: int = 1_000_000  # image entries
    max_entries: int = 1_100_000  # all entries, directories and non-images included
    max_total_bytes: int = 200 * 10**9  # uncompressed bytes of all regular files
    max_entry_bytes: int = 64 * 2**20  # uncompressed bytes of one image
    max_path_bytes: int = 1024  # UTF-8 bytes of one entry's path, as written in the archive
    max_path_depth: int = 32  # folders plus the file name of one entry's path
    max_header_bytes: int = 64 * 2**10  # one pax header of a tar, which tarfile reads whole

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(
                    f"ArchiveLimits.{field.name} must be positive, got {getattr(self, field.name)}"
                )


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class ArchiveSummary:
    format: str  # "zip" | "tar"
    image_count: int
    total_bytes: int  # uncompressed bytes of the image entries
    # The model's outputs 0, 1, ... by name, as the class folders label them (see `_class_names`);
    # None when the archive is not labelled.
    class_names: list[str] | None
    class_folders: list[str] | None  # the folders that hold its images (see `class_folders`)


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
def _open_reader(path: Path, limits: ArchiveLimits) -> Iterator[_Reader]:
    """Pick the reader by content: the upload's file name says nothing we can trust.

    Tar is tried first: a tar whose last member is a zip can pass `zipfile.is_zipfile`, while a
    zip never has a valid tar header checksum. Each parser only opens what our own pass over its
    headers (tar) or central directory (zip) found within `limits`.
    """
    with ExitStack() as stack:
        reader: _Reader
        with _as_corrupt("the archive"):  # only the opening: errors of the caller's body pass
            compression = _tar_compression(path)
            if compression is not None:
                with _TAR_COMPRESSIONS[compression](path) as stream:
                    _TarHeaderScan(stream, limits, seekable=not compression).run()
                # The compression our pass read, not "r:*": tarfile reads only what we checked.
                reader = _TarReader(stack.enter_context(tarfile.open(path, f"r:{compression}")))
            else:
                with path.open("rb") as file:
                    is_zip = _scan_zip_directory(file, limits)
                if not is_zip:
                    raise DataImportError(
                        "unsupported_archive",
                        "the upload is not a zip, tar or compressed tar archive",
                    )
                reader = _ZipReader(stack.enter_context(zipfile.ZipFile(path)))
        yield reader


def _tar_compression(path: Path) -> str | None:
    """The compression `tarfile.open(path, "r:*")` would read `path` with ("" for none): the
    first of its candidates under which the stream starts with a tar header (or the zero block
    that ends an empty archive); None when the upload is no tar."""
    for compression, opener in _TAR_COMPRESSIONS.items():
        try:
            with opener(path) as stream:
                block = stream.read(_BLOCK)
        except _NOT_THIS_COMPRESSION:
            continue
        if block == bytes(_BLOCK) or _tar_header(block) is not None:
            return compression
    return None


class _TarHeader(NamedTuple):
    type: bytes  # tarfile.REGTYPE, ...
    size: int  # as the header says

    @property
    def has_data(self) -> bool:
        """Whether tarfile skips `size` bytes of data after it (regular files, unknown types)."""
        return self.type in tarfile.REGULAR_TYPES or self.type not in tarfile.SUPPORTED_TYPES


def _tar_header(block: bytes) -> _TarHeader | None:
    """The header in one 512-byte block; None where `tarfile.TarInfo.frombuf` finds none (the
    end of the archive for tarfile): the same checks, without building a TarInfo, 5x faster
    (this runs for every member)."""
    if len(block) != _BLOCK or block.count(0) == _BLOCK:
        return None
    numbers = [_tar_number(block[start:end]) for start, end in _TAR_NUMBERS]
    checksum, size = _tar_number(block[_TAR_CHECKSUM]), numbers[3]
    if checksum is None or size is None or None in numbers:
        return None
    unsigned = 256 + sum(block) - sum(block[_TAR_CHECKSUM])  # the field counts as 8 spaces
    if checksum != unsigned:  # tarfile also accepts the sum of the bytes as signed chars
        outside = block[: _TAR_CHECKSUM.start] + block[_TAR_CHECKSUM.stop :]
        if checksum != unsigned - 256 * len(outside.translate(None, _ASCII)):
            return None
    kind = block[156:157]
    if kind == tarfile.AREGTYPE and block[:100].partition(b"\0")[0].endswith(b"/"):
        kind = tarfile.DIRTYPE  # old tars mark folders by their name alone
    return _TarHeader(kind, size)


def _tar_number(field: bytes) -> int | None:
    """A header number as tarfile's `nti` reads it (octal, or GNU base-256); None where it fails."""
    if field[0] in (0o200, 0o377):
        number = int.from_bytes(field[1:], "big")
        return number - 256 ** (len(field) - 1) if field[0] == 0o377 else number
    try:
        return int(field.partition(b"\0")[0].decode("ascii").strip() or "0", 8)
    except ValueError:
        return None


def _block(size: int) -> int:
    """`size` rounded up to whole tar blocks, as tarfile skips it."""
    return -(-size // _BLOCK) * _BLOCK


def _unsafe_header(why: str) -> DataImportError:
    return DataImportError("unsafe_archive_header", f"the archive is refused: {why}")


class _TarHeaderScan:
    """One pass over a tar stream's headers, reading them as `tarfile.TarFile.next` will.

    Headers are read in order; a member's data is skipped where tarfile skips it (regular files
    and unknown types, by the size its pax header gives if any); the first block that holds no
    header ends the archive, as it ends tarfile's. GNU long names and links are refused by their
    size field and pax headers are read only up to `max_header_bytes`, both before tarfile would
    read them whole; pax records must parse the one way tarfile's regular expressions can read
    them in linear time. Entries and data bytes count against the same limits `_validate` applies.
    Memory stays constant (one pax header at most); time is linear in the stream.
    """

    def __init__(self, stream: IO[bytes], limits: ArchiveLimits, *, seekable: bool) -> None:
        self._stream = stream
        self._limits = limits
        self._seekable = seekable  # a plain tar: data is skipped by seeking, not reading
        self._global_size: bytes | None = None  # the "size" record of the global pax headers
        self._global_records = 0
        self._members = 0
        self._data_bytes = 0
        self._pax_kept = 0  # bytes, record costs included, of the pax data tarfile will keep

    def run(self) -> None:
        while self._next_member():
            pass

    def _next_member(self) -> bool:
        """Scan one member and the metadata headers before it; False at the end of the archive."""
        local_sizes: list[bytes | None] = []  # per local pax header: the size it gives, if any
        kept = local_records = 0  # what tarfile will keep with this member
        for chained in range(_MAX_CHAINED_HEADERS + 1):
            header = _tar_header(self._stream.read(_BLOCK))
            if header is None:
                if chained:  # tarfile: SubsequentHeaderError, a ReadError
                    raise DataImportError(
                        "corrupt_archive", "the archive ends after an extended header"
                    )
                return False
            if header.size < 0:  # tarfile would step backwards and read the same headers again
                raise _unsafe_header(f"a header gives a negative size ({header.size})")
            if header.type in _TAR_LONG_NAMES:
                if header.size > self._limits.max_path_bytes + 1:  # the name and its NUL
                    raise DataImportError(
                        "archive_path_too_long",
                        f"the archive holds a GNU long name of {header.size} bytes; entry paths "
                        f"are limited to {self._limits.max_path_bytes} bytes",
                    )
                self._read(_block(header.size))
                kept += header.size
            elif header.type in _TAR_PAX:
                records = self._read_pax(header)
                if header.type == tarfile.XGLTYPE:  # tarfile keeps them once, copies them to all
                    self._global_records += len(records)
                    self._pax_kept += header.size + _PAX_RECORD_COST * len(records)
                    self._global_size = records.get(b"size", self._global_size)
                else:  # the member's records: the global ones so far, overridden by these
                    local_sizes.append(records.get(b"size", self._global_size))
                    local_records += len(records)
                    kept += header.size
            elif header.type == tarfile.GNUTYPE_SPARSE:
                raise DataImportError("unsupported_archive", "the archive holds a sparse file")
            else:
                self._member(header, local_sizes, kept, local_records)
                return True
        raise _unsafe_header(
            f"more than {_MAX_CHAINED_HEADERS} extended headers in a row before one entry"
        )

    def _member(
        self, header: _TarHeader, local_sizes: list[bytes | None], kept: int, records: int
    ) -> None:
        self._members += 1
        if self._members > self._limits.max_entries:
            raise TooLargeError(
                "archive_too_large", f"the archive has more than {self._limits.max_entries} entries"
            )
        # tarfile applies the innermost local header first, so the outermost size wins.
        given = [size for size in local_sizes if size is not None]
        size = _pax_int(given[0]) if given else header.size
        if size < 0:
            raise _unsafe_header(f"a pax header gives a negative size ({size})")
        if header.has_data:
            self._data_bytes += size
            if self._data_bytes > self._limits.max_total_bytes:
                raise TooLargeError(
                    "archive_too_large",
                    f"the archive expands to more than {self._limits.max_total_bytes} bytes",
                )
            self._skip(_block(size))
        self._pax_kept += kept + _PAX_RECORD_COST * (self._global_records + records)
        budget = _PAX_KEPT_PER_MEMBER * self._members + self._limits.max_header_bytes
        if self._pax_kept > budget:
            raise TooLargeError(
                "archive_header_too_large",
                f"the archive's pax headers would keep more than {budget} bytes for its first "
                f"{self._members} entries (about {_PAX_KEPT_PER_MEMBER} bytes an entry)",
            )

    def _read_pax(self, header: _TarHeader) -> dict[bytes, bytes]:
        if header.size > self._limits.max_header_bytes:
            raise TooLargeError(
                "archive_header_too_large",
                f"the archive holds a pax header of {header.size} bytes, over the limit of "
                f"{self._limits.max_header_bytes} bytes",
            )
        records = _pax_records(self._read(_block(header.size)), header.size)
        if any(keyword.startswith(b"GNU.sparse.") for keyword in records):
            raise DataImportError("unsupported_archive", "the archive holds a sparse file")
        return records

    def _read(self, count: int) -> bytes:
        data = self._stream.read(count)
        if len(data) < count:  # tarfile then finds no header after it: SubsequentHeaderError
            raise DataImportError("corrupt_archive", "the archive ends inside an extended header")
        return data

    def _skip(self, count: int) -> None:
        """Skip member data; tarfile finds a member cut short by the end of the archive."""
        if self._seekable:
            self._stream.seek(count, io.SEEK_CUR)
            return
        while count > 0:
            chunk = self._stream.read(min(count, _SKIP_CHUNK))
            if not chunk:
                return
            count -= len(chunk)


def _pax_records(buffer: bytes, size: int) -> dict[bytes, bytes]:
    """The records of a pax header (`size` bytes, `buffer` padded to whole blocks) by keyword,
    the last of a keyword winning, as tarfile reads them.

    Refused: what makes tarfile's parse of `buffer` super-linear on CPython 3.11.7 (long runs of
    digits: CVE-2024-6232; records whose "=" lies beyond their length, which its pattern then
    seeks through the rest of the header) and anything it would read differently from this
    stricter grammar: "<length> <keyword>=<value>\\n", back to back over all `size` bytes.
    """
    if _PAX_DIGIT_RUN.search(buffer):
        raise _unsafe_header(f"a pax header holds a run of more than {_MAX_PAX_DIGITS} digits")
    most_digits = len(str(len(buffer)))
    records: dict[bytes, bytes] = {}
    position = 0
    # tarfile's parse ends where no record starts, in the padding too.
    while position < len(buffer) and buffer[position] in _ASCII_DIGITS:
        length = _PAX_LENGTH.match(buffer, position, position + most_digits + 1)
        if length is None:
            raise _unsafe_header(
                f"a pax record at byte {position} has no length field of at most "
                f"{most_digits} digits"
            )
        end = position + int(length[1])
        equals = buffer.find(b"=", length.end(), end)
        if end > len(buffer) or buffer[end - 1 : end] != b"\n" or equals <= length.end():
            raise _unsafe_header(f"the pax record at byte {position} is malformed")
        records[buffer[length.end() : equals]] = buffer[equals + 1 : end - 1]
        position = end
    if position < size:
        raise _unsafe_header(f"a pax header has bytes that are no record from byte {position}")
    return records


def _pax_int(value: bytes) -> int:
    """A pax number as tarfile reads it: 0 when it is none."""
    try:
        return int(value.decode("utf-8", "surrogateescape"))
    except ValueError:
        return 0


def _scan_zip_directory(file: IO[bytes], limits: ArchiveLimits) -> bool:
    """Check the central directory that `zipfile` will read and parse whole, record by record,
    without keeping any; False when `file` is no zip.

    The end record is found by zipfile's own locator (64 KiB read at most), so this walks the
    directory zipfile will parse: its size is capped from the limits, then every record counts
    against `max_entries` and its name against `max_path_bytes`.
    """
    end = zipfile._EndRecData(file)  # a private helper, used so both read the same directory
    if not end:
        return False
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > limits.max_entries:
        raise TooLargeError(
            "archive_too_large",
            f"the archive claims {entries} entries, more than {limits.max_entries}",
        )
    most = limits.max_entries * (_ZIP_RECORD.size + limits.max_path_bytes + _ZIP_RECORD_EXTRA)
    if size > most:
        raise TooLargeError(
            "archive_too_large",
            f"the archive's central directory of {size} bytes is larger than {most} bytes",
        )
    # Where zipfile reads it: behind the end records, whatever the offset says (data may precede
    # the archive, as in self-extracting ones).
    start = end[zipfile._ECD_LOCATION] - size
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    if start < 0:
        raise DataImportError("corrupt_archive", "the archive's central directory is misplaced")
    available = min(size, file.seek(0, io.SEEK_END) - start)  # zipfile reads `size` at most
    total = records = 0
    while total < size:
        if total + _ZIP_RECORD.size > available:
            raise DataImportError("corrupt_archive", "the archive's central directory is cut short")
        file.seek(start + total)
        record = _ZIP_RECORD.unpack(file.read(_ZIP_RECORD.size))
        if record[zipfile._CD_SIGNATURE] != _ZIP_SIGNATURE:
            raise DataImportError("corrupt_archive", "the archive's central directory is corrupt")
        records += 1
        if records > limits.max_entries:
            raise TooLargeError(
                "archive_too_large", f"the archive has more than {limits.max_entries} entries"
            )
        extract_version, flags = record[zipfile._CD_EXTRACT_VERSION], record[zipfile._CD_FLAG_BITS]
        name_bytes = record[zipfile._CD_FILENAME_LENGTH]
        if name_bytes > limits.max_path_bytes:
            raise DataImportError(
                "archive_path_too_long",
                f"the archive holds an entry path of {name_bytes} bytes; entry paths are limited "
                f"to {limits.max_path_bytes} bytes",
            )
        if extract_version > zipfile.MAX_EXTRACT_VERSION:  # zipfile: NotImplementedError
            raise DataImportError(
                "unsupported_archive", f"zip version {extract_version / 10:.1f} is not supported"
            )
        if flags & _ZIP_UTF8_NAME:  # zipfile: UnicodeDecodeError
            try:
                file.read(min(name_bytes, available - total - _ZIP_RECORD.size)).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataImportError(
                    "corrupt_archive", f"an entry name is not the UTF-8 it claims: {exc}"
                ) from exc
        total += (
            _ZIP_RECORD.size
            + name_bytes
            + record[zipfile._CD_EXTRA_FIELD_LENGTH]
            + record[zipfile._CD_COMMENT_LENGTH]
        )
    return True


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


def class_folders(paths: Collection[str]) -> list[str] | None:
    """The distinct class folders of image ``paths``, sorted; None when the archive is not
    labelled: an image outside a folder, or fewer than two folders."""
    folders = {_class_folder(path) for path in paths}
    return None if "" in folders or len(folders) < 2 else sorted(folders)


def check_class_folders(folders: Collection[str], model_classes: Sequence[str]) -> None:
    """``unknown_class_folder`` unless every class folder is one of the job's class_names."""
    unknown = sorted(set(folders).difference(model_classes))
    if unknown:
        shown = ", ".join(repr(folder[:50]) for folder in unknown[:5])
        raise DataImportError(
            "unknown_class_folder",
            f"{len(unknown)} class folder(s) are not in the job's class_names: {shown}",
        )


def _class_names(paths: Collection[str], model_classes: Sequence[str] | None) -> list[str] | None:
    """The model's outputs 0, 1, ... by name, as far as the class folders label them; None when
    the archive is not labelled.

    Immediate parent folders are classes when every image has one and there are at least two.
    Which output a folder names (a model reports top-1 near chance when this is wrong):
    - `model_classes` given (the job's `class_names`, the model's output order): its index
      there; a folder not in it is an error;
    - every folder a number (distinct numbers below `MAX_CLASSES`; "7" and "007" alike): that
      number, the convention of datasets labelled 0..N-1 (sorted names would put "10" before
      "2"); outputs no folder names are listed by their number;
    - otherwise the sorted folder names, torchvision's `ImageFolder` convention.
    """
    folders = class_folders(paths)
    if folders is None:
        return None
    if model_classes is not None:
        if len(set(model_classes)) != len(model_classes):
            raise ValueError("class_names must name each class once")
        check_class_folders(folders, model_classes)
        return list(model_classes)
    if all(folder.isascii() and folder.isdigit() for folder in folders):
        by_number = {int(folder): folder for folder in folders}
        if len(by_number) == len(folders) and max(by_number) < MAX_CLASSES:
            return [by_number.get(number, str(number)) for number in range(max(by_number) + 1)]
    return sorted(folders)


def _clipped(name: str) -> str:
    """An entry name for a message: names can be as long as a header allows."""
    return repr(name) if len(name) <= 80 else f"{name[:77]!r}..."


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
        name_bytes = len(entry.name.encode("utf-8", "surrogateescape"))
        if name_bytes > limits.max_path_bytes:
            raise DataImportError(
                "archive_path_too_long",
                f"archive entry {_clipped(entry.name)} has a path of {name_bytes} bytes; entry "
                f"paths are limited to {limits.max_path_bytes} bytes",
            )
        path = _safe_path(entry.name)
        if path is not None and path.count("/") >= limits.max_path_depth:
            raise DataImportError(
                "archive_too_deep",
                f"archive entry {_clipped(entry.name)} lies {path.count('/') + 1} levels deep; "
                f"entry paths are limited to {limits.max_path_depth} levels",
            )
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
        if len(images) == limits.max_images:
            raise TooLargeError(
                "archive_too_large", f"the archive has more than {limits.max_images} images"
            )
        images[path] = entry
    if not images:
        raise DataImportError(
            "no_images", f"the archive holds no {', '.join(IMAGE_SUFFIXES)} files"
        )
    # "a.jpg" and "a.jpg/b.jpg" cannot both be extracted. Each image's folders are looked up
    # among the images: at most max_path_depth lookups of at most max_path_bytes each, bounded
    # above, so this stays linear in the number of images.
    for path in images:
        slash = path.find("/")
        while slash != -1:
            if path[:slash] in images:
                raise _unsafe(path, "lies inside another image's path")
            slash = path.find("/", slash + 1)
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

    def __init__(
        self, reader: _Reader, limits: ArchiveLimits, class_names: Sequence[str] | None = None
    ) -> None:
        self._reader = reader
        self._limits = limits
        self._entries = _validate(reader, limits)
        self.members: list[str] = sorted(self._entries)
        class_names = _class_names(self.members, class_names)
        self.labels: list[int] | None = None  # per member: the model output it shows
        if class_names is not None:
            index = {name: i for i, name in enumerate(class_names)}
            self.labels = [index[_class_folder(member)] for member in self.members]
        self.summary = ArchiveSummary(
            format=reader.format,
            image_count=len(self.members),
            total_bytes=sum(entry.size for entry in self._entries.values()),
            class_names=class_names,
            class_folders=class_folders(self.members),
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
    path: Path, limits: ArchiveLimits = DEFAULT_LIMITS, class_names: Sequence[str] | None = None
) -> Iterator[ImageArchive]:
    """Open and validate an archive (reading only its member list) for reading its images.

    `class_names`: the model's outputs in order (the job's `class_names`), which class folders
    then map to; None for the default mapping (see `_class_names`).
    """
    with _open_reader(path, limits) as reader:
        yield ImageArchive(reader, limits, class_names)


def inspect_archive(
    path: Path, limits: ArchiveLimits = DEFAULT_LIMITS, class_names: Sequence[str] | None = None
) -> ArchiveSummary:
    """Validate an upload from its member list alone, without extracting anything."""
    with open_image_archive(path, limits, class_names) as archive:
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
