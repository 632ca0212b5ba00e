"""Hostile inputs, built by hand where no archiver would write them: tar headers that say what
they are told to, pax records, compressed streams, zip end records and directory records.

Shared by the function-level tests (tests/core/inputs/test_archive_hostile.py) and the tests
that send such uploads to the real service (tests/test_hostile_uploads.py).
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

MiB = 2**20
IMAGE = b"image bytes: inspect_archive reads names and sizes, never pixels"
END = bytes(2 * tarfile.BLOCKSIZE)


def size_field(size: int) -> bytes:
    """A header's 12-byte size: octal, or GNU base-256 (negative too) where octal cannot say it."""
    if 0 <= size < 8**11:
        return b"%011o\0" % size
    if size >= 0:
        return b"\x80" + size.to_bytes(11, "big")
    return b"\xff" + (256**11 + size).to_bytes(11, "big")


def tar_header(name: bytes, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One ustar header block, saying whatever it is told to."""
    header = bytearray(tarfile.BLOCKSIZE)
    header[: min(len(name), 100)] = name[:100]
    header[100:124] = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
    header[124:136] = size_field(size)
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # the checksum counts itself as spaces
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def tar_member(name: bytes, data: bytes = IMAGE, kind: bytes = tarfile.REGTYPE) -> bytes:
    return tar_header(name, len(data), kind) + padded(data)


def pax_record(keyword: bytes, value: bytes) -> bytes:
    """'<length> <keyword>=<value>\\n', the length counting its own digits."""
    rest = b" %s=%s\n" % (keyword, value)
    length = len(rest) + 1
    while len(str(length)) + len(rest) != length:
        length += 1
    return b"%d%s" % (length, rest)


def pax_header(records: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    return tar_header(b"././@PaxHeader", len(records), kind) + padded(records)


def compressed(chunks: Iterable[bytes], compression: str) -> bytes:
    """`chunks` joined, through a streaming compressor ("" for a plain tar)."""
    if not compression:
        return b"".join(chunks)
    compressor: Any = {
        "gz": lambda: zlib.compressobj(9, zlib.DEFLATED, 31),
        "bz2": lambda: bz2.BZ2Compressor(9),
        "xz": lambda: lzma.LZMACompressor(preset=0),
    }[compression]()
    out = io.BytesIO()
    for chunk in chunks:
        out.write(compressor.compress(chunk))
    out.write(compressor.flush())
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def long_name_tar(kind: bytes, name_bytes: int) -> Iterator[bytes]:
    """A GNU long name (or link) record of `name_bytes` that is really there, then a member."""
    yield tar_header(b"././@LongLink", name_bytes, kind)
    chunk = b"a" * MiB
    for _ in range(name_bytes // MiB):
        yield chunk
    yield padded(b"a" * (name_bytes % MiB))
    yield tar_member(b"cls/good.png")
    yield END


def end_records(entries: int, directory_size: int, directory_offset: int) -> bytes:
    """Zip64 end record, its locator, and the classic end record that points to them."""
    zip64_end = struct.pack(
        zipfile.structEndArchive64,
        zipfile.stringEndArchive64,
        44,  # size of the rest of this record
        45,
        45,
        0,
        0,
        entries,
        entries,
        directory_size,
        directory_offset,
    )
    locator = struct.pack(
        zipfile.structEndArchive64Locator,
        zipfile.stringEndArchive64Locator,
        0,
        directory_offset + directory_size,
        1,
    )
    end = struct.pack(
        zipfile.structEndArchive,
        zipfile.stringEndArchive,
        0,
        0,
        0xFFFF,
        0xFFFF,
        0xFFFFFFFF,
        0xFFFFFFFF,
        0,
    )
    return zip64_end + locator + end


def directory_record(name: bytes) -> bytes:
    """A central-directory record of a stored, empty entry."""
    fixed = struct.pack(
        zipfile.structCentralDir,
        zipfile.stringCentralDir,
        20,
        3,
        20,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    return fixed + name


def image_model(height: int | str, width: int | str) -> bytes:
    """A valid ONNX classifier of [batch, 3, height, width] (an int is static, a str dynamic):
    global average pooling, then 10 class scores. Cheap to verify at any size."""
    from onnx import TensorProto, helper, numpy_helper  # only the tests that build models

    weight = numpy_helper.from_array(np.full((10, 3), 0.1, dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
        ],
        "image-model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def png_flood(count: int) -> bytes:
    """``count`` one-pixel PNGs in a zip: a few hundred bytes each, whatever the input size."""
    from PIL import Image

    pixel = io.BytesIO()
    Image.new("RGB", (1, 1)).save(pixel, format="PNG")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"{i}.png", pixel.getvalue())
    return buffer.getvalue()
