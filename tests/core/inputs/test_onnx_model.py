"""ONNX import: both torch exporters' output converts to a trainable module that matches ORT."""

from __future__ import annotations

import copy
import inspect
import io
import json
import random
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from core.errors import ModelImportError
from core.inputs import onnx_model
from core.inputs.onnx_model import ImportedModel, load_onnx_model
from tests.core.inputs.test_images import measure_in_child
from tests.factories import VALID_CONFIG, image_zip
from tests.fixtures_paths import shared_path

INPUT_HW = (16, 16)
NUM_CLASSES = 5


class TinyNet(nn.Module):
    """What trips onnx2torch: BatchNorm, residual add, grouped and depthwise convs, mean pools
    (ReduceMean), view and flatten (Reshape, Flatten), a bias-free Linear (MatMul), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.depthwise = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        )
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.embed = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, NUM_CLASSES)
        # Equal weights: the TorchScript exporter deduplicates them behind an Identity node.
        nn.init.zeros_(self.pointwise.bias)
        nn.init.zeros_(self.grouped.bias)
        for norm in (self.stem[1], self.depthwise[1]):
            for buffer in (norm.weight, norm.bias, norm.running_mean):
                nn.init.uniform_(buffer, -0.5, 0.5)
            nn.init.uniform_(norm.running_var, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.pointwise(torch.relu(self.depthwise(x)))
        x = torch.relu(self.grouped(x))
        gate = torch.sigmoid(x.view(x.size(0), x.size(1), -1).mean(-1))  # squeeze-excitation
        x = x * gate.view(x.size(0), x.size(1), 1, 1)
        x = torch.flatten(x.mean((2, 3), keepdim=True), 1)
        return self.head(torch.relu(self.embed(x)))


@dataclass(frozen=True)
class Export:
    dynamo: bool
    opset: int | None  # None: the exporter's default
    initializers_as_inputs: bool = False

    @property
    def id(self) -> str:
        name = "dynamo" if self.dynamo else "torchscript"
        suffix = "-initializers-as-inputs" if self.initializers_as_inputs else ""
        return f"{name}-opset{self.opset or 'default'}{suffix}"


EXPORTS = [
    Export(dynamo=False, opset=13),
    Export(dynamo=False, opset=13, initializers_as_inputs=True),
    Export(dynamo=False, opset=17),
    Export(dynamo=False, opset=18),
    Export(dynamo=True, opset=18),
    Export(dynamo=True, opset=None),
]


def export_tiny_net(path: Path, spec: Export, *, dynamic_hw: bool = False) -> Path:
    """Export a seeded TinyNet in eval mode with a dynamic batch, as users do."""
    exporter_params = inspect.signature(torch.onnx.export).parameters
    if spec.dynamo and "dynamo" not in exporter_params:
        pytest.skip("this torch has no dynamo ONNX exporter")
    torch.manual_seed(0)
    model = TinyNet().eval()
    sample = torch.randn(2, 3, *INPUT_HW)
    kwargs: dict[str, object] = {"opset_version": spec.opset}
    if spec.dynamo:
        pytest.importorskip("onnxscript")
        kwargs |= {"dynamo": True, "external_data": False, "verbose": False}
        dims = {0: torch.export.Dim("batch")}
        if dynamic_hw:
            dims |= {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
        kwargs["dynamic_shapes"] = (dims,)
    else:
        if "dynamo" in exporter_params:
            kwargs["dynamo"] = False
        axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
        kwargs |= {
            "dynamic_axes": {"input": axes},
            "keep_initializers_as_inputs": spec.initializers_as_inputs,
        }
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (sample,), path, input_names=["input"], output_names=["logits"], **kwargs
        )
    return path


@pytest.fixture(scope="module", params=EXPORTS, ids=lambda spec: spec.id)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec: Export = request.param
    return export_tiny_net(tmp_path_factory.mktemp("export") / f"{spec.id}.onnx", spec)


@pytest.fixture(scope="module")
def torchscript_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torchscript") / "tiny.onnx"
    return export_tiny_net(path, Export(dynamo=False, opset=17))


def write_model(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: tuple[onnx.TensorProto, ...] = (),
    opset: int = 17,
) -> Path:
    """Save a hand-built model for the cases no exporter produces on purpose."""
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
    return path


def image(
    name: str, shape: list[int | str], elem_type: int = TensorProto.FLOAT
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def assert_trainable(imported: ImportedModel) -> None:
    module = imported.module
    assert not module.training
    parameters = list(module.parameters())
    assert parameters
    assert all(p.requires_grad and p.dtype == torch.float32 for p in parameters)


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_exports_contain_what_onnx2torch_rejects(exported: Path) -> None:
    """Guards the point of the other tests: each export exercises a normalisation step."""
    model = onnx.load(exported)
    nodes = model.graph.node
    initializers = {tensor.name for tensor in model.graph.initializer}
    if "dynamo" in exported.name:
        assert opset_of(model) >= 18
        assert any(
            node.op_type == "Reshape"
            and any(a.name == "allowzero" and a.i == 1 for a in node.attribute)
            for node in nodes
        )
    else:
        assert any(n.op_type == "MatMul" and n.input[1] in initializers for n in nodes)
        if "initializers-as-inputs" in exported.name:
            assert len(model.graph.input) > 1
        else:
            assert any(n.op_type == "Identity" and n.input[0] in initializers for n in nodes)
    if opset_of(model) >= 18:
        assert any(n.op_type == "ReduceMean" and len(n.input) == 2 for n in nodes)


def test_export_imports_as_conv_and_linear_modules(exported: Path) -> None:
    imported = load_onnx_model(exported)

    assert imported.input_name == "input"
    assert imported.input_shape == (None, 3, *INPUT_HW)
    assert imported.num_outputs == NUM_CLASSES
    assert imported.opset == opset_of(onnx.load(exported))
    convs = [m for m in imported.module.modules() if isinstance(m, nn.Conv2d)]
    assert sorted(conv.groups for conv in convs) == [1, 1, 2, 8]
    linears = [m for m in imported.module.modules() if isinstance(m, nn.Linear)]
    assert sorted((lin.in_features, lin.out_features) for lin in linears) == [
        (8, NUM_CLASSES),
        (8, 8),
    ]
    assert_trainable(imported)


def test_module_survives_deepcopy_and_a_training_step(exported: Path) -> None:
    original = load_onnx_model(exported).module
    student = copy.deepcopy(original).train()
    batch = torch.randn(4, 3, *INPUT_HW)  # another batch size than the export's
    before = original(batch).detach()

    loss = F.cross_entropy(student(batch), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    torch.optim.SGD(student.parameters(), lr=0.5).step()

    assert not torch.allclose(student(batch), before)
    assert torch.equal(original(batch), before)


def test_dynamic_height_and_width_take_input_size(tmp_path: Path) -> None:
    path = export_tiny_net(tmp_path / "dynamic.onnx", Export(False, 17), dynamic_hw=True)

    imported = load_onnx_model(path, input_size=(24, 20))

    assert imported.input_shape == (None, 3, None, None)
    assert imported.module(torch.randn(1, 3, 24, 20)).shape == (1, NUM_CLASSES)
    with pytest.raises(ModelImportError, match="preprocessing.input_size") as error:
        load_onnx_model(path)
    assert error.value.code == "unsupported_model"


def test_input_size_mismatch(torchscript_model: Path) -> None:
    with pytest.raises(ModelImportError) as error:
        load_onnx_model(torchscript_model, input_size=(32, 32))

    assert error.value.code == "input_shape_mismatch"
    assert error.value.message == (
        "model input is 3x16x16 but preprocessing.input_size is [32, 32]"
    )


def test_matching_input_size_is_accepted(torchscript_model: Path) -> None:
    assert load_onnx_model(torchscript_model, input_size=INPUT_HW).input_shape[2:] == INPUT_HW


def test_wrong_conversion_is_rejected(
    torchscript_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = onnx_model.onnx2torch.convert

    def off_by_half(model: onnx.ModelProto) -> torch.fx.GraphModule:
        module = convert(model)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.mul_(1.5)
        return module

    monkeypatch.setattr(onnx_model.onnx2torch, "convert", off_by_half)
    with pytest.raises(ModelImportError, match="differs from ONNX Runtime") as error:
        load_onnx_model(torchscript_model)
    assert error.value.code == "conversion_mismatch"


def test_resnet20_fixture() -> None:
    path = shared_path("fixtures", "resnet20_cifar10.onnx")

    started = time.perf_counter()
    imported = load_onnx_model(path, input_size=(32, 32))
    elapsed = time.perf_counter() - started

    assert (imported.input_name, imported.input_shape) == ("input", (None, 3, 32, 32))
    assert (imported.num_outputs, imported.opset) == (10, 17)
    modules = list(imported.module.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == 21
    assert [(m.in_features, m.out_features) for m in modules if isinstance(m, nn.Linear)] == [
        (64, 10)
    ]
    assert_trainable(imported)
    student = copy.deepcopy(imported.module).train()
    F.cross_entropy(student(torch.randn(3, 3, 32, 32)), torch.tensor([0, 1, 2])).backward()
    assert elapsed < 30  # a generous bound on a shared CPU; it takes well under a second


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.onnx", b"not really")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content",
    [random.Random(0).randbytes(4096), b"just some text\n" * 20, _zip_bytes(), b""],
    ids=["random-bytes", "text", "zip", "empty"],
)
def test_non_onnx_files_are_invalid(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)

    with pytest.raises(ModelImportError) as error:
        load_onnx_model(path, input_size=(32, 32))

    assert error.value.code == "invalid_model"
    assert error.value.status_code == 422


@pytest.mark.parametrize("location", ["weights.bin", "../../../etc/passwd"])
def test_external_data_is_refused(tmp_path: Path, location: str) -> None:
    weight = onnx.numpy_helper.from_array(torch.ones(8, 3, 1, 1).numpy(), "weight")
    path = write_model(
        tmp_path / "model.onnx",
        [helper.make_node("Conv", ["x", "weight"], ["y"])],
        [image("x", ["N", 3, 4, 4])],
        [image("y", ["N", 8, 4, 4])],
        (weight,),
    )
    model = onnx.load(path)
    tensor = model.graph.initializer[0]
    (tmp_path / "weights.bin").write_bytes(tensor.raw_data)
    onnx.external_data_helper.set_external_data(tensor, location=location)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    path.write_bytes(model.SerializeToString())

    with pytest.raises(ModelImportError, match="external data") as error:
        load_onnx_model(path)
    assert error.value.code == "invalid_model"


def test_initializers_listed_as_inputs_are_not_inputs(tmp_path: Path) -> None:
    weight = onnx.numpy_helper.from_array(torch.randn(4, 3, 1, 1).numpy(), "weight")
    path = write_model(
        tmp_path / "model.onnx",
        [helper.make_node("Conv", ["x", "weight"], ["y"])],
        [image("x", ["N", 3, 8, 8]), image("weight", [4, 3, 1, 1])],
        [image("y", ["N", 4, 8, 8])],
        (weight,),
    )

    imported = load_onnx_model(path)

    assert (imported.input_name, imported.input_shape) == ("x", (None, 3, 8, 8))


@pytest.mark.parametrize(
    ("nodes", "inputs", "outputs", "message"),
    [
        (
            [helper.make_node("Add", ["a", "b"], ["y"])],
            [image("a", [1, 3, 4, 4]), image("b", [1, 3, 4, 4])],
            [image("y", [1, 3, 4, 4])],
            "model has 2 inputs ('a', 'b')",
        ),
        (
            [helper.make_node("Relu", ["x"], ["y"])],
            [image("x", ["N", 1, 28, 28])],
            [image("y", ["N", 1, 28, 28])],
            "input 'x' must be float32 [N, 3, H, W], got float32 [N, 1, 28, 28]",
        ),
        (
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
            [image("x", [1, 3, 4, 4], TensorProto.UINT8)],
            [image("y", [1, 3, 4, 4])],
            "got uint8 [1, 3, 4, 4]",
        ),
        (
            [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
            [image("x", [1, 3, 4, 4])],
            [image("y", [1, 3, 4, 4]), image("z", [1, 3, 4, 4])],
            "model has 2 outputs ('y', 'z')",
        ),
        (
            [helper.make_node("Hardmax", ["x"], ["y"])],
            [image("x", ["N", 3, 8, 8])],
            [image("y", ["N", 3, 8, 8])],
            "cannot be converted to PyTorch: Hardmax",
        ),
    ],
    ids=["two-inputs", "one-channel", "uint8-input", "two-outputs", "unconvertible-op"],
)
def test_unsupported_models(
    tmp_path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    message: str,
) -> None:
    path = write_model(tmp_path / "model.onnx", nodes, inputs, outputs)

    with pytest.raises(ModelImportError) as error:
        load_onnx_model(path)

    assert error.value.code == "unsupported_model"
    assert message in error.value.message


def test_opset_that_cannot_be_lowered(tmp_path: Path) -> None:
    """ReduceMean-18 with computed axes has no opset-17 form (axes must be an attribute)."""
    axes = helper.make_tensor("minus_axes", TensorProto.INT64, [2], [-2, -3])
    path = write_model(
        tmp_path / "model.onnx",
        [
            helper.make_node("Constant", [], ["minus_axes"], value=axes),
            helper.make_node("Neg", ["minus_axes"], ["axes"]),
            helper.make_node("ReduceMean", ["x", "axes"], ["y"]),
        ],
        [image("x", ["N", 3, 8, 8])],
        [image("y", ["N", 3, 1, 1])],
        opset=18,
    )

    with pytest.raises(ModelImportError, match="from opset 18 to opset 17") as error:
        load_onnx_model(path)
    assert error.value.code == "unsupported_model"


def test_fixed_batch_dimension_is_rejected(tmp_path: Path) -> None:
    """Training runs batches of any size; a graph fixed at batch 1 would fail mid-job."""
    path = write_model(
        tmp_path / "model.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [image("x", [1, 3, 4, 4])],
        [image("y", [1, 3, 4, 4])],
    )

    with pytest.raises(ModelImportError) as error:
        load_onnx_model(path)

    assert error.value.code == "fixed_batch_size"
    assert "dynamic batch" in error.value.message


@pytest.mark.parametrize("entry", ["load_onnx_model", "validate_upload"])
def test_huge_static_input_is_refused_before_anything_is_allocated(
    tmp_path: Path, entry: str
) -> None:
    """The issue's model: 140 bytes claiming 3x40000x40000 (a 36 GiB verification batch)."""
    path = write_model(
        tmp_path / "huge.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [image("x", ["N", 3, 40000, 40000])],
        [image("y", ["N", 3, 40000, 40000])],
    )
    config = {key: value for key, value in VALID_CONFIG.items() if key != "preprocessing"}
    if entry == "load_onnx_model":
        setup = "from pathlib import Path; from core.inputs.onnx_model import load_onnx_model"
        call = "load_onnx_model(Path(args[0]))"
    else:
        setup = (
            "from pathlib import Path; import core.inputs.images, core.inputs.onnx_model; "
            "from core.intake import UploadPaths, validate_upload"
        )
        call = (
            "validate_upload(UploadPaths(config_text=args[1], model=Path(args[0]), "
            "data=Path(args[2]), max_dataset_pixels=2**31))"
        )

    run = measure_in_child(
        setup, call, str(path), json.dumps(config), str(image_zip(tmp_path / "data.zip", 1))
    )

    assert path.stat().st_size < 200
    assert (run.code, run.status) == ("input_size_out_of_range", 422)
    assert "model input is 3x40000x40000" in run.message and "8..1024 pixels" in run.message
    assert run.rss_growth < 256 * 2**20
    assert run.seconds < 5


@pytest.mark.parametrize(
    ("shape", "input_size", "message"),
    [
        (["N", 3, 4, 4], None, "model input is 3x4x4; its height and width must lie in 8..1024"),
        (["N", 3, 8, 2048], None, "model input is 3x8x2048"),
        (["N", 3, "H", "W"], (2048, 2048), "preprocessing.input_size is [2048, 2048]"),
        (["N", 3, "H", "W"], (4, 16), "preprocessing.input_size is [4, 16]"),
    ],
    ids=["static-too-small", "static-too-wide", "size-too-large", "size-too-small"],
)
def test_input_size_must_lie_in_the_job_range(
    tmp_path: Path,
    shape: list[int | str],
    input_size: tuple[int, int] | None,
    message: str,
) -> None:
    """The same range as preprocessing.input_size, whether the model or the caller states it."""
    path = write_model(
        tmp_path / "model.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [image("x", shape)],
        [image("y", shape)],
    )

    with pytest.raises(ModelImportError) as error:
        load_onnx_model(path, input_size=input_size)

    assert error.value.code == "input_size_out_of_range"
    assert message in error.value.message
