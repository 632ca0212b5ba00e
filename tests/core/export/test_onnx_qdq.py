"""QDQ ONNX export: graph structure, ``onnx.checker``, and ONNX Runtime-vs-PyTorch parity.

Parity on LSQ students is exact up to float summation order: ONNX Runtime and PyTorch add up a
convolution in different orders, and now and then an activation lands within an ulp of a
rounding boundary of the next quantizer and rounds the other way (one step of that quantizer).
So top-1 agreement is asserted >= 0.97 on 64 images (one flipped image allowed) and the mean
logit difference relative to the logits' size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
import torchvision
from torch import Tensor, nn

from core.config import JobConfig
from core.engine import quant_spec
from core.export import tensorrt_rules
from core.export.onnx_qdq import (
    export_qdq_onnx,
    layer_bits_by_node,
    onnx_parity,
    tensorrt_report,
    write_cpu_variant,
)
from core.inputs.onnx_model import load_onnx_model
from core.sqakd.calibrate import calibrate
from core.sqakd.modules import (
    QuantSpec,
    prepare,
    quant_layers,
    quant_ops,
    quant_pools,
    quantizers,
)
from core.sqakd.quantizers import EWGSQuantizer
from tests.fixtures_paths import shared_path

INPUT_SHAPE = (3, 32, 32)
CASES = {  # id: (method, weight bits, activation bits)
    "lsq-w8a8": ("lsq", 8, 8),
    "lsq-w4a4": ("lsq", 4, 4),
    "lsq-w2a2": ("lsq", 2, 2),
    "ewgs-w4a4": ("ewgs", 4, 4),
    "pact-w4a4": ("pact", 4, 4),
    "dorefa-w4a4": ("dorefa", 4, 4),
    "ste-w4a4": ("ste", 4, 4),
}
MIN_AGREEMENT = 0.97
# of the largest |logit|. Measured <= 0.3% at W4A4 (rare one-step flips; 0.75% for a random
# MobileNetV2 at W8A8, where small steps flip more often); a wrong clip or zero point gives tens
# of %, and ONNX Runtime's own int32 rounding of biases 1-4% at 2-4 bits. The max is only
# reported: one flip in an early 4-bit layer of ResNet-18 moves an image's logits by ~25%.
MAX_MEAN_DIFF = 0.01


class TinyCNN(nn.Module):
    """conv-relu-conv-relu-conv, residual add (signed), average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = h + self.conv3(torch.relu(self.conv2(h)))
        return self.fc(self.pool(h).flatten(1))


@pytest.fixture(autouse=True)
def seeded() -> None:
    """The same randomly initialised teachers in every run."""
    torch.manual_seed(0)


def make_student(teacher: nn.Module, case: str, **spec: Any) -> nn.Module:
    method, weight_bits, activation_bits = CASES[case]
    torch.manual_seed(0)
    quant_spec = QuantSpec(
        method=method, weight_bits=weight_bits, activation_bits=activation_bits, **spec
    )
    student = prepare(teacher, quant_spec)
    calibrate(student, teacher, torch.randn(8, *INPUT_SHAPE))
    return student.eval()


def batches() -> list[Tensor]:
    """64 images in two batches of different sizes: the batch dimension is dynamic."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, *INPUT_SHAPE, generator=generator) for size in (5, 59)]


def settle_batchnorm(model: nn.Module) -> nn.Module:
    """Running statistics from random data, so a randomly initialised network has O(1) logits
    rather than near-ties whose argmax says nothing about parity."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(16, *INPUT_SHAPE, generator=torch.Generator().manual_seed(2)))
    return model.eval()


def check_graph(path: Path, student: nn.Module) -> onnx.ModelProto:
    """checker passes; every Conv/Gemm reads DQ(integer weight) and DQ(Q(activation))."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    assert [value.name for value in graph.input] == ["input"]
    assert [value.name for value in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    producer = {name: node for node in graph.node for name in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    layers = [node for node in graph.node if node.op_type in ("Conv", "Gemm")]
    assert len(layers) == len(list(quant_layers(student)))
    for node in layers:
        weight_dq = producer[node.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        weight = initializers[weight_dq.input[0]]
        assert weight.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        activation_dq = producer[node.input[0]]
        assert activation_dq.op_type == "DequantizeLinear"
        assert producer[activation_dq.input[0]].op_type == "QuantizeLinear"
    # no float weight is left: every initializer of Conv/Gemm rank is integer
    float_weights = [t.name for t in graph.initializer if len(t.dims) >= 2 and t.data_type == 1]
    assert not float_weights
    counts = {
        op: sum(node.op_type == op_type for node in graph.node)
        for op, op_type in (("Q", "QuantizeLinear"), ("DQ", "DequantizeLinear"))
    }
    # one weight DQ per layer; layers that read the same tensor with equal scales share a Q/DQ;
    # a quantized residual add has one on each input, a quantized pooling one
    op_inputs = sum(len(op.input_quantizers) for _, op in quant_ops(student))
    assert 0 < counts["Q"] <= len(layers) + op_inputs
    assert counts["DQ"] == len(layers) + counts["Q"]
    return model


def assert_lsq_parity(parity: dict[str, float], student: nn.Module) -> None:
    with torch.no_grad():
        logit_size = max(float(student(batch).abs().max()) for batch in batches())
    assert parity["images"] == 64
    assert parity["top1_agreement"] >= MIN_AGREEMENT, parity
    assert parity["mean_abs_diff"] <= MAX_MEAN_DIFF * logit_size, (parity, logit_size)


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_cnn(case: str, tmp_path: Path) -> None:
    """Every layer at b bits (no 8-bit first/last): signed and unsigned sub-8-bit inputs."""
    student = make_student(TinyCNN().eval(), case, first_last_bits=None)
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    model = check_graph(path, student)
    _, bits, _ = CASES[case]
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    quantize = [node for node in graph.node if node.op_type == "QuantizeLinear"]
    assert len(quantize) == 4  # conv1, conv2, conv3, fc: distinct inputs
    clipped = [producer.get(node.input[0]) for node in quantize]
    assert all((n is not None and n.op_type == "Clip") == (bits < 8) for n in clipped)
    parity = onnx_parity(student, path, batches())
    print(f"tiny-cnn {case}: {parity}")
    assert_lsq_parity(parity, student)
    assert_weights_exact(model, student)


def assert_weights_exact(model: onnx.ModelProto, student: nn.Module) -> None:
    """The stored integers times the scales are the student's quantized weights, on its grid."""
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # Constant scales
        if node.op_type == "Constant":
            arrays[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    layers = [node for node in graph.node if node.op_type in ("Conv", "Gemm")]
    for node, (_, layer) in zip(layers, quant_layers(student), strict=True):  # graph order
        dq = producer[node.input[1]]
        q, scale = arrays[dq.input[0]], arrays[dq.input[1]]
        grid = layer.weight_quantizer.grid()
        assert q.min() >= (grid.qmin - grid.zero_point).min().item()
        assert q.max() <= (grid.qmax - grid.zero_point).max().item()
        weight = q.astype(np.float32) * scale.reshape(-1, *[1] * (q.ndim - 1))
        expected = layer.quantized_weight().detach().numpy()
        # EWGS computes its levels as lower + k * step in float: zero comes out as ~1e-8
        np.testing.assert_allclose(weight, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_ewgs_with_integer_zero_points_is_exact(tmp_path: Path) -> None:
    """EWGS grids whose lower bound is a whole number of steps export exactly: uint8
    activations with a nonzero zero point, int8 weights holding k - zero_point."""
    student = make_student(TinyCNN().eval(), "ewgs-w4a4", first_last_bits=None)
    with torch.no_grad():
        for quantizer in quantizers(student):
            assert isinstance(quantizer, EWGSQuantizer)
            step = (quantizer.upper - quantizer.lower) / (quantizer.levels - 1)
            quantizer.lower.copy_((quantizer.lower / step).round() * step)
            quantizer.upper.copy_(quantizer.lower + step * (quantizer.levels - 1))
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    check_graph(path, student)
    parity = onnx_parity(student, path, batches())
    print(f"tiny-cnn ewgs-w4a4 integer zero points: {parity}")
    assert_lsq_parity(parity, student)


def test_per_tensor_weights(tmp_path: Path) -> None:
    student = make_student(TinyCNN().eval(), "lsq-w4a4", per_channel=False, first_last_bits=None)
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    model = check_graph(path, student)
    dequantize = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    assert not any(attribute.name == "axis" for n in dequantize for attribute in n.attribute)
    assert_weights_exact(model, student)
    assert_lsq_parity(onnx_parity(student, path, batches()), student)


def test_unsigned_8bit_weight_grid_is_stored_as_uint8(tmp_path: Path) -> None:
    student = make_student(TinyCNN().eval(), "lsq-w8a8")
    layer = student.get_submodule("conv2")
    layer.weight_quantizer.calibrate(layer.weight, signed=False)  # levels 0..255: no int8 fit
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    model = check_graph(path, student)
    types = [t.data_type for t in model.graph.initializer if len(t.dims) >= 2]
    assert sorted(types).count(onnx.TensorProto.UINT8) == 1
    assert_lsq_parity(onnx_parity(student, path, batches()), student)


@pytest.mark.parametrize(
    ("arch", "case"),
    [("resnet18", "lsq-w4a4"), ("mobilenet_v2", "lsq-w4a4")],
)
def test_torchvision(arch: str, case: str, tmp_path: Path) -> None:
    """BatchNorm, max pool, residual adds; mobilenet_v2 adds depthwise convs, ReLU6 and signed
    sub-8-bit inputs (its linear bottlenecks). One case each: calibration costs seconds."""
    teacher = settle_batchnorm(getattr(torchvision.models, arch)(num_classes=10))
    student = make_student(teacher, case)
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    check_graph(path, student)
    parity = onnx_parity(student, path, batches())
    print(f"{arch} {case}: {parity}")
    assert_lsq_parity(parity, student)


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    return load_onnx_model(shared_path("fixtures", "resnet20_cifar10.onnx")).module


@pytest.mark.parametrize("case", list(CASES))
def test_resnet20_fixture(case: str, resnet20: nn.Module, tmp_path: Path) -> None:
    """The onnx2torch-converted fixture: an fx GraphModule of onnx2torch modules."""
    student = make_student(resnet20, case)
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    check_graph(path, student)
    parity = onnx_parity(student, path, batches())
    runtime = onnx_parity(student, path, batches(), disabled_optimizers=())
    print(f"resnet20 {case}: file {parity}, ORT defaults {runtime}")
    assert_lsq_parity(parity, student)


def test_export_leaves_the_student_alone(tmp_path: Path) -> None:
    student = make_student(TinyCNN().eval(), "lsq-w4a4")
    x = torch.randn(2, *INPUT_SHAPE)
    with torch.no_grad():
        before = student(x)
    export_qdq_onnx(student, INPUT_SHAPE, tmp_path / "model_qdq.onnx")
    assert len(list(quant_layers(student))) == 4
    with torch.no_grad():
        assert torch.equal(student(x), before)


def test_rejects_old_opsets_and_float_models(tmp_path: Path) -> None:
    student = make_student(TinyCNN().eval(), "lsq-w8a8")
    with pytest.raises(ValueError, match="opset"):
        export_qdq_onnx(student, INPUT_SHAPE, tmp_path / "a.onnx", opset=11)
    with pytest.raises(ValueError, match="no quantized layers"):
        export_qdq_onnx(TinyCNN(), INPUT_SHAPE, tmp_path / "b.onnx")


def test_tensorrt_report_finds_every_layer_and_names_the_gaps(tmp_path: Path) -> None:
    """The checker runs on the export with each layer's bits. Every activation here is int8
    with zero point 0 (none is 8-bit unsigned); the one rule today's export breaks is the
    residual Add's, which has no Q/DQ. Grids, clips and the per-channel axis hold."""
    student = make_student(TinyCNN().eval(), "lsq-w4a4", layer_bits={"conv3": 2})
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    bits = layer_bits_by_node(student, onnx.load(str(path)))
    assert sorted(bits.values()) == [(2, 2), (4, 4), (8, 8), (8, 8)]
    assert all(name.endswith(("/Conv", "/Gemm")) for name in bits)
    report = tensorrt_report(student, path)
    assert not report["follows_rules"]
    assert [v["rule"] for v in report["violations"]] == ["residual_add"]
    assert report["violation_count"] == len(report["violations"])


@pytest.mark.parametrize("method", ["lsq", "ewgs", "pact", "dorefa", "ste"])
def test_int8_grids_export_w8a8_as_int8_with_zero_point_0(method: str, tmp_path: Path) -> None:
    """W8A8 with ``int8_grids`` and quantized residual adds (what ``export.tensorrt`` asks
    for): every rule holds, every Q/DQ is int8 with zero point 0 (the papers' grids need uint8
    for the unsigned 8-bit inputs after ReLU), weights exact, parity as usual."""
    reports = {}
    for int8 in (False, True):
        teacher = TinyCNN().eval()
        torch.manual_seed(0)
        spec = QuantSpec(
            method=method,
            weight_bits=8,
            activation_bits=8,
            int8_grids=int8,
            residual_bits=8 if int8 else None,
        )
        student = prepare(teacher, spec)
        calibrate(student, teacher, torch.randn(8, *INPUT_SHAPE))
        student.eval()
        path = tmp_path / f"int8-{int8}.onnx"
        export_qdq_onnx(student, INPUT_SHAPE, path)
        reports[int8] = {v["rule"] for v in tensorrt_report(student, path)["violations"]}
        if int8:
            assert_weights_exact(check_graph(path, student), student)
            assert_lsq_parity(onnx_parity(student, path, batches()), student)
    assert reports == {False: {"int8", "residual_add"}, True: set()}


TENSORRT_SPEC = {"int8_grids": True, "residual_bits": 8}  # what ``export.tensorrt`` asks for
CPU_SPEC = {"uint8_grids": True, "residual_bits": 8, "pool_bits": 8}  # ``export.target: cpu``'s


@pytest.mark.parametrize(("target", "expected"), [("tensorrt", TENSORRT_SPEC), ("cpu", CPU_SPEC)])
def test_the_specs_here_are_what_the_targets_ask_for(target: str, expected: dict[str, Any]) -> None:
    spec = quant_spec(JobConfig.model_validate({"export": {"target": target}}))
    fields = ("int8_grids", "uint8_grids", "residual_bits", "pool_bits")
    assert {field: getattr(spec, field) for field in fields if getattr(spec, field)} == expected


@pytest.mark.parametrize(
    ("method", "bits"), [(m, 8) for m in ("lsq", "ewgs", "pact", "dorefa", "ste")] + [("ewgs", 4)]
)
def test_cpu_grids_export_exact_with_every_quantization_from_zero(
    method: str, bits: int, tmp_path: Path
) -> None:
    """The CPU's grids (``export.target: cpu``): in ``model_qdq_cpu.onnx`` every activation is
    quantized with zero point 0, non-negative ones as uint8; at 8 bits each is its type's whole
    range, so no Clip is left, and the residual addition reads Q/DQ on both inputs, and so
    does the pooling. EWGS bounds moved by training keep it so. Both files compute what the
    student does."""
    teacher = TinyCNN().eval()
    spec = QuantSpec(
        method=method, weight_bits=bits, activation_bits=bits, first_last_bits=None, **CPU_SPEC
    )
    student = prepare(teacher, spec)
    calibrate(student, teacher, torch.randn(8, *INPUT_SHAPE))
    student.eval()
    if method == "ewgs":
        with torch.no_grad():
            for quantizer in quantizers(student):
                width = quantizer.upper - quantizer.lower
                quantizer.lower.sub_(0.13 * width)
                quantizer.upper.add_(0.05 * width)
    qdq, cpu = tmp_path / "model_qdq.onnx", tmp_path / "model_qdq_cpu.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, qdq)
    write_cpu_variant(qdq, cpu)
    assert_weights_exact(check_graph(qdq, student), student)
    assert_residual_adds_read_qdq(cpu, adds=1)
    assert pool_input(cpu) == ["DequantizeLinear", "QuantizeLinear", "Add"]
    graph = onnx.load(str(cpu)).graph
    constants = tensorrt_rules.constant_arrays(graph)
    zero_points = [constants[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert not any(zero_point.any() for zero_point in zero_points)
    # the image, ReLU(conv1) (read by conv2 and the addition), ReLU(conv2), conv3's output (the
    # addition's other input), the sum (the pooling's input) and the pooled sum: signed,
    # unsigned, unsigned, signed, signed, signed
    assert [str(zero_point.dtype) for zero_point in zero_points] == [
        "int8", "uint8", "uint8", "int8", "int8", "int8"
    ]  # fmt: skip
    assert sum(n.op_type == "Clip" for n in graph.node) == (0 if bits == 8 else 4)
    session_batches = batches()
    parity = onnx_parity(student, qdq, session_batches)
    assert_lsq_parity(parity, student)
    assert onnx_parity(student, cpu, session_batches) == parity


def pool_input(path: Path) -> list[str]:
    """The ops that compute the average pooling's input, from the pooling back to the first
    that is not a Q/DQ or a ReLU."""
    graph = onnx.load(str(path)).graph
    producer = {name: node for node in graph.node for name in node.output}
    (pool,) = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "AveragePool")]
    chain = [producer[pool.input[0]]]
    while chain[-1].op_type in ("QuantizeLinear", "DequantizeLinear", "Relu"):
        chain.append(producer[chain[-1].input[0]])
    return [node.op_type for node in chain]


def assert_residual_adds_read_qdq(path: Path, adds: int) -> None:
    """Every Add of two computed tensors reads both through DQ(Q(x))."""
    graph = onnx.load(str(path)).graph
    producer = {name: node for node in graph.node for name in node.output}
    residual = [n for n in graph.node if n.op_type == "Add" and all(i in producer for i in n.input)]
    residual = [n for n in residual if all(producer[i].op_type != "Constant" for i in n.input)]
    assert len(residual) == adds
    for node in residual:
        for name in node.input:
            assert producer[name].op_type == "DequantizeLinear"
            assert producer[producer[name].input[0]].op_type == "QuantizeLinear"


@pytest.mark.parametrize("case", ["lsq-w8a8", "lsq-w4a4", "ewgs-w4a4", "pact-w4a4"])
def test_resnet20_fixture_for_tensorrt_follows_every_rule(
    case: str, resnet20: nn.Module, tmp_path: Path
) -> None:
    """The fixture's 9 residual adds get Q/DQ on both inputs; the checker finds nothing."""
    student = make_student(resnet20, case, **TENSORRT_SPEC)
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    check_graph(path, student)
    assert_residual_adds_read_qdq(path, adds=9)
    assert pool_input(path) == ["Relu", "Add"]  # the pooling reads float values, as before
    report = tensorrt_report(student, path)
    assert report["follows_rules"], report["violations"]
    assert_lsq_parity(onnx_parity(student, path, batches()), student)


def test_resnet20_fixture_for_the_cpu_quantizes_the_pooling_input_as_ptq_does(
    resnet20: nn.Module, tmp_path: Path
) -> None:
    """ONNX Runtime's static PTQ of the fixture ends Add -> Q/DQ (uint8) -> GlobalAveragePool;
    so does the W8A8 CPU target's ``model_qdq_cpu.onnx``, whose last ReLU goes (the uint8
    quantization from zero does its work); OpenVINO compiles it as it does PTQ's, and both
    files still compute what the student does. (Other methods: the TinyCNN test above.)"""
    student = make_student(resnet20, "lsq-w8a8", **CPU_SPEC)
    ((_, pool),) = quant_pools(student)
    assert not pool.input_quantizers[0].signed  # the last block's ReLU output
    qdq, cpu = tmp_path / "model_qdq.onnx", tmp_path / "model_qdq_cpu.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, qdq)
    write_cpu_variant(qdq, cpu)
    check_graph(qdq, student)
    assert pool_input(qdq) == ["DequantizeLinear", "QuantizeLinear", "Relu", "Add"]
    assert pool_input(cpu) == ["DequantizeLinear", "QuantizeLinear", "Add"]
    graph = onnx.load(str(cpu)).graph
    constants = tensorrt_rules.constant_arrays(graph)
    producer = {name: node for node in graph.node for name in node.output}
    (gap,) = [n for n in graph.node if n.op_type == "GlobalAveragePool"]
    zero_point = constants[producer[producer[gap.input[0]].input[0]].input[2]]
    assert zero_point.dtype == np.uint8 and not zero_point.any()
    assert not any(n.op_type == "Clip" for n in graph.node)  # 256 levels need none
    # What PTQ's layout buys under OpenVINO: every convolution (the last one with its residual
    # addition) writes 8-bit codes and the pooling reads them; with the pooling input in float,
    # the last convolution wrote float, and its shortcut input was converted to float for it.
    layers = openvino_layers(cpu)
    assert {out for kind, _, out in layers if kind == "Convolution"} <= {"u8", "i8"}
    assert [(read, out) for kind, read, out in layers if kind == "Reduce"] == [("u8", "f32")]
    assert ("Reorder", "u8", "f32") not in layers
    session_batches = batches()
    parity = onnx_parity(student, qdq, session_batches)
    assert_lsq_parity(parity, student)
    assert onnx_parity(student, cpu, session_batches) == parity


def openvino_layers(path: Path) -> list[tuple[str, str, str]]:
    """(layer type, precision it runs in, output precision) of each layer OpenVINO compiles
    ``path`` into for a batch of one, constants left out."""
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape([1, *INPUT_SHAPE])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1})
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind, read, out = (
            info[key].astype(str) for key in ("layerType", "runtimePrecision", "outputPrecisions")
        )
        if kind != "Const":
            layers.append((kind, read, out))
    return layers


def test_torchvision_resnet18_for_tensorrt_follows_every_rule(tmp_path: Path) -> None:
    """Traced by fx: its functional ``out += identity`` adds become quantized ones."""
    teacher = settle_batchnorm(torchvision.models.resnet18(num_classes=10))
    student = make_student(teacher, "lsq-w4a4", **TENSORRT_SPEC)
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    assert_residual_adds_read_qdq(path, adds=8)
    report = tensorrt_report(student, path)
    assert report["follows_rules"], report["violations"]
    assert_lsq_parity(onnx_parity(student, path, batches()), student)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("negative_gain_on_lowest_code", [False, True])
def test_batchnorm_is_folded_into_the_quantized_convolution(
    negative_gain_on_lowest_code: bool, tmp_path: Path
) -> None:
    """Each channel's scale takes BatchNorm's gain; a negative gain negates the codes, which
    the b-bit grid's lowest code (-8 at 4 bits) cannot survive: that BatchNorm stays."""
    teacher = settle_batchnorm(ConvBN())
    with torch.no_grad():
        teacher.bn.weight.copy_(torch.tensor([-0.5, 1.5, 0.7, 1.2]))
    student = make_student(teacher, "lsq-w4a4", first_last_bits=None)
    with torch.no_grad():
        weight = student.conv.weight
        if negative_gain_on_lowest_code:  # channel 0 (negative gain) reaches code -8
            weight[0, 0, 0, 0] = -100.0
        else:  # channel 0's codes shrink to about -1..1
            weight[0].mul_(0.1)
    path = tmp_path / "model_qdq.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, path)
    batchnorms = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    assert len(batchnorms) == int(negative_gain_on_lowest_code)
    rules = {v["rule"] for v in tensorrt_report(student, path)["violations"]}
    assert ("batchnorm" in rules) == negative_gain_on_lowest_code
    assert_lsq_parity(onnx_parity(student, path, batches()), student)


def test_cpu_variant_stores_non_negative_activations_as_uint8_with_the_same_outputs(
    resnet20: nn.Module, tmp_path: Path
) -> None:
    """The TensorRT layout's unsigned grids (0..127 behind a Clip at 0) become uint8, which
    x86 int8 kernels take without a shift; signed ones and the outputs stay as they were. The
    ReLUs before those Clips go (the Clip's lower bound does their work)."""
    student = make_student(resnet20, "lsq-w4a4", **TENSORRT_SPEC)
    qdq, cpu = tmp_path / "model_qdq.onnx", tmp_path / "model_qdq_cpu.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, qdq)
    changed = write_cpu_variant(qdq, cpu)

    def zero_point_types(path: Path) -> dict[str, int]:
        graph = onnx.load(str(path)).graph
        constants = tensorrt_rules.constant_arrays(graph)
        kinds = [
            str(constants[n.input[2]].dtype) for n in graph.node if n.op_type == "QuantizeLinear"
        ]
        return {"uint8": kinds.count("uint8"), "int8": kinds.count("int8")}

    before, after = zero_point_types(qdq), zero_point_types(cpu)
    assert before["uint8"] == 0 and changed > 0
    assert after == {"uint8": changed, "int8": before["int8"] - changed}
    assert after["int8"] > 0  # the signed inputs of the residual additions stay int8

    def relus_into_clips(path: Path) -> tuple[int, int]:
        graph = onnx.load(str(path)).graph
        relus = {n.output[0] for n in graph.node if n.op_type == "Relu"}
        clips = [n for n in graph.node if n.op_type == "Clip"]
        return len(relus), sum(clip.input[0] in relus for clip in clips)

    (relus_before, fed_before), (relus_after, fed_after) = (
        relus_into_clips(qdq),
        relus_into_clips(cpu),
    )
    assert fed_before > 0 and fed_after == 0
    assert relus_after == relus_before - fed_before
    session_batches = batches()
    original = onnx_parity(student, qdq, session_batches)
    variant = onnx_parity(student, cpu, session_batches)
    assert variant == original


def test_cpu_variant_drops_relus_before_uint8_quantization(
    resnet20: nn.Module, tmp_path: Path
) -> None:
    """The papers' 8-bit unsigned grids export as uint8 with zero point 0, which saturates a
    negative value to 0 as the ReLU before it does: the variant drops each ReLU that only such
    quantizations read, keeps the ones that also feed a float addition, and computes the same."""
    student = make_student(resnet20, "lsq-w8a8")  # papers' grids, plain residual additions
    qdq, cpu = tmp_path / "model_qdq.onnx", tmp_path / "model_qdq_cpu.onnx"
    export_qdq_onnx(student, INPUT_SHAPE, qdq)
    write_cpu_variant(qdq, cpu)

    def relus(path: Path) -> tuple[int, int]:
        """(ReLUs read by uint8 quantizations alone, all ReLUs)"""
        graph = onnx.load(str(path)).graph
        constants = tensorrt_rules.constant_arrays(graph)
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        quantized_only = 0
        for relu in (n for n in graph.node if n.op_type == "Relu"):
            users = readers[relu.output[0]]
            quantized_only += all(
                u.op_type == "QuantizeLinear" and constants[u.input[2]].dtype == np.uint8
                for u in users
            )
        return quantized_only, sum(n.op_type == "Relu" for n in graph.node)

    (only_before, all_before), (only_after, all_after) = relus(qdq), relus(cpu)
    # each block's first ReLU, and the outputs of the two blocks before a downsampling one,
    # which its two convolutions alone read
    assert only_before == 9 + 2 and only_after == 0
    assert all_after == all_before - only_before > 0  # block outputs also feed an addition
    session_batches = batches()
    assert onnx_parity(student, cpu, session_batches) == onnx_parity(student, qdq, session_batches)
