"""core.export.tensorrt_rules: each rule on small hand-built graphs, one breach at a time."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.export.tensorrt_rules import check

CHANNELS = 4


def const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def residual_block(**breach: Any) -> onnx.ModelProto:
    """input -> Q/DQ -> Conv (int8 per-channel weight) -> Q/DQ -> Add(DQ of the conv, DQ of the
    input) -> output: a model that follows every rule unless ``breach`` changes one part."""
    zero_type = breach.get("zero_type", np.int8)
    zero = np.array(breach.get("zero", 0), dtype=zero_type)
    act_scale = breach.get("act_scale", np.array(0.1, dtype=np.float32))
    weights = breach.get("weights", np.ones((CHANNELS, CHANNELS, 1, 1), dtype=np.int8))
    weight_scale = np.full(CHANNELS, 0.01, dtype=np.float32)
    weight_axis = breach.get("weight_axis", 0)
    initializers = [
        const("act_scale", act_scale),
        const("act_zero", zero),
        const("dq_scale", breach.get("dq_scale", act_scale)),
        const("w_int", weights),
        const("w_scale", weight_scale),
        const("w_zero", np.zeros(CHANNELS, dtype=np.int8)),
    ]
    conv_input = "x_clip" if breach.get("clip", False) else "x"
    nodes = []
    if breach.get("clip", False):
        bounds = np.array(-0.8, np.float32), np.array(0.7, np.float32)
        initializers += [const("lo", bounds[0]), const("hi", bounds[1])]
        nodes.append(helper.make_node("Clip", ["x", "lo", "hi"], ["x_clip"]))
    nodes += [
        helper.make_node("QuantizeLinear", [conv_input, "act_scale", "act_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "dq_scale", "act_zero"], ["x_dq"]),
        helper.make_node(
            "DequantizeLinear", ["w_int", "w_scale", "w_zero"], ["w"], axis=weight_axis
        ),
        helper.make_node(
            "Conv", ["x" if breach.get("raw_input") else "x_dq", "w"], ["conv"], name="conv"
        ),
    ]
    if breach.get("batchnorm"):
        for name, value in (("bn_s", 1.0), ("bn_b", 0.0), ("bn_m", 0.0), ("bn_v", 1.0)):
            initializers.append(const(name, np.full(CHANNELS, value, dtype=np.float32)))
        nodes.append(
            helper.make_node(
                "BatchNormalization", ["conv", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"
            )
        )
    branch = "bn" if breach.get("batchnorm") else "conv"
    nodes += [
        helper.make_node("QuantizeLinear", [branch, "act_scale", "act_zero"], ["c_q"]),
        helper.make_node("DequantizeLinear", ["c_q", "act_scale", "act_zero"], ["c_dq"]),
        helper.make_node(
            "Add", ["c_dq", "x" if breach.get("raw_residual") else "x_dq"], ["y"], name="add"
        ),
    ]
    shape = [1, CHANNELS, 8, 8]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializers,
    )
    opset = breach.get("opset", 17)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model: onnx.ModelProto, **kwargs: Any) -> set[str]:
    return {violation.rule for violation in check(model, **kwargs)}


def test_a_model_that_follows_the_rules_passes_and_is_valid_onnx() -> None:
    model = residual_block()
    onnx.checker.check_model(model, full_check=True)
    assert check(model) == []


@pytest.mark.parametrize(
    ("breach", "rule"),
    [
        ({"zero_type": np.uint8}, "int8"),
        ({"zero": 3}, "int8"),
        ({"dq_scale": np.array(0.2, dtype=np.float32)}, "pair"),
        ({"weight_axis": 1}, "weight_scale"),
        ({"act_scale": np.full(CHANNELS, 0.1, dtype=np.float32)}, "activation_scale"),
        ({"batchnorm": True}, "batchnorm"),
        ({"raw_input": True}, "layer_input"),
        ({"raw_residual": True}, "residual_add"),
        ({"opset": 12}, "opset"),
    ],
)
def test_each_breach_is_reported_under_its_rule(breach: dict[str, Any], rule: str) -> None:
    assert rule in rules(residual_block(**breach))


def test_low_bit_layers_must_stay_on_their_grid_and_clip_their_input() -> None:
    four_bit = {"conv": (4, 4)}
    off_grid = np.full((CHANNELS, CHANNELS, 1, 1), 10, dtype=np.int8)  # even, beyond -8..7
    assert rules(residual_block(weights=off_grid), layer_bits=four_bit) == {
        "weight_grid",
        "activation_clip",
    }
    odd = np.full((CHANNELS, CHANNELS, 1, 1), 15, dtype=np.int8)  # DoReFa's odd -15..15 grid
    assert check(residual_block(weights=odd, clip=True), layer_bits=four_bit) == []
    assert check(residual_block(weights=off_grid), layer_bits={"conv": (8, 8)}) == []
