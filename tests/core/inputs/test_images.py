"""Decoding archives to uint8 tensors, splitting, normalising and augmenting them."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from PIL import Image

from core.errors import DataImportError, TooLargeError
from core.inputs.images import (
    ImageSet,
    augment,
    check_pixel_budget,
    load_image_archive,
    normalize,
)
from core.intake import UploadPaths, validate_upload
from core.settings import Settings
from tests.core.inputs.test_archive import KINDS, image_bytes, write_archive
from tests.factories import VALID_CONFIG
from tests.fixtures_paths import shared_path

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_PIXEL_BUDGET: int = Settings.model_fields["max_dataset_pixels"].default


def palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 40, 50, 60] + [0] * 762)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_modes_become_rgb_in_sorted_order(tmp_path: Path, kind: str) -> None:
    files = {
        "set/b/rgba.png": image_bytes("PNG", "RGBA", color=(1, 2, 3, 4)),
        "set/a/gray.png": image_bytes("PNG", "L", color=77),
        "set/b/palette.png": palette_with_transparency(),
        "set/a/deep/er/rgb.webp": image_bytes("WEBP", color=(200, 100, 0)),
        "set/a/photo.JPG": image_bytes("JPEG", color=(90, 160, 220)),
        "set/b/depth16.png": image_bytes("PNG", "I;16", color=40000),
    }
    images = load_image_archive(write_archive(tmp_path / f"upload.{kind}", files), (8, 8))

    # Sorted by path: a/deep/er/rgb.webp, a/gray.png, a/photo.JPG, b/depth16.png, b/palette.png,
    # b/rgba.png.
    assert images.pixels.dtype == torch.uint8
    assert images.pixels.shape == (6, 3, 8, 8)
    colours = images.pixels[:].float().mean(dim=(2, 3))
    expected = torch.tensor(
        [[200, 100, 0], [77, 77, 77], [90, 160, 220], [156] * 3, [40, 50, 60], [1, 2, 3]],
        dtype=torch.float,
    )
    # WebP (lossy by default) and JPEG store YCbCr: a few levels off on solid colours.
    torch.testing.assert_close(colours, expected, atol=3, rtol=0)
    assert images.class_names == ["a", "b", "er"]
    assert images.labels is not None and images.labels.tolist() == [2, 0, 0, 1, 1, 1]


def test_resizes_to_height_width(tmp_path: Path) -> None:
    files = {"wide.png": image_bytes(size=(16, 8), color=(9, 8, 7)), "small.png": image_bytes()}
    images = load_image_archive(write_archive(tmp_path / "upload.zip", files), (4, 6))

    assert images.pixels.shape == (2, 3, 4, 6)
    assert images.pixels[0, :, 0, 0].tolist() == [10, 20, 30]  # small.png sorts first
    assert (images.pixels[1] == torch.tensor([9, 8, 7]).view(3, 1, 1)).all()


def test_flat_archive_is_unlabelled(tmp_path: Path) -> None:
    files = {"1.png": image_bytes(), "2.png": image_bytes()}
    images = load_image_archive(write_archive(tmp_path / "upload.tar", files), (8, 8))

    assert (images.labels, images.class_names) == (None, None)


def test_max_images_takes_the_first_in_sorted_order(tmp_path: Path) -> None:
    files = {f"{c}/{i}.png": image_bytes(color=(i, 0, 0)) for c in "ba" for i in range(3)}
    images = load_image_archive(write_archive(tmp_path / "upload.zip", files), (8, 8), max_images=4)

    assert len(images) == 4
    assert images.pixels[:, 0, 0, 0].tolist() == [0, 1, 2, 0]
    assert images.labels is not None and images.labels.tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize(
    "broken",
    [
        random.Random(0).randbytes(500),
        image_bytes("JPEG")[:100],  # truncated
        image_bytes("GIF"),  # decodable, but not a format we accept
    ],
)
def test_undecodable_image_is_named(tmp_path: Path, broken: bytes) -> None:
    files = {"cls/ok.png": image_bytes(), "cls/broken.jpg": broken}

    with pytest.raises(DataImportError) as excinfo:
        load_image_archive(write_archive(tmp_path / "upload.zip", files), (8, 8))

    assert excinfo.value.code == "bad_image"
    assert "'cls/broken.jpg'" in excinfo.value.message


def test_loading_validates_like_inspecting(tmp_path: Path) -> None:
    files = {"cls/ok.png": image_bytes(), "../evil.png": image_bytes()}

    with pytest.raises(DataImportError) as excinfo:
        load_image_archive(write_archive(tmp_path / "upload.zip", files), (8, 8))

    assert excinfo.value.code == "unsafe_archive_entry"


def make_set(count: int, labelled: bool = True) -> ImageSet:
    pixels = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 2, 2)
    labels = torch.arange(count) % 3 if labelled else None
    return ImageSet(pixels.clone(), labels, ["x", "y", "z"] if labelled else None)


def test_split_is_a_seeded_partition() -> None:
    images = make_set(20)

    train, held_out = images.split(0.25, seed=3)

    assert (len(train), len(held_out)) == (15, 5)
    ids = sorted(train.pixels[:, 0, 0, 0].tolist() + held_out.pixels[:, 0, 0, 0].tolist())
    assert ids == list(range(20))
    assert torch.equal(held_out.labels, held_out.pixels[:, 0, 0, 0].long() % 3)
    assert held_out.class_names == ["x", "y", "z"]
    assert torch.equal(images.split(0.25, seed=3)[1].pixels[:], held_out.pixels[:])
    assert not torch.equal(images.split(0.25, seed=4)[1].pixels[:], held_out.pixels[:])


def test_split_holds_out_at_most_max_held_out_images() -> None:
    """A large upload's 10% would be evaluated three times over: the rest trains instead."""
    images = make_set(20, labelled=False)
    train, held_out = images.split(0.25, seed=3, max_held_out=2)
    assert (len(train), len(held_out)) == (18, 2)
    assert set(held_out.pixels[:, 0, 0, 0].tolist()) < set(
        images.split(0.25, seed=3)[1].pixels[:, 0, 0, 0].tolist()
    )


@pytest.mark.parametrize(("fraction", "sizes"), [(0.01, (4, 1)), (0.99, (1, 4))])
def test_split_keeps_one_image_on_each_side(fraction: float, sizes: tuple[int, int]) -> None:
    train, held_out = make_set(5, labelled=False).split(fraction, seed=0)

    assert (len(train), len(held_out)) == sizes
    assert held_out.labels is None


def test_split_needs_two_images() -> None:
    with pytest.raises(DataImportError) as excinfo:
        make_set(1).split(0.5, seed=0)

    assert excinfo.value.code == "too_few_images"


def test_normalize() -> None:
    batch = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    mean, std = (0.5, 0.2, 0.0), (0.5, 0.1, 2.0)

    out = normalize(batch, mean, std)

    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, 0.0, 0.5]))


def test_normalize_wants_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 3, 2, 2), (0, 0, 0), (1, 1, 1))


def reference_augment(
    image: torch.Tensor, pad: int, top: int, left: int, flip: bool
) -> torch.Tensor:
    height, width = image.shape[1:]
    crop = F.pad(image, (pad, pad, pad, pad))[:, top : top + height, left : left + width]
    return crop.flip(-1) if flip else crop


@pytest.mark.parametrize(("height", "pad"), [(16, 2), (4, 1)])
def test_augment_is_a_padded_crop_and_flip(height: int, pad: int) -> None:
    batch = torch.randint(1, 256, (64, 3, height, height + 3), dtype=torch.uint8)

    out = augment(batch, torch.Generator().manual_seed(0))

    assert out.shape == batch.shape and out.dtype == torch.uint8
    offsets = range(2 * pad + 1)
    used = set()
    for image, result in zip(batch, out, strict=True):
        matches = [
            (top, left, flip)
            for top in offsets
            for left in offsets
            for flip in (False, True)
            if torch.equal(reference_augment(image, pad, top, left, flip), result)
        ]
        assert matches, "every output is one crop of the padded image, maybe flipped"
        used.update(matches)
    assert {flip for _, _, flip in used} == {False, True}
    assert len({(top, left) for top, left, _ in used}) > 3


def test_augment_is_deterministic_given_the_generator() -> None:
    batch = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)

    first = augment(batch, torch.Generator().manual_seed(7))
    again = augment(batch, torch.Generator().manual_seed(7))
    other = augment(batch, torch.Generator().manual_seed(8))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_real_cifar10_images(tmp_path: Path) -> None:
    root = shared_path("data", "cifar10", "train")
    classes = sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    path = tmp_path / "cifar.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in classes:
            for file in sorted((root / name).glob("*.jpg"))[:20]:
                archive.write(file, f"{name}/{file.name}")
    first = sorted((root / classes[0]).glob("*.jpg"))[0]

    images = load_image_archive(path, (32, 32))

    assert images.pixels.shape == (200, 3, 32, 32)
    assert images.class_names == classes and len(classes) == 10
    assert images.labels is not None
    assert images.labels.tolist() == [i for i in range(10) for _ in range(20)]
    with Image.open(first) as image:
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(images.pixels[0], expected)


# The child's half of `measure_in_child`: `setup` and `call` are Python statements, `args` the
# strings they may use. The peak RSS (VmHWM) is reset to the current RSS just before the call
# (Linux's clear_refs), so the imports' own peak cannot hide the call's. The data segment is
# capped 1 GiB above what `setup` mapped, so that a regression fails with MemoryError instead
# of taking a shared machine's memory.
_MEASURED_CHILD = """
import json, resource, sys, time
from core.errors import InputError

def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

setup, call, *args = sys.argv[1:]
exec(setup)
cap = (status_kib("VmData") + 2**20) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
rss_kib = status_kib("VmRSS")
started = time.perf_counter()
answer = {}
try:
    exec(call)
except InputError as exc:
    answer = {"code": exc.code, "status": exc.status_code, "message": exc.message}
answer["seconds"] = time.perf_counter() - started
answer["rss_growth"] = (status_kib("VmHWM") - rss_kib) * 1024
print(json.dumps(answer))
"""


@dataclass(frozen=True)
class Measured:
    """How one call went in a fresh interpreter: its InputError, if any, and what it cost."""

    code: str | None
    status: int | None
    message: str
    seconds: float
    rss_growth: int  # bytes the peak resident set grew by during the call


def measure_in_child(setup: str, call: str, *args: str) -> Measured:
    """Run ``call`` after ``setup`` in a fresh interpreter, where peak RSS is the call's own."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED_CHILD, setup, call, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    return Measured(
        code=answer.get("code"),
        status=answer.get("status"),
        message=answer.get("message", ""),
        seconds=answer["seconds"],
        rss_growth=answer["rss_growth"],
    )


def pooling_classifier(path: Path) -> Path:
    """A model of any input size (dynamic N, H, W): global average pool, three class scores."""
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["y"]),
        ],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def tiny_png_flood(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80,000 one-pixel PNGs in about 12 MB of zip: 252 GB of dataset store at 1024 x 1024."""
    pixel = image_bytes(size=(1, 1))
    files = {f"cls/{index:05d}.png": pixel for index in range(80_000)}
    return write_archive(tmp_path_factory.mktemp("flood") / "flood.zip", files)


@pytest.mark.parametrize("side", ["worker", "upload"])
def test_pixel_budget_refuses_a_flood_of_tiny_images_before_decoding(
    tmp_path: Path, tiny_png_flood: Path, side: str
) -> None:
    """At 1024x1024 the flood would decode to 234 GiB; both sides refuse it in bounded memory."""
    if side == "worker":
        setup = "from pathlib import Path; from core.inputs.images import load_image_archive"
        call = "load_image_archive(Path(args[0]), (1024, 1024), max_pixels=int(args[2]))"
    else:
        # The parsers come preloaded, as in the API's validation children (core.intake.PRELOAD).
        setup = (
            "from pathlib import Path; import core.inputs.images, core.inputs.onnx_model; "
            "from core.intake import UploadPaths, validate_upload"
        )
        call = (
            "validate_upload(UploadPaths(config_text=args[1], model=Path(args[3]), "
            "data=Path(args[0]), max_dataset_pixels=int(args[2])))"
        )
    config = {**VALID_CONFIG, "preprocessing": {"input_size": [1024, 1024]}}
    model = pooling_classifier(tmp_path / "pool.onnx")

    run = measure_in_child(
        setup,
        call,
        str(tiny_png_flood),
        json.dumps(config),
        str(DEFAULT_PIXEL_BUDGET),
        str(model),
    )

    assert tiny_png_flood.stat().st_size < 16 * 2**20
    assert (run.code, run.status) == ("pixel_budget_exceeded", 413)
    assert "80,000 images at input_size 1024x1024" in run.message
    assert f"budget of {DEFAULT_PIXEL_BUDGET:,} pixels" in run.message
    assert run.rss_growth < 256 * 2**20


def test_default_pixel_budget_fits_cifar10_and_imagenet_sized_uploads() -> None:
    check_pixel_budget(50_000, (32, 32), DEFAULT_PIXEL_BUDGET)
    check_pixel_budget(1_000_000, (224, 224), DEFAULT_PIXEL_BUDGET)  # issue 16's cap
    with pytest.raises(TooLargeError):  # 200 GB of uint8 RGB on disk at most
        check_pixel_budget(200 * 10**9 // (3 * 1024 * 1024) + 1, (1024, 1024), DEFAULT_PIXEL_BUDGET)


def test_pixel_budget_is_exact_and_shared_with_images_loaded_before(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "upload.zip", {f"{i}.png": image_bytes() for i in range(4)})

    assert len(load_image_archive(path, (8, 8), max_pixels=4 * 8 * 8)) == 4
    with pytest.raises(TooLargeError) as excinfo:
        # eval_data's 4 images after 1 training image: 5 x 8 x 8 = 320 pixels.
        load_image_archive(path, (8, 8), max_pixels=4 * 8 * 8, images_before=1)

    assert excinfo.value.code == "pixel_budget_exceeded"
    assert "5 images at input_size 8x8 are 320 pixels" in excinfo.value.message
    assert "budget of 256 pixels" in excinfo.value.message


def test_upload_validation_counts_data_and_eval_data_against_the_budget(
    onnx_model: Path, image_archive: Path
) -> None:
    budget = 64 * 16 * 16  # image_archive's 64 images at the tiny model's 16x16
    upload = UploadPaths(
        config_text=json.dumps(VALID_CONFIG),
        model=onnx_model,
        data=image_archive,
        max_dataset_pixels=budget,
    )

    assert validate_upload(upload)["preprocessing"]["input_size"] == [16, 16]
    with pytest.raises(TooLargeError) as excinfo:
        validate_upload(dataclasses.replace(upload, eval_data=image_archive))

    assert excinfo.value.code == "pixel_budget_exceeded"
    assert "128 images at input_size 16x16" in excinfo.value.message
    assert "budget of 16,384 pixels" in excinfo.value.message


def test_augment_of_a_shard_is_the_whole_batch_augment_of_its_rows() -> None:
    """A training process augments its rows of a batch as one process augments the batch."""
    batch = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    whole = augment(batch, torch.Generator().manual_seed(3))
    for rows in (slice(0, 3), slice(3, 7)):
        generator = torch.Generator().manual_seed(3)
        assert torch.equal(augment(batch[rows], generator, rows, len(batch)), whole[rows])
        assert torch.equal(generator.get_state(), _after_whole_batch(batch))


def _after_whole_batch(batch: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    augment(batch, generator)
    return generator.get_state()
