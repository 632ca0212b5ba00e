"""Safe archive reading: formats, class folders, hostile entries, limits, extraction."""

from __future__ import annotations

import io
import random
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from core.errors import DataImportError, InputError, TooLargeError
from core.inputs.archive import (
    IMAGE_SUFFIXES,
    ArchiveLimits,
    _CappedStream,
    extract_images,
    inspect_archive,
)

# Archive kinds by the file name they are written under; the reader never looks at the name.
KINDS = ("zip", "tar", "tar.gz", "tgz")


def image_bytes(
    fmt: str = "PNG",
    mode: str = "RGB",
    size: tuple[int, int] = (8, 8),
    color: int | tuple[int, ...] = (10, 20, 30),
) -> bytes:
    """An encoded solid image; `size` is PIL's (W, H)."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    """Write `files` (name -> bytes; names ending in "/" are folders), zip or tar by suffix."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return path
    mode = "w:gz" if path.name.endswith(("gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def write_tar_member(path: Path, info: tarfile.TarInfo) -> Path:
    """A tar holding one good image and `info` (a link or special file, no data)."""
    good = image_bytes()
    with tarfile.open(path, "w") as archive:
        image = tarfile.TarInfo("cls/good.png")
        image.size = len(good)
        archive.addfile(image, io.BytesIO(good))
        archive.addfile(info)
    return path


def patch_zip_central(path: Path, offset: int, fmt: str, value: int) -> None:
    """Overwrite one field of the first central-directory header (offset from its signature)."""
    data = bytearray(path.read_bytes())
    header = data.index(b"PK\x01\x02")
    struct.pack_into(fmt, data, header + offset, value)
    path.write_bytes(bytes(data))


def code_of(excinfo: pytest.ExceptionInfo[InputError]) -> str:
    return excinfo.value.code


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_finds_images_at_any_depth(tmp_path: Path, kind: str) -> None:
    files = {
        "data/": b"",
        "data/x/c/one.jpg": image_bytes("JPEG"),
        "data/x/d/two.PNG": image_bytes("PNG", "L", color=7),
        "data/e/three.webp": image_bytes("WEBP"),
        "data/e/four.JPEG": image_bytes("JPEG", size=(5, 3)),
        "data/readme.txt": b"not an image",
    }
    summary = inspect_archive(write_archive(tmp_path / f"upload.{kind}", files))

    assert summary.format == ("zip" if kind == "zip" else "tar")
    assert summary.image_count == 4
    images = [data for name, data in files.items() if name.lower().endswith(IMAGE_SUFFIXES)]
    assert summary.total_bytes == sum(map(len, images))
    assert summary.class_names == ["c", "d", "e"]


@pytest.mark.parametrize(("written_as", "read_as"), [("zip", "tar.gz"), ("tar", "zip")])
def test_format_comes_from_content_not_name(tmp_path: Path, written_as: str, read_as: str) -> None:
    path = write_archive(tmp_path / f"upload.{written_as}", {"a.png": image_bytes()})
    renamed = path.rename(tmp_path / f"upload.{read_as}")

    assert inspect_archive(renamed).format == written_as


@pytest.mark.parametrize(
    ("names", "class_names"),
    [
        (["cat/1.png", "dog/2.png", "dog/3.png"], ["cat", "dog"]),
        (["root/train/cat/1.png", "root/train/dog/2.png"], ["cat", "dog"]),
        (["1.png", "2.png"], None),  # flat
        (["1.png", "cat/2.png", "dog/3.png"], None),  # not every image has a folder
        (["cat/1.png", "cat/2.png"], None),  # one folder is no classification
    ],
)
def test_class_names_from_immediate_parent_folders(
    tmp_path: Path, names: list[str], class_names: list[str] | None
) -> None:
    path = write_archive(tmp_path / "upload.zip", {name: image_bytes() for name in names})

    assert inspect_archive(path).class_names == class_names


def test_macos_junk_and_hidden_files_are_not_images(tmp_path: Path) -> None:
    junk = ["__MACOSX/cat/._1.png", "cat/._1.png", "cat/.hidden.png", ".thumbs/dog/2.png"]
    files = {name: image_bytes() for name in ["cat/1.png", "dog/2.png", *junk]}
    files["cat/.DS_Store"] = b"\0"

    summary = inspect_archive(write_archive(tmp_path / "upload.zip", files))

    assert (summary.image_count, summary.class_names) == (2, ["cat", "dog"])


UNSAFE_NAMES = [
    "../evil.jpg",
    "cls/../../evil.jpg",
    "/abs/evil.jpg",
    "C:/evil.jpg",
    "c:evil.jpg",
    "..\\evil.jpg",
    "cls\\..\\..\\evil.jpg",
    "notes/../../evil.txt",  # not an image: still refuses the whole archive
]


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_entry_names_refuse_the_archive(tmp_path: Path, kind: str, name: str) -> None:
    files = {"cls/good.png": image_bytes(), name: image_bytes()}
    path = write_archive(tmp_path / f"upload.{kind}", files)

    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(path)

    assert code_of(excinfo) == "unsafe_archive_entry"
    assert repr(name) in excinfo.value.message


@pytest.mark.parametrize(
    ("type_", "linkname"),
    [
        (tarfile.SYMTYPE, "/etc/passwd"),
        (tarfile.SYMTYPE, "good.png"),  # even pointing inside the archive
        (tarfile.LNKTYPE, "cls/good.png"),
        (tarfile.CHRTYPE, ""),
        (tarfile.FIFOTYPE, ""),
    ],
)
def test_tar_links_and_special_files_refuse_the_archive(
    tmp_path: Path, type_: bytes, linkname: str
) -> None:
    info = tarfile.TarInfo("cls/link.png")
    info.type, info.linkname = type_, linkname
    path = write_tar_member(tmp_path / "upload.tar", info)

    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(path)

    assert code_of(excinfo) == "unsafe_archive_entry"
    assert "'cls/link.png'" in excinfo.value.message


def test_zip_symlink_entry_refuses_the_archive(tmp_path: Path) -> None:
    path = tmp_path / "upload.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cls/good.png", image_bytes())
        link = zipfile.ZipInfo("cls/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")

    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(path)

    assert code_of(excinfo) == "unsafe_archive_entry"


def test_duplicate_image_path_refuses_the_archive(tmp_path: Path) -> None:
    path = tmp_path / "upload.tar"
    with tarfile.open(path, "w") as archive:
        for name in ("cls/a.png", "./cls//a.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"abc"))

    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(path)

    assert code_of(excinfo) == "unsafe_archive_entry"


@pytest.mark.parametrize(
    "files",
    [
        {"notes.txt": b"hello", "more/notes.md": b"# hi"},
        {"__MACOSX/._a.png": image_bytes(), "empty/": b""},
    ],
)
def test_archive_without_images(tmp_path: Path, files: dict[str, bytes]) -> None:
    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(write_archive(tmp_path / "upload.zip", files))

    assert code_of(excinfo) == "no_images"


@pytest.mark.parametrize(
    "content",
    [
        random.Random(0).randbytes(10_000),
        b"just some text\n" * 100,
        image_bytes(),  # an image is not an archive of images
        b"",
    ],
)
def test_not_an_archive(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "upload.zip"
    path.write_bytes(content)

    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(path)

    assert code_of(excinfo) == "unsupported_archive"


def test_encrypted_zip_entry_is_unsupported(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "upload.zip", {"cls/a.png": image_bytes()})
    patch_zip_central(path, 8, "<H", 0x1)  # general-purpose flags: encrypted

    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(path)

    assert code_of(excinfo) == "unsupported_archive"


def test_truncated_archive_is_corrupt(tmp_path: Path) -> None:
    noise = random.Random(0)  # incompressible, so truncation cuts into later members
    files = {f"cls/{i}.png": noise.randbytes(20_000) for i in range(5)}
    path = write_archive(tmp_path / "upload.tar.gz", files)
    path.write_bytes(path.read_bytes()[:50_000])

    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(path)

    assert code_of(excinfo) == "corrupt_archive"


@pytest.mark.parametrize(
    "limits",
    [
        ArchiveLimits(max_entries=3),  # the directory entry counts too
        ArchiveLimits(max_total_bytes=100),
        ArchiveLimits(max_entry_bytes=50),
    ],
)
def test_limits(tmp_path: Path, limits: ArchiveLimits) -> None:
    files = {"cls/": b"", "cls/a.png": b"a" * 60, "cls/b.png": b"b" * 40, "cls/c.txt": b"c" * 40}
    path = write_archive(tmp_path / "upload.tar", files)

    with pytest.raises(TooLargeError) as excinfo:
        inspect_archive(path, limits)

    assert (code_of(excinfo), excinfo.value.status_code) == ("archive_too_large", 413)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ArchiveLimits(max_entries=0)


@pytest.mark.parametrize("kind", KINDS)
def test_extract_writes_only_images(tmp_path: Path, kind: str) -> None:
    files = {
        "x/cat/1.png": image_bytes("PNG"),
        "x/dog/deep/er/2.jpg": image_bytes("JPEG"),
        "x/notes.txt": b"skip me",
        "__MACOSX/x/._1.png": b"junk",
    }
    path = write_archive(tmp_path / f"upload.{kind}", files)
    dest = tmp_path / "out"

    paths = extract_images(path, dest)

    assert paths == [dest / "x/cat/1.png", dest / "x/dog/deep/er/2.jpg"]
    assert all(p.read_bytes() == files[str(p.relative_to(dest))] for p in paths)
    assert sorted(p for p in dest.rglob("*") if p.is_file()) == paths


def test_extract_validates_before_writing(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "upload.zip", {"ok/a.png": image_bytes(), "../evil.png": b""})
    dest = tmp_path / "out"

    with pytest.raises(DataImportError) as excinfo:
        extract_images(path, dest)

    assert code_of(excinfo) == "unsafe_archive_entry"
    assert not dest.exists() and not (tmp_path / "evil.png").exists()


def test_extract_refuses_symlinks_already_in_dest(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "upload.tar", {"cls/a.png": image_bytes()})
    dest, outside = tmp_path / "out", tmp_path / "elsewhere"
    outside.mkdir()
    dest.mkdir()
    (dest / "cls").symlink_to(outside)

    with pytest.raises(DataImportError) as excinfo:
        extract_images(path, dest)

    assert code_of(excinfo) == "unsafe_archive_entry"
    assert not any(outside.iterdir())


def test_extract_entry_whose_header_understates_its_size(tmp_path: Path) -> None:
    content = random.Random(0).randbytes(5_000)
    path = tmp_path / "upload.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("cls/a.png", content)
    patch_zip_central(path, 24, "<I", 100)  # uncompressed size: 100 bytes, it says
    dest = tmp_path / "out"

    assert inspect_archive(path).total_bytes == 100
    with pytest.raises(InputError) as excinfo:
        extract_images(path, dest)

    assert code_of(excinfo) in {"corrupt_archive", "archive_too_large"}
    assert (dest / "cls/a.png").stat().st_size <= 100


def test_capped_stream_stops_at_its_cap_whatever_the_header() -> None:
    stream = _CappedStream(io.BytesIO(b"x" * 1000), "cls/a.png", cap=999)

    with pytest.raises(TooLargeError) as excinfo:
        stream.read()

    assert code_of(excinfo) == "archive_too_large"
    assert "'cls/a.png'" in excinfo.value.message
