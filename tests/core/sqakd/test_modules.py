"""The Conv2d/Linear swap: every layer quantized, reversible, sharing Parameters, bits per layer."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from core.sqakd.modules import (
    QUANT_MODULES,
    QuantAdd,
    QuantConv2d,
    QuantLinear,
    QuantModule,
    QuantPool,
    QuantSpec,
    UnknownLayerError,
    convert,
    describe_layers,
    layer_bits,
    prepare,
    quant_layers,
    quant_pools,
    quantizers,
    residual_adds,
)
from core.sqakd.quantizers import QUANTIZERS
from tests.core.sqakd.nets import MIXED_LAYERS, MixedNet, TinyCNN

METHODS = sorted(QUANTIZERS)
FLOAT_TYPES = (nn.Conv2d, nn.Linear)


def spec(method: str = "lsq", **overrides: object) -> QuantSpec:
    values: dict[str, object] = {"method": method, "weight_bits": 4, "activation_bits": 3}
    values.update(overrides)
    return QuantSpec(**values)  # type: ignore[arg-type]


def images(count: int = 4) -> Tensor:
    return torch.randn(count, 3, 8, 8)


def bits_by_layer(student: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (layer.weight_quantizer.bits, layer.act_quantizer.bits)
        for name, layer in quant_layers(student)
    }


# --- prepare -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_prepare_swaps_every_conv_and_linear(method: str) -> None:
    teacher = MixedNet()
    student = prepare(teacher, spec(method))
    assert [name for name, _ in quant_layers(student)] == MIXED_LAYERS
    for name, module in student.named_modules():
        assert type(module) not in FLOAT_TYPES, f"{name} was left in float"
    for name, layer in quant_layers(student):
        original = teacher.get_submodule(name)
        assert type(layer) is QUANT_MODULES[type(original)]
        assert isinstance(layer, type(original))  # still a Conv2d / Linear for other code
        assert type(layer.weight_quantizer) is QUANTIZERS[method]
        assert type(layer.act_quantizer) is QUANTIZERS[method]
        assert layer.weight_quantizer.for_weights and not layer.act_quantizer.for_weights
        assert layer.weight_quantizer.channels == original.weight.shape[0]
        assert layer.act_quantizer.channels is None
    assert student.dw.groups == 8 and student.grouped.groups == 2
    assert student.grouped.bias is None


def test_prepare_per_tensor_spec_gives_per_tensor_weight_grids() -> None:
    student = prepare(MixedNet(), spec(per_channel=False))
    assert all(layer.weight_quantizer.channels is None for _, layer in quant_layers(student))


def test_prepare_leaves_the_teacher_untouched_and_shares_nothing() -> None:
    teacher = MixedNet()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prepare(teacher, spec())
    assert all(type(m) is not QuantConv2d and type(m) is not QuantLinear for m in teacher.modules())
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("method", METHODS)
def test_student_with_quantizers_disabled_is_the_teacher(method: str) -> None:
    teacher = MixedNet()
    student = prepare(teacher, spec(method))
    for q in quantizers(student):
        q.enabled = False
    x = images()
    assert torch.equal(student(x), teacher(x))
    for q in quantizers(student):
        q.enabled = True
    assert not torch.equal(student(x), teacher(x))  # and the quantizers do act when enabled


# --- from_float / to_float / convert -------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: nn.Conv2d(4, 6, 3, groups=2),
        lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False),
        lambda: nn.Linear(5, 3),
        lambda: nn.Linear(5, 3, bias=False),
    ],
    ids=["grouped-conv", "depthwise-conv-no-bias", "linear", "linear-no-bias"],
)
def test_from_float_and_to_float_share_parameters(
    method: str, make_layer: Callable[[], nn.Module]
) -> None:
    layer = make_layer()
    quant_cls = QUANT_MODULES[type(layer)]
    quant = quant_cls.from_float(layer, method, 4, 8, per_channel=True)
    assert type(quant) is quant_cls
    assert quant.weight is layer.weight
    assert quant.bias is layer.bias
    assert (quant.weight_quantizer.bits, quant.act_quantizer.bits) == (4, 8)
    assert "weight_quantizer" not in layer._modules  # the float layer is not modified
    back = quant.to_float()
    assert type(back) is type(layer)
    assert back.weight is layer.weight and back.bias is layer.bias
    assert not hasattr(back, "weight_quantizer") and not hasattr(back, "act_quantizer")
    assert list(back.state_dict()) == list(layer.state_dict())
    x = torch.randn(2, 4, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(2, 5)
    assert torch.equal(back(x), layer(x))


def test_swap_shares_parameters_but_not_hooks() -> None:
    layer = nn.Conv2d(3, 4, 3)
    quant = QuantConv2d.from_float(layer, METHODS[0], 4, 4, per_channel=True)
    fired: list[str] = []
    quant.register_forward_hook(lambda *_: fired.append("quant"))
    layer(torch.randn(1, 3, 5, 5))
    assert fired == []


@pytest.mark.parametrize("method", METHODS)
def test_convert_undoes_prepare_with_the_same_parameters(method: str) -> None:
    teacher = MixedNet()
    student = prepare(teacher, spec(method))
    weights = {name: p for name, p in student.named_parameters() if "quantizer" not in name}
    float_model = convert(student)
    assert float_model is student
    assert not list(quant_layers(float_model))
    assert not any(isinstance(m, QuantModule) for m in float_model.modules())
    assert {name: p for name, p in float_model.named_parameters()} == weights
    assert set(float_model.state_dict()) == set(teacher.state_dict())
    x = images()
    assert torch.equal(float_model(x), teacher(x))


# --- bits per layer ------------------------------------------------------------------------


def test_first_and_last_layers_get_first_last_bits() -> None:
    student = prepare(MixedNet(), spec(first_last_bits=8))
    expected = dict.fromkeys(MIXED_LAYERS, (4, 3))
    expected["conv1"] = expected["fc2"] = (8, 8)
    assert bits_by_layer(student) == expected


def test_without_first_last_bits_every_layer_gets_the_job_bits() -> None:
    student = prepare(MixedNet(), spec(first_last_bits=None))
    assert bits_by_layer(student) == dict.fromkeys(MIXED_LAYERS, (4, 3))


def test_layer_bits_patterns_override_defaults_and_edges() -> None:
    patterns = {"block.*": 2, "fc?": 6, "dw": 5}
    student = prepare(MixedNet(), spec(first_last_bits=8, layer_bits=patterns))
    assert bits_by_layer(student) == {
        "conv1": (8, 8),
        "dw": (5, 5),
        "grouped": (4, 3),
        "block.0": (2, 2),
        "fc1": (6, 6),
        "fc2": (6, 6),  # a pattern beats first_last_bits
    }


def test_layer_bits_function() -> None:
    names = ["a", "b.0", "b.1", "c"]
    assert layer_bits(names, spec(first_last_bits=None)) == dict.fromkeys(names, (4, 3))
    assert layer_bits(names, spec(first_last_bits=8, layer_bits={"b.*": 2})) == {
        "a": (8, 8),
        "b.0": (2, 2),
        "b.1": (2, 2),
        "c": (8, 8),
    }
    assert layer_bits(["only"], spec(first_last_bits=6)) == {"only": (6, 6)}
    assert layer_bits([], spec()) == {}


def test_a_layer_bits_pattern_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(UnknownLayerError, match=r"'block\.\*' matches no layer; layers: a, b"):
        layer_bits(["a", "b"], spec(layer_bits={"block.*": 2}))


def test_quant_spec_round_trips_through_json() -> None:
    original = spec("ewgs", per_channel=False, first_last_bits=None, layer_bits={"fc*": 8})
    assert QuantSpec(**json.loads(json.dumps(original.to_dict()))) == original


# --- scale_output_ -------------------------------------------------------------------------


def _calibrated_layer(
    kind: str, method: str, bits: int, per_channel: bool
) -> tuple[QuantModule, Tensor]:
    if kind == "conv":
        layer, x = nn.Conv2d(4, 6, 3), torch.randn(3, 4, 8, 8)
    else:
        layer, x = nn.Linear(5, 6, bias=False), torch.randn(7, 5)
    quant = QUANT_MODULES[type(layer)].from_float(layer, method, bits, bits, per_channel)
    quant.act_quantizer.calibrate(x, signed=True)
    quant.weight_quantizer.calibrate(quant.weight, signed=True)
    return quant, x


def _expected(out: Tensor, gain: Tensor, shift: Tensor) -> Tensor:
    view = (1, -1) + (1,) * (out.dim() - 2)
    return out * gain.view(view) + shift.view(view)


@pytest.mark.parametrize("kind", ["conv", "linear-no-bias"])
@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("method", METHODS)
def test_scale_output_per_channel_is_exact(method: str, bits: int, kind: str) -> None:
    layer, x = _calibrated_layer(kind, method, bits, per_channel=True)
    before = layer(x).detach()
    channel_view = (-1,) + (1,) * (layer.weight.dim() - 1)
    codes_grid = layer.weight_quantizer.grid()
    codes = layer.quantized_weight().detach() / codes_grid.scale.view(channel_view)
    gain, shift = torch.rand(6) + 0.5, torch.randn(6)
    layer.scale_output_(gain, shift)
    torch.testing.assert_close(
        layer(x).detach(), _expected(before, gain, shift), rtol=1e-5, atol=1e-5
    )
    assert isinstance(layer.bias, nn.Parameter)
    rescaled = layer.weight_quantizer.grid()
    torch.testing.assert_close(rescaled.scale, codes_grid.scale * gain)
    after_codes = layer.quantized_weight().detach() / rescaled.scale.view(channel_view)
    torch.testing.assert_close(after_codes, codes, rtol=0, atol=1e-3)  # each weight keeps its code


@pytest.mark.parametrize("kind", ["conv", "linear-no-bias"])
@pytest.mark.parametrize("method", METHODS)
def test_scale_output_per_tensor_is_close(method: str, kind: str) -> None:
    layer, x = _calibrated_layer(kind, method, 8, per_channel=False)
    before = layer(x).detach()
    gain, shift = torch.rand(6) + 0.5, torch.randn(6)
    layer.scale_output_(gain, shift)
    error = layer(x).detach() - _expected(before, gain, shift)
    # the per-tensor grid is refitted: relative to the scaled output, measured <= 0.6% at 8 bits
    assert error.norm() / _expected(before, gain, torch.zeros(6)).norm() < 0.02


# --- describe_layers -----------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_describe_layers(per_channel: bool) -> None:
    student = prepare(MixedNet(), spec(per_channel=per_channel, layer_bits={"fc1": 6}))
    student.dw.act_quantizer.signed = False
    kinds = {"fc1": "Linear", "fc2": "Linear"}
    bits = {"conv1": (8, 8), "fc1": (6, 6), "fc2": (8, 8)}
    assert describe_layers(student) == [
        {
            "name": name,
            "kind": kinds.get(name, "Conv2d"),
            "weight_bits": bits.get(name, (4, 3))[0],
            "activation_bits": bits.get(name, (4, 3))[1],
            "activation_signed": name != "dw",
            "per_channel": per_channel,
        }
        for name in MIXED_LAYERS
    ]
    json.dumps(describe_layers(student))


# --- residual additions ----------------------------------------------------------------------


class _Residual(nn.Module):
    """Adds of every kind: two computed tensors (residual), a parameter, a constant; a tensor
    (h) read by a layer and the residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.offset = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = h + self.conv2(h)  # residual
        return (h + self.offset) + 1.0  # a bias and a constant: not residual


class _Untraceable(_Residual):
    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        if h.mean() > 0:  # control flow on a value: fx cannot trace it
            h = h + self.conv2(h)
        return h


def test_residual_adds_quantize_both_inputs_and_nothing_else() -> None:
    teacher = _Residual().eval()
    student = prepare(teacher, spec(residual_bits=8, int8_grids=True, first_last_bits=None))
    assert [name for name, _ in residual_adds(student)] == ["residual_add"]
    assert sorted(bits_by_layer(student)) == ["conv1", "conv2"]  # the layers keep their names
    add = student.get_submodule("residual_add")
    # h is read by conv2 and the addition: one quantizer, conv2's (3 bits); conv2's output is
    # read by the addition only, which quantizes it at residual_bits
    assert add.input_quantizers[0] is student.conv2.act_quantizer
    assert [q.bits for q in add.input_quantizers] == [3, 8]
    assert all(q.int8 for q in add.input_quantizers)
    assert len(list(quantizers(student))) == 2 * 2 + 1
    for quantizer in quantizers(student):
        quantizer.enabled = False
    x = images()
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))  # the same function, quantizers off
    assert not list(residual_adds(prepare(teacher, spec())))  # off unless asked for


def test_residual_add_quantizes_what_it_adds() -> None:
    add = QuantAdd("lsq", 2, int8=False)
    for quantizer in add.input_quantizers:
        quantizer.set_range(torch.tensor([1.0]))
    a, b = torch.tensor([0.3, -0.9]), torch.tensor([0.1, 0.6])
    expected = add.input_quantizers[0](a) + add.input_quantizers[1](b)
    assert torch.equal(add(a, b), expected)
    assert not torch.equal(add(a, b), a + b)


@pytest.mark.parametrize(("arch", "adds"), [("resnet18", 8), ("mobilenet_v2", 10)])
def test_residual_adds_of_torchvision_models(arch: str, adds: int) -> None:
    import torchvision

    teacher = getattr(torchvision.models, arch)(num_classes=10).eval()
    student = prepare(teacher, spec(residual_bits=8))
    plain = prepare(teacher, spec())
    names = [name for name, _ in residual_adds(student)]
    assert len(names) == adds
    assert all(name.endswith(".residual_add") for name in names)  # in its block: layer1.0...
    assert list(bits_by_layer(student).items()) == list(bits_by_layer(plain).items())
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_model_fx_cannot_trace_keeps_plain_adds() -> None:
    student = prepare(_Untraceable().eval(), spec(residual_bits=8))
    assert not list(residual_adds(student))
    assert len(bits_by_layer(student)) == 2


def test_layers_reading_one_tensor_share_its_quantizer() -> None:
    """resnet18's downsampling blocks: conv1 and the shortcut conv read the block's input, and
    so does the residual addition of a block without a shortcut."""
    import torchvision

    student = prepare(torchvision.models.resnet18().eval(), spec(residual_bits=8))
    layer2 = student.get_submodule("layer2.0")
    assert layer2.conv1.act_quantizer is layer2.downsample.get_submodule("0").act_quantizer
    block = student.get_submodule("layer1.1")
    assert block.residual_add.input_quantizers[1] is block.conv1.act_quantizer
    plain = prepare(torchvision.models.resnet18().eval(), spec())
    assert plain.layer2[0].conv1.act_quantizer is not plain.layer2[0].downsample[0].act_quantizer


def test_a_shared_quantizer_quantizes_its_tensor_once_per_forward() -> None:
    """resnet18's layer2.0: conv1 and the shortcut read one quantized tensor; layer1.1: conv1
    and the residual addition. Each forward quantizes each once, and every forward afresh."""
    import torchvision

    student = prepare(torchvision.models.resnet18().eval(), spec(residual_bits=8))
    shared = [
        student.get_submodule("layer2.0.conv1").act_quantizer,
        student.get_submodule("layer1.1.conv1").act_quantizer,
    ]
    calls = {id(q): 0 for q in shared}
    for quantizer in shared:
        quantize = quantizer.quantize

        def counted(x: torch.Tensor, quantizer=quantizer, quantize=quantize) -> torch.Tensor:
            calls[id(quantizer)] += 1
            return quantize(x)

        quantizer.quantize = counted  # type: ignore[method-assign]
    x = torch.randn(2, 3, 32, 32)
    first = student(x)
    assert list(calls.values()) == [1, 1]
    first.sum().backward()  # the readers' gradients reach the quantizer once, summed
    assert torch.equal(student(x), first.detach())  # no output of the last pass is reused
    assert list(calls.values()) == [2, 2]


# --- average poolings ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_pool_inputs_are_quantized_when_asked_and_convert_puts_the_pool_back(
    method: str,
) -> None:
    """``pool_bits`` (the CPU's grids): the pooling reads its input through a quantizer of those
    bits and grids, trained as the others are; off unless asked for; reversible."""
    teacher = TinyCNN().eval()
    cpu = spec(method, pool_bits=8, uint8_grids=True, first_last_bits=None)
    student = prepare(teacher, cpu)
    assert [name for name, _ in quant_pools(student)] == ["pool"]
    pool = student.get_submodule("pool")
    assert isinstance(pool, QuantPool) and type(pool.pool) is nn.AdaptiveAvgPool2d
    (quantizer,) = pool.input_quantizers
    assert (quantizer.bits, quantizer.uint8, quantizer.int8) == (8, True, False)
    assert type(quantizer) is QUANTIZERS[method] and not quantizer.for_weights
    assert sum(q is quantizer for q in quantizers(student)) == 1  # the optimizer trains it
    assert len(list(quantizers(student))) == 2 * 4 + 1
    for q in quantizers(student):
        q.enabled = False
    x = images()
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))  # the same function, quantizers off
    for q in quantizers(student):
        q.enabled = True
    assert not list(quant_pools(prepare(teacher, spec(method, uint8_grids=True))))
    float_model = convert(student)
    assert type(float_model.get_submodule("pool")) is nn.AdaptiveAvgPool2d
    assert set(float_model.state_dict()) == set(teacher.state_dict())
    with torch.no_grad():
        assert torch.equal(float_model(x), teacher(x))


def test_quant_pool_pools_what_it_quantizes() -> None:
    pool = QuantPool(nn.AdaptiveAvgPool2d(1), "lsq", 2, int8=False, uint8=True)
    (quantizer,) = pool.input_quantizers
    quantizer.signed = False
    quantizer.set_range(torch.tensor([1.0]))
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(pool(x), quantizer(x).mean((2, 3), keepdim=True))
    assert not torch.equal(pool(x), x.mean((2, 3), keepdim=True))


class _PooledAndConvolved(nn.Module):
    """A tensor (h) read by a convolution and by the average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        return torch.cat([self.pool(h).flatten(1), self.conv2(h).mean((2, 3))], 1)


def test_a_pooling_shares_the_quantizer_of_a_layer_reading_its_input() -> None:
    """As a residual addition does: one quantizer per tensor, so the file quantizes h once
    (on the fx graph that quantizing residual additions traces, as ``export.target: cpu``)."""
    cpu = spec(pool_bits=8, residual_bits=8, uint8_grids=True)
    student = prepare(_PooledAndConvolved().eval(), cpu)
    assert student.pool.input_quantizers[0] is student.conv2.act_quantizer
    assert len(list(quantizers(student))) == 2 * 2
