"""The demo's own inputs: digits archives and a teacher the service accepts (the service itself is
covered by the end-to-end tests)."""

from __future__ import annotations

import pytest

from core.inputs.archive import inspect_archive
from core.inputs.onnx_model import load_onnx_model
from scripts import demo

DIGITS = [str(digit) for digit in range(10)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoInputs:
    return demo.make_inputs(tmp_path_factory.mktemp("demo-inputs"))


def test_archives_hold_every_digit_in_class_folders(inputs: demo.DemoInputs) -> None:
    data, eval_data = inspect_archive(inputs.data), inspect_archive(inputs.eval_data)

    assert data.class_names == DIGITS and eval_data.class_names == DIGITS
    assert data.image_count + eval_data.image_count == 1797  # scikit-learn's digits
    assert eval_data.image_count == len(inputs.held_out) > 0


def test_teacher_learns_the_digits(inputs: demo.DemoInputs) -> None:
    assert inputs.teacher_top1 >= 0.8


def test_service_imports_the_teacher_and_onnx_runtime_agrees(inputs: demo.DemoInputs) -> None:
    imported = load_onnx_model(inputs.model, input_size=demo.INPUT_SIZE)  # verifies vs ORT

    assert imported.input_name == "input"
    assert imported.input_shape[0] is None  # dynamic batch
    assert imported.num_outputs == 10
    onnx_top1 = demo.onnx_top1(inputs.model, inputs.held_out, inputs.mean, inputs.std)
    assert onnx_top1 == pytest.approx(inputs.teacher_top1, abs=0.01)


def test_embedded_env_drops_the_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere/db")
    monkeypatch.setenv("sqakd_data_dir", "/elsewhere")
    monkeypatch.setenv("DEMO_UNRELATED", "kept")

    env = demo.embedded_env()

    assert "DATABASE_URL" not in env and "sqakd_data_dir" not in env
    assert env["DEMO_UNRELATED"] == "kept"


def test_demo_output_is_ignored_by_git() -> None:
    gitignore = (demo.REPO_ROOT / ".gitignore").read_text().split()
    assert f"{demo.DEMO_DIR.relative_to(demo.REPO_ROOT)}/" in gitignore
