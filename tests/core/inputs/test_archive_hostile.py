"""Hostile archives ("Hardened intake", points 1-3): headers, paths and zip directories that would
make `tarfile` or `zipfile` spend memory or time out of proportion to the upload.

Each archive is built here, by hand where no archiver would write it, and sent to the real
`inspect_archive` in a fresh process that reports the refusal's code, the seconds it took and
its peak RSS growth, under an address-space cap, so that a broken bound fails the test (or the
child) instead of slowing the machine. Measured here with our own passes switched off (tarfile
and zipfile trusted, as before): the 128 MiB long name +210 MB in 1.4 s; the 1,000,000 digits
still running after 40 s; the 60,000 digits accepted after 6.7 s; the short records accepted,
+800 MB; the chain a RecursionError; the global records accepted, +416 MB in 6.7 s; the zip of
a million records +270 MB in 11.5 s; the zip claiming ten million entries accepted.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from core.inputs.archive import DEFAULT_LIMITS, ArchiveLimits, _tar_header, inspect_archive
from tests.hostile_inputs import (
    END,
    IMAGE,
    MiB,
    compressed,
    directory_record,
    end_records,
    long_name_tar,
    padded,
    pax_header,
    pax_record,
    tar_header,
    tar_member,
    write,
)

REPO = Path(__file__).resolve().parents[3]
SECONDS = 5.0  # each refusal takes well under a second here; a quadratic parse takes minutes
RSS_GROWTH = 64 * MiB  # peak RSS growth of the refusing process (the issue asks < 256 MiB)
CHILD_ADDRESS_SPACE = 1024 * MiB  # what the child may map at all (it needs ~40 MiB)

# Runs in a fresh interpreter: imports, then measures one `inspect_archive` call.
CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path

    cap = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from core.errors import InputError
    from core.inputs.archive import ArchiveLimits, inspect_archive

    path, limits = Path(sys.argv[1]), ArchiveLimits(**json.loads(sys.argv[2]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        inspect_archive(path, limits)
        code = status = None
    except InputError as exc:
        code, status = exc.code, exc.status_code
    seconds = time.perf_counter() - start
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux
    print(json.dumps({"code": code, "status": status, "seconds": seconds, "rss_growth": growth}))
    """
)


def inspect_in_child(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """`inspect_archive(path, limits)` in a fresh process: code, status, seconds, rss_growth."""
    arguments = [str(path), json.dumps(asdict(limits)), str(CHILD_ADDRESS_SPACE)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, *arguments],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"inspect_archive({path.name}) ran for more than 60 s")
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    print(f"{path.name}: {path.stat().st_size} bytes -> {result}")  # the figures, with -s
    return result


def assert_refused(
    path: Path, code: str, status: int, limits: ArchiveLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    result = inspect_in_child(path, limits)
    assert (result["code"], result["status"]) == (code, status), result
    assert result["seconds"] < SECONDS, result
    assert result["rss_growth"] < RSS_GROWTH, result
    return result


# ---- tar, by hand


# ---- 1. tar headers


@pytest.mark.parametrize(
    ("compression", "kind"),
    [
        ("gz", tarfile.GNUTYPE_LONGNAME),
        ("bz2", tarfile.GNUTYPE_LONGNAME),
        ("xz", tarfile.GNUTYPE_LONGNAME),
        ("gz", tarfile.GNUTYPE_LONGLINK),
    ],
)
def test_gnu_long_name_is_refused_by_its_size_field(
    tmp_path: Path, compression: str, kind: bytes
) -> None:
    # 128 MiB of name in ~20 KB (xz) to ~130 KB (gz): tarfile alone reads it whole, +310 MiB.
    data = compressed(long_name_tar(kind, 128 * MiB), compression)
    path = write(tmp_path / f"long-{kind.decode()}.tar.{compression}", data)

    assert_refused(path, "archive_path_too_long", 422)


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_pax_header_of_a_million_digits(tmp_path: Path, compression: str) -> None:
    # tarfile 3.11.7 searches it for "<digits> hdrcharset=" in time quadratic in the digits.
    chunks = [pax_header(b"1" * 1_000_000), tar_member(b"cls/good.png"), END]
    path = write(tmp_path / f"digits.tar.{compression}", compressed(chunks, compression))

    assert_refused(path, "archive_header_too_large", 413)


def test_pax_digits_under_the_header_limit(tmp_path: Path) -> None:
    # One well-formed 60 KB record: under max_header_bytes, still seconds of tarfile's regex.
    records = pax_record(b"comment", b"7" * 60_000)
    chunks = [pax_header(records), tar_member(b"cls/good.png"), END]
    path = write(tmp_path / "digits.tar.gz", compressed(chunks, "gz"))

    assert_refused(path, "unsafe_archive_header", 422)


def test_pax_records_shorter_than_their_keyword(tmp_path: Path) -> None:
    # "2 2 2 ... a=b": each record says 2 bytes, so tarfile's pattern rescans up to the one "="
    # for every one of them, quadratic in the header.
    records = b"2 " * 30_000 + b"a=b\n"
    chunks = [pax_header(records), tar_member(b"cls/good.png"), END]
    path = write(tmp_path / "short-records.tar.gz", compressed(chunks, "gz"))

    assert_refused(path, "unsafe_archive_header", 422)


def test_chained_extended_headers(tmp_path: Path) -> None:
    # tarfile recurses once per header before the member: a RecursionError, not an InputError.
    chunks = [pax_header(pax_record(b"comment", b"x"))] * 5_000
    path = write(tmp_path / "chain.tar.gz", compressed([*chunks, tar_member(b"a.png"), END], "gz"))

    assert_refused(path, "unsafe_archive_header", 422)


def test_global_pax_records_copied_into_every_member(tmp_path: Path) -> None:
    # tarfile copies the global records into every member it keeps: 5,000 records (60 KB, under
    # max_header_bytes) x 5,000 members is ~1 GB of dicts from 2.6 MB of tar (~40 KB of .gz).
    records = b"".join(pax_record(b"k%05d" % i, b"v") for i in range(5_000))
    assert len(records) < DEFAULT_LIMITS.max_header_bytes
    members = [tar_member(b"cls/%05d.txt" % i, b"") for i in range(5_000)]
    chunks = [pax_header(records, tarfile.XGLTYPE), *members, tar_member(b"cls/a.png"), END]
    path = write(tmp_path / "global.tar.gz", compressed(chunks, "gz"))

    assert_refused(path, "archive_header_too_large", 413)


def test_negative_size(tmp_path: Path) -> None:
    # tarfile would step back 3 blocks and read the same two members forever (until the entry
    # cap: 1,100,000 entries, seconds).
    chunks = [tar_member(b"a.txt"), tar_member(b"b.txt"), tar_header(b"c.txt", -1536), END]
    path = write(tmp_path / "negative.tar", compressed(chunks, ""))

    assert_refused(path, "unsafe_archive_header", 422)


def test_negative_size_in_a_pax_header(tmp_path: Path) -> None:
    member = tar_member(b"c.txt")
    chunks = [tar_member(b"a.txt"), pax_header(pax_record(b"size", b"-1536")), member, END]
    path = write(tmp_path / "negative-pax.tar", compressed(chunks, ""))

    assert_refused(path, "unsafe_archive_header", 422)


def test_sparse_member(tmp_path: Path) -> None:
    # Old GNU sparse members chain extension blocks that tarfile collects without limit.
    chunks = [tar_member(b"cls/a.png", kind=tarfile.GNUTYPE_SPARSE), END]
    path = write(tmp_path / "sparse.tar", compressed(chunks, ""))

    assert_refused(path, "unsupported_archive", 422)


def test_entry_and_byte_limits_apply_before_tarfile_reads(tmp_path: Path) -> None:
    # A header claiming more data than the total cap (there are none): refused by its size,
    # nothing skipped.
    chunks = [tar_header(b"huge.bin", DEFAULT_LIMITS.max_total_bytes + 1), END]
    path = write(tmp_path / "huge.tar.xz", compressed(chunks, "xz"))

    assert_refused(path, "archive_too_large", 413)


# Archives the header pass must read exactly as tarfile does (its headers, offsets, metadata).


def header_blocks() -> Iterator[bytes]:
    """Header blocks as archivers write them, then mutants of their number and type fields."""
    written = []
    for tar_format in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for name, kind in [("c" * 150 + "/1.png", tarfile.REGTYPE), ("dir/", tarfile.DIRTYPE)]:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, 9 * 2**30 if kind == b"0" else 0, 1.5
            if tar_format == tarfile.USTAR_FORMAT:
                info.name, info.size = "short.png", 3
            raw = info.tobuf(tar_format, "utf-8", "surrogateescape")
            written += [raw[i : i + 512] for i in range(0, len(raw), 512)]
    written += [tar_header(b"v7-folder/", 0, tarfile.AREGTYPE), tar_header(b"n", -5)]
    yield from written
    noise = random.Random(0)
    alphabet = b"0178 \0\x80\xff-_+xo\t\xe9"
    fields = [(100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345)]
    for _ in range(20_000):
        block = bytearray(noise.choice(written))
        for _ in range(noise.randint(1, 3)):
            start, end = noise.choice([*fields, (156, 157), (99, 100)])
            block[noise.randrange(start, end)] = noise.choice(alphabet)
        checksum = 256 + sum(block) - sum(block[148:156])
        if noise.random() < 0.2:  # the signed sum, which tarfile accepts too
            checksum -= 256 * sum(1 for byte in block[:148] + block[156:] if byte >= 128)
        if noise.random() < 0.9:
            block[148:156] = b"%06o\0 " % checksum if checksum >= 0 else b"-%05o\0 " % -checksum
        yield bytes(block)


def test_header_check_finds_headers_where_tarfile_does() -> None:
    # Never stricter than tarfile: where tarfile reads a header the pass did not, nothing bounds it.
    for block in header_blocks():
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            expected = (info.type, info.size)
        except tarfile.HeaderError:
            expected = None
        header = _tar_header(block)
        if header is not None and header.type == tarfile.GNUTYPE_SPARSE:
            continue  # refused whatever tarfile makes of it
        assert (None if header is None else (header.type, header.size)) == expected, block


def test_pax_size_moves_the_next_header_as_in_tarfile(tmp_path: Path) -> None:
    data = b"x" * 3000  # the header says 0 bytes, the pax record 3000: tarfile skips 3000
    chunks = [
        pax_header(pax_record(b"size", b"3000")),
        tar_header(b"cls/a.png", 0) + padded(data),
        pax_header(pax_record(b"comment", b"kept"), tarfile.XGLTYPE),
        tar_member(b"dog/b.png"),
        END,
    ]
    path = write(tmp_path / "pax-size.tar.bz2", compressed(chunks, "bz2"))

    summary = inspect_archive(path)

    assert (summary.image_count, summary.total_bytes) == (2, 3000 + len(IMAGE))


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_archivers_long_names_are_accepted(tmp_path: Path, tar_format: int) -> None:
    names = ["c" * 150 + "/1.png", "dir-é" * 30 + "/2.png"]
    path = tmp_path / "long-names.tar.gz"
    global_headers = (
        {"comment": "git archive writes one"} if tar_format == tarfile.PAX_FORMAT else None
    )
    with tarfile.open(path, "w:gz", format=tar_format, pax_headers=global_headers) as archive:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(IMAGE)
            archive.addfile(info, io.BytesIO(IMAGE))

    assert inspect_archive(path).image_count == 2


# ---- 2. deep paths


def test_sixteen_thousand_component_path_in_a_few_hundred_bytes(tmp_path: Path) -> None:
    name = b"a/" * 16_000 + b"x.png"
    chunks = [tar_header(b"././@LongLink", len(name) + 1, tarfile.GNUTYPE_LONGNAME)]
    chunks += [padded(name + b"\0"), tar_member(b"placeholder"), END]
    path = write(tmp_path / "deep.tar.gz", compressed(chunks, "gz"))
    assert path.stat().st_size < 1000

    assert_refused(path, "archive_path_too_long", 422)


def test_deep_path_through_a_pax_header(tmp_path: Path) -> None:
    # Under max_header_bytes, so tarfile reads it; the path limit refuses the member.
    record = pax_record(b"path", b"a/" * 16_000 + b"x.png")
    chunks = [pax_header(record), tar_member(b"placeholder"), tar_member(b"cls/a.png"), END]
    path = write(tmp_path / "deep-pax.tar.gz", compressed(chunks, "gz"))

    assert_refused(path, "archive_path_too_long", 422)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_path_deeper_than_the_limit(tmp_path: Path, kind: str) -> None:
    deep = "a/" * 40 + "x.png"  # 85 bytes, 41 levels
    path = tmp_path / f"deep.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("cls/good.png", IMAGE)
            archive.writestr(deep, IMAGE)
    else:
        record = pax_record(b"path", deep.encode())
        chunks = [tar_member(b"cls/good.png"), pax_header(record), tar_member(b"placeholder"), END]
        write(path, compressed(chunks, ""))

    assert_refused(path, "archive_too_deep", 422)


def test_paths_at_the_limits_are_accepted(tmp_path: Path) -> None:
    limits = ArchiveLimits()
    at_depth = "/".join(["d"] * (limits.max_path_depth - 1)) + "/1.png"
    at_length = "e" * (limits.max_path_bytes - len("/2.png")) + "/2.png"
    path = tmp_path / "limits.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(at_depth, IMAGE)
        archive.writestr(at_length, IMAGE)

    assert inspect_archive(path, limits).image_count == 2


# ---- 3. zip central directory


def test_zip_end_record_claiming_ten_million_entries(tmp_path: Path) -> None:
    record = directory_record(b"cls/a.png")
    path = write(tmp_path / "claims.zip", record + end_records(10_000_000, len(record), 0))

    assert_refused(path, "archive_too_large", 413)


def test_zip_directory_of_more_records_than_the_entry_cap(tmp_path: Path) -> None:
    # 47 bytes a record on disk, ~360 bytes of ZipInfo each once zipfile parsed it; the end
    # record understates the count, so only walking the directory finds them.
    directory = directory_record(b"a") * (DEFAULT_LIMITS.max_entries + 1)  # 1.1 million
    path = write(tmp_path / "records.zip", directory + end_records(1, len(directory), 0))

    assert_refused(path, "archive_too_large", 413)


def test_zip_directory_larger_than_the_limits_allow(tmp_path: Path) -> None:
    directory = directory_record(b"a") * 10_000
    path = write(tmp_path / "directory.zip", directory + end_records(50, len(directory), 0))

    assert_refused(path, "archive_too_large", 413, ArchiveLimits(max_entries=100))


def test_zip_entry_name_longer_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "long-name.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cls/good.png", IMAGE)
        archive.writestr("cls/" + "n" * 5_000 + ".png", IMAGE)

    assert_refused(path, "archive_path_too_long", 422)
