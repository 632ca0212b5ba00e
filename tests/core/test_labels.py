"""Labels follow the model ("Hardened intake", point 12): numbered class folders are the outputs
they name, the job's class_names order the rest, and a job whose labels look wrong says so."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from core.config import MAX_CLASSES, JobConfig
from core.errors import DataImportError
from core.inputs.archive import inspect_archive, open_image_archive
from core.inputs.images import load_image_archive
from core.pipeline import JobInputs, SilentReporter, label_warnings, run_quantization
from tests.factories import CLASSES, VALID_CONFIG, export_tiny_cnn, image_zip


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (shade, shade, shade)).save(buffer, "PNG")
    return buffer.getvalue()


def class_zip(path: Path, folders: list[str]) -> Path:
    """One image in each folder, named after it: `<folder>/<folder>.png`."""
    with zipfile.ZipFile(path, "w") as archive:
        for shade, folder in enumerate(folders):
            archive.writestr(f"{folder}/{folder}.png", png(shade))
    return path


def labels_by_folder(path: Path, class_names: list[str] | None = None) -> dict[str, int]:
    with open_image_archive(path, class_names=class_names) as archive:
        assert archive.labels is not None
        folders = [member.partition("/")[0] for member in archive.members]
        return dict(zip(folders, archive.labels, strict=True))


def test_numbered_folders_are_the_outputs_they_name(tmp_path: Path) -> None:
    folders = [str(number) for number in range(12)]  # sorted as text: 0, 1, 10, 11, 2, ...
    path = class_zip(tmp_path / "numbers.zip", folders)

    assert labels_by_folder(path) == {folder: int(folder) for folder in folders}
    assert inspect_archive(path).class_names == folders


@pytest.mark.parametrize(
    ("folders", "labels", "class_names"),
    [
        (["1", "3"], {"1": 1, "3": 3}, ["0", "1", "2", "3"]),  # outputs 0 and 2 have no images
        (["000", "002", "010"], {"000": 0, "002": 2, "010": 10}, None),  # zero-padded
    ],
)
def test_numbered_folders_with_gaps_or_padding(
    tmp_path: Path, folders: list[str], labels: dict[str, int], class_names: list[str] | None
) -> None:
    path = class_zip(tmp_path / "numbers.zip", folders)

    assert labels_by_folder(path) == labels
    names = inspect_archive(path).class_names
    assert names is not None and len(names) == max(labels.values()) + 1
    assert all(names[label] == folder for folder, label in labels.items())
    assert class_names is None or names == class_names


@pytest.mark.parametrize(
    "folders",
    [
        ["2", "10", "cat"],  # not all numbers
        ["7", "07"],  # two folders, one number
        ["1", str(MAX_CLASSES)],  # more outputs than a job can name
        ["٣", "4"],  # a digit, but not an ASCII one
    ],
)
def test_other_folders_are_sorted_by_name(tmp_path: Path, folders: list[str]) -> None:
    path = class_zip(tmp_path / "names.zip", folders)

    assert labels_by_folder(path) == {folder: sorted(folders).index(folder) for folder in folders}


def test_class_names_give_the_order(tmp_path: Path) -> None:
    path = class_zip(tmp_path / "names.zip", ["cat", "dog", "10", "2"])
    model_order = ["dog", "2", "bird", "cat", "10"]

    assert labels_by_folder(path, model_order) == {"dog": 0, "2": 1, "cat": 3, "10": 4}
    assert inspect_archive(path, class_names=model_order).class_names == model_order


def test_folder_missing_from_class_names(tmp_path: Path) -> None:
    path = class_zip(tmp_path / "names.zip", ["cat", "dog", "emu"])

    with pytest.raises(DataImportError) as excinfo:
        inspect_archive(path, class_names=["cat", "dog"])

    assert (excinfo.value.code, excinfo.value.status_code) == ("unknown_class_folder", 422)
    assert "'emu'" in excinfo.value.message


def test_load_image_archive_passes_class_names(tmp_path: Path) -> None:
    path = class_zip(tmp_path / "names.zip", ["cat", "dog"])

    images = load_image_archive(path, (4, 4), class_names=["dog", "cat"])

    assert images.labels is not None and images.labels.tolist() == [1, 0]  # cat/, then dog/
    assert images.class_names == ["dog", "cat"]


@pytest.mark.parametrize(
    "class_names", [["a", "a"], ["a", ""], ["a", "x" * 201], ["a"] * (MAX_CLASSES + 1)]
)
def test_config_class_names_are_validated(class_names: list[str]) -> None:
    with pytest.raises(ValidationError, match="class_names"):
        JobConfig(class_names=class_names)


def test_config_class_names_round_trip() -> None:
    config = JobConfig(class_names=["dog", "cat"])

    assert JobConfig.model_validate(config.model_dump(mode="json")) == config
    assert JobConfig().class_names is None


# ---- the warning


@pytest.mark.parametrize(
    ("teacher_top1", "agreement", "classes", "eval_images", "warns"),
    [
        (0.11, 0.9, 10, 100, True),  # chance is 0.1
        (0.19, 0.5, 10, 50, True),
        (0.20, 0.9, 10, 100, False),  # twice chance: a weak model, not a wrong mapping
        (0.11, 0.9, 10, 49, False),  # too few images to tell
        (0.11, 0.49, 10, 100, False),  # the student does not follow the teacher
        (None, 0.9, 10, 100, False),  # no labels
        (0.45, 0.9, 2, 100, True),  # two classes: under chance itself
        (0.55, 0.9, 2, 100, False),
        (0.0, 0.9, 1, 100, False),  # one class present: no chance to compare with
    ],
)
def test_label_warnings(
    teacher_top1: float | None, agreement: float, classes: int, eval_images: int, warns: bool
) -> None:
    warnings = label_warnings(teacher_top1, agreement, classes, eval_images)

    assert [warning["code"] for warning in warnings] == (["labels_mismatch"] if warns else [])
    assert all("class_names" in warning["message"] for warning in warnings)


# ---- through a job


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory: pytest.TempPathFactory) -> JobInputs:
    tmp = tmp_path_factory.mktemp("labels")
    return JobInputs(export_tiny_cnn(tmp / "teacher.onnx"), image_zip(tmp / "images.zip"))


def run_job(inputs: JobInputs, workdir: Path, **config: Any) -> dict[str, Any]:
    settings = {k: v for k, v in VALID_CONFIG.items() if k != "epochs"}
    job_config = JobConfig.model_validate(
        {**settings, "steps": 1, "export": {"onnx": False}, **config}
    )
    return run_quantization(inputs, job_config, workdir, SilentReporter()).metrics


def test_job_class_names_apply_to_held_out_data(job_inputs: JobInputs, tmp_path: Path) -> None:
    with pytest.raises(DataImportError) as excinfo:
        run_job(job_inputs, tmp_path, class_names=[CLASSES[0], "birds"])

    assert excinfo.value.code == "unknown_class_folder"
    assert repr(CLASSES[1]) in excinfo.value.message


def test_job_class_names_apply_to_eval_data_only(job_inputs: JobInputs, tmp_path: Path) -> None:
    # data's folders (cats, dogs) are not checked when eval_data holds the labels: its are.
    eval_data = class_zip(tmp_path / "eval.zip", ["emus", "owls"])
    inputs = JobInputs(job_inputs.model_path, job_inputs.data_path, eval_data)

    with pytest.raises(DataImportError) as excinfo:
        run_job(inputs, tmp_path / "work", class_names=["emus", "birds"])

    assert excinfo.value.code == "unknown_class_folder"
    assert "'owls'" in excinfo.value.message
