"""The dataset store: decoded once per (sha256, input size), shared, crash-safe, read in views."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import DataImportError, TooLargeError
from core.housekeeping import delete_unused_dataset_stores
from core.inputs import decode, store
from core.inputs.archive import ArchiveLimits, inspect_archive
from core.inputs.decode import decode_image
from core.inputs.images import ImageSet, load_image_archive
from core.inputs.pixels import PixelView, Prefetcher
from core.inputs.store import HEADER, PIXELS, delete_unused_stores, open_store
from core.settings import Settings
from core.sqakd.trainer import batch_indices
from tests.core.inputs.test_archive import write_archive

REPO_ROOT = Path(__file__).resolve().parents[3]
SIZE = (8, 8)


def noise_jpeg(seed: int, size: tuple[int, int] = (16, 12), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = {f"{'cat' if i % 3 else 'dog'}/{i:03d}.jpg": noise_jpeg(i) for i in range(40)}
    return write_archive(tmp_path_factory.mktemp("store") / "data.zip", files)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels_of(stored: store.StoredImages) -> torch.Tensor:
    return PixelView(stored.file)[:]


def test_a_dataset_is_decoded_once_and_reused(tmp_path: Path, archive: Path) -> None:
    first = open_store(archive, SIZE, store_dir=tmp_path, sha256=sha256(archive))
    folder = tmp_path / store.store_key(sha256(archive), SIZE)
    written = (folder / PIXELS).stat()

    again = open_store(archive, SIZE, store_dir=tmp_path, sha256=sha256(archive))
    other_size = open_store(archive, (4, 4), store_dir=tmp_path, sha256=sha256(archive))

    assert (first.decoded, again.decoded, other_size.decoded) == (True, False, True)
    kept = (folder / PIXELS).stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert torch.equal(pixels_of(first), pixels_of(again))
    private = open_store(archive, SIZE, store_dir=None)  # what a job without a cache decodes
    assert torch.equal(pixels_of(first), pixels_of(private))
    assert again.labels == [0] * 26 + [1] * 14  # sorted paths: cat/..., then dog/...
    assert again.class_names == ["cat", "dog"]
    # The labels follow the job's class order, from the store alone.
    assert (
        open_store(
            archive, SIZE, store_dir=tmp_path, sha256=sha256(archive), class_names=["dog", "cat"]
        ).labels
        == [1] * 26 + [0] * 14
    )
    with pytest.raises(DataImportError) as excinfo:
        open_store(archive, SIZE, store_dir=tmp_path, sha256=sha256(archive), class_names=["x"])
    assert excinfo.value.code == "unknown_class_folder"
    assert sorted(path.name for path in folder.iterdir()) == [HEADER, "lock", PIXELS]


def test_worker_processes_decode_what_this_process_decodes(
    archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = open_store(archive, SIZE, store_dir=None, processes=1)
    monkeypatch.setattr(decode, "IMAGES_PER_PROCESS", 1)  # normally one per 256 images
    pooled = open_store(archive, SIZE, store_dir=None, processes=2)

    assert torch.equal(pixels_of(here), pixels_of(pooled))


def test_a_bad_image_fails_in_a_worker_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"{i:03d}.jpg": noise_jpeg(i) for i in range(8)} | {"004.jpg": b"not a jpeg"}
    path = write_archive(tmp_path / "bad.zip", files)
    monkeypatch.setattr(decode, "IMAGES_PER_PROCESS", 1)
    with pytest.raises(DataImportError) as excinfo:
        open_store(path, SIZE, store_dir=tmp_path / "stores", sha256="0" * 64, processes=2)

    assert excinfo.value.code == "bad_image" and "004.jpg" in excinfo.value.message
    folder = tmp_path / "stores" / store.store_key("0" * 64, SIZE)
    assert sorted(path.name for path in folder.iterdir()) == ["lock"]  # nothing published


# Runs in a fresh interpreter: waits for the go file, then opens the store and prints whether
# it decoded. ``crash`` kills the process (SIGKILL) after the first chunk of its decode.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from core.inputs import store

    archive, store_dir, sha, go, crash = sys.argv[1:]
    if crash == "1":
        real = store.decode_into

        def decode_then_die(rows, chunks, processes):
            real(rows, [next(iter(chunks))], 1)
            os.kill(os.getpid(), signal.SIGKILL)

        store.decode_into = decode_then_die
    while not Path(go).exists():
        time.sleep(0.005)
    opened = store.open_store(Path(archive), (8, 8), store_dir=Path(store_dir), sha256=sha)
    print("decoded" if opened.decoded else "reused", flush=True)
    """
)


def start_child(archive: Path, store_dir: Path, go: Path, crash: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(archive), str(store_dir), sha256(archive), str(go),
         "1" if crash else "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_two_jobs_that_need_one_store_decode_it_once(tmp_path: Path, archive: Path) -> None:
    go = tmp_path / "go"
    children = [start_child(archive, tmp_path / "stores", go) for _ in range(2)]
    time.sleep(0.5)
    go.touch()  # both open the store at once (after their imports)
    outputs = sorted(child.communicate(timeout=120)[0].strip() for child in children)

    assert [child.returncode for child in children] == [0, 0]
    assert outputs == ["decoded", "reused"]
    folder = tmp_path / "stores" / store.store_key(sha256(archive), SIZE)
    assert sorted(path.name for path in folder.iterdir()) == [HEADER, "lock", PIXELS]


def test_a_crashed_decode_is_never_used(tmp_path: Path, archive: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    crashed = start_child(archive, tmp_path / "stores", go, crash=True)
    crashed.communicate(timeout=120)
    folder = tmp_path / "stores" / store.store_key(sha256(archive), SIZE)
    assert crashed.returncode == -9
    assert any(path.suffix == ".tmp" for path in folder.iterdir())  # its half-written rows
    assert not (folder / HEADER).exists()

    reopened = open_store(archive, SIZE, store_dir=tmp_path / "stores", sha256=sha256(archive))

    assert reopened.decoded  # the lock died with the process; the half-decode was discarded
    assert torch.equal(pixels_of(reopened), pixels_of(open_store(archive, SIZE, store_dir=None)))
    assert sorted(path.name for path in folder.iterdir()) == [HEADER, "lock", PIXELS]


def test_a_store_without_its_header_or_cut_short_is_decoded_again(
    tmp_path: Path, archive: Path
) -> None:
    digest = sha256(archive)
    open_store(archive, SIZE, store_dir=tmp_path, sha256=digest)
    folder = tmp_path / store.store_key(digest, SIZE)
    (folder / HEADER).unlink()  # a crash between the pixels' rename and the header's
    assert open_store(archive, SIZE, store_dir=tmp_path, sha256=digest).decoded
    os.truncate(folder / PIXELS, 100)
    assert open_store(archive, SIZE, store_dir=tmp_path, sha256=digest).decoded
    assert not open_store(archive, SIZE, store_dir=tmp_path, sha256=digest).decoded


def test_split_and_subset_are_views_of_the_store(archive: Path) -> None:
    images = load_image_archive(archive, SIZE)
    everything = images.pixels[:]

    train, held_out = images.split(0.25, seed=1)

    assert isinstance(train.pixels, PixelView) and isinstance(held_out.pixels, PixelView)
    assert train.pixels.source is images.pixels.source  # the same file: no pixels copied
    assert len(train) + len(held_out) == 40
    rows = torch.tensor([2, 0, 5])
    assert torch.equal(held_out.pixels[rows], held_out.pixels[:][rows])
    assert torch.equal(train.subset(rows).pixels[:], train.pixels[:][rows])
    # every row of the split is a row of the archive, with its label
    for pixels, labels in ((train.pixels[:], train.labels), (held_out.pixels[:], held_out.labels)):
        for row, label in zip(pixels, labels, strict=True):
            index = next(i for i in range(40) if torch.equal(everything[i], row))
            assert label == images.labels[index]


def test_a_tensor_set_is_split_into_views_that_share_its_memory() -> None:
    pixels = torch.zeros((10, 3, 2, 2), dtype=torch.uint8)
    _, held_out = ImageSet(pixels, None, None).split(0.2, seed=0)

    pixels += 7  # seen through the view: it shares the tensor's memory

    assert held_out.pixels[:].unique().tolist() == [7]
    assert held_out.pixels[0, :, 0, 0].tolist() == [7, 7, 7]
    assert held_out.pixels.shape == (2, 3, 2, 2) and held_out.pixels.dtype == torch.uint8


def test_prefetcher_yields_the_batches_in_order_and_raises_errors() -> None:
    pixels = PixelView.of_tensor(torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8))
    expected = [next(order) for order in [batch_indices(50, 8, seed=3, start=5)] for _ in range(9)]
    fetched = list(Prefetcher(pixels, iter(expected), depth=2))

    assert [epoch for epoch, _, _ in fetched] == [epoch for epoch, _ in expected]
    for (_, indices, rows), (_, wanted) in zip(fetched, expected, strict=True):
        assert torch.equal(indices, wanted) and torch.equal(rows, pixels[wanted])

    def broken() -> object:
        yield 0, torch.tensor([1])
        raise RuntimeError("disk gone")

    prefetcher = Prefetcher(pixels, broken())  # type: ignore[arg-type]
    assert next(prefetcher)[0] == 0
    with pytest.raises(RuntimeError, match="disk gone"):
        next(prefetcher)
    prefetcher.close()


def resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if "VmRSS" in line)


def test_reading_a_store_keeps_no_rows_resident(tmp_path: Path) -> None:
    """Rows are read into buffers of their own: the file's pages stay in the page cache, out of
    the process's resident memory (a memory map would keep 2 MiB per touched row here)."""
    path = tmp_path / PIXELS
    shape = (2048, 3, 64, 128)  # 48 MiB
    path.write_bytes(os.urandom(int(np.prod(shape))))
    view = PixelView(store.StoreFile(path, shape, lock=None))
    before = resident_bytes()

    checksum = sum(int(view[start : start + 64][:, 0, 0, 0].sum()) for start in range(0, 2048, 64))
    for indices in torch.randperm(len(view)).split(64):  # and in random batches, as training
        rows = view[indices]
        assert torch.equal(rows[0], view[int(indices[0])])

    assert resident_bytes() - before < 16 * 2**20
    assert checksum == int(view[:][:, 0, 0, 0].sum())  # what it read was the file


def test_draft_decoding_of_a_large_jpeg_stays_close_to_the_full_decode() -> None:
    yy, xx = np.mgrid[0:512, 0:640]
    smooth = np.stack([xx * 255 // 640, yy * 255 // 512, (xx + yy) * 255 // 1152], -1)
    buffer = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8)).save(buffer, "JPEG", quality=95)
    gray = noise_jpeg(0, (300, 300), mode="L")

    drafted = decode_image(buffer.getvalue(), (64, 48)).astype(int)
    full = decode_image(buffer.getvalue(), (64, 48), draft=False).astype(int)

    assert drafted.shape == full.shape == (48, 64, 3)
    assert np.abs(drafted - full).mean() < 2
    assert decode_image(gray, (32, 32)).shape == (32, 32, 3)  # a grayscale JPEG, drafted too


def test_housekeeping_deletes_unused_stores_that_no_job_holds(
    tmp_path: Path, archive: Path
) -> None:
    digest = sha256(archive)
    held = open_store(archive, SIZE, store_dir=tmp_path, sha256=digest)
    open_store(archive, (4, 4), store_dir=tmp_path, sha256=digest).file.close()
    open_store(archive, (6, 6), store_dir=tmp_path, sha256=digest).file.close()
    later = time.time() + 3600

    assert delete_unused_stores(tmp_path, 7200, now=later) == 0  # used within the last 2 hours
    assert delete_unused_stores(tmp_path, 60, now=later) == 2  # not the one a job holds
    assert [path.name for path in tmp_path.iterdir()] == [store.store_key(digest, SIZE)]
    held.file.close()
    assert delete_unused_stores(tmp_path, 60, now=later) == 1
    assert open_store(archive, SIZE, store_dir=tmp_path, sha256=digest).decoded


def test_housekeeping_deletes_stores_unused_for_the_configured_days(
    tmp_path: Path, archive: Path
) -> None:
    settings = Settings(data_dir=tmp_path, dataset_store_days=7)
    digest = sha256(archive)
    open_store(archive, SIZE, store_dir=settings.dataset_stores, sha256=digest).file.close()
    folder = settings.dataset_stores / store.store_key(digest, SIZE)

    assert delete_unused_dataset_stores(settings) == 0
    eight_days_ago = time.time() - 8 * 86400
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (eight_days_ago, eight_days_ago))
    assert delete_unused_dataset_stores(settings) == 1
    assert not folder.exists()


def age(folder: Path, seconds_ago: float) -> None:
    """Make ``folder``'s store look last used ``seconds_ago``."""
    then = time.time() - seconds_ago
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (then, then))


def test_a_decode_deletes_the_least_recently_used_unheld_stores_to_fit_the_cap(
    tmp_path: Path, archive: Path
) -> None:
    """DATASET_STORE_MAX_BYTES: the oldest stores no job holds go first, only as many as the
    new store needs; a store a job holds stays even when the cap cannot be met."""
    digest = sha256(archive)
    held = load_image_archive(archive, (6, 6), store_dir=tmp_path, sha256=digest)
    for size, seconds_ago in [((7, 7), 300), ((8, 8), 200)]:
        load_image_archive(archive, size, store_dir=tmp_path, sha256=digest).pixels.source.close()
        age(tmp_path / store.store_key(digest, size), seconds_ago)
    folders = {size: tmp_path / store.store_key(digest, size) for size in [(6, 6), (7, 7), (8, 8)]}
    disk = {size: store._disk_bytes(folder) for size, folder in folders.items()}
    new_store = 40 * 3 * 9 * 9
    # Room for the new store after deleting (7, 7), the least recently used one, alone.
    cap = disk[(6, 6)] + disk[(8, 8)] + new_store

    load_image_archive(archive, (9, 9), store_dir=tmp_path, sha256=digest, max_store_bytes=cap)

    assert not folders[(7, 7)].exists() and folders[(8, 8)].exists()
    # A cap below what a held store takes: every unheld store goes, the held one and the new one
    # stay, and the job goes on.
    loaded = load_image_archive(
        archive, (5, 5), store_dir=tmp_path, sha256=digest, max_store_bytes=1
    )

    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        store.store_key(digest, size) for size in [(5, 5), (6, 6)]
    )
    assert torch.equal(held.pixels[:], load_image_archive(archive, (6, 6)).pixels[:])
    assert len(loaded) == 40
    held.pixels.source.close()


def test_a_decode_that_would_not_fit_on_the_disk_deletes_unused_stores_first(
    tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a cap: an unused store is worth less than a job that fails for want of disk."""
    digest = sha256(archive)
    open_store(archive, (6, 6), store_dir=tmp_path, sha256=digest).file.close()
    held = open_store(archive, (7, 7), store_dir=tmp_path, sha256=digest)
    full_disk = shutil.disk_usage(tmp_path)._replace(free=0)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: full_disk)

    assert open_store(archive, SIZE, store_dir=tmp_path, sha256=digest).decoded

    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        store.store_key(digest, size) for size in [(7, 7), SIZE]
    )
    held.file.close()


def test_the_archive_image_cap_counts_images_not_other_entries(tmp_path: Path) -> None:
    files = {f"{i}.jpg": noise_jpeg(i) for i in range(3)} | {"README.txt": b"notes"}
    path = write_archive(tmp_path / "three.zip", files)

    assert inspect_archive(path, ArchiveLimits(max_images=3)).image_count == 3
    with pytest.raises(TooLargeError, match="more than 2 images"):
        inspect_archive(path, ArchiveLimits(max_images=2))
