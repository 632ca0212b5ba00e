"""Turn an uploaded ONNX FP model into a trainable PyTorch module, verified against ONNX Runtime.

``onnx2torch`` fails on the default output of both torch exporters, so the graph is normalised
first (see ``_normalise``). Whatever the conversion produces is then run next to ONNX Runtime on
random batches, and the upload is rejected with a clear error if the two disagree: a model that
converts silently wrong would waste a whole training job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx2torch
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnx import version_converter
from onnx.external_data_helper import uses_external_data
from onnx2torch.node_converters import get_converter
from onnx2torch.node_converters.matmul import OnnxMatMul
from torch import fx, nn

from core.config import MAX_INPUT_SIDE, MIN_INPUT_SIDE, input_size_in_range, model_input_size
from core.errors import ModelImportError

# onnx2torch 1.5 has converters up to opset 17 (e.g. no ReduceMean-18, Reshape-19, Identity-19).
TARGET_OPSET = 17
VERIFY_BATCH_SIZE = 2
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class ImportedModel:
    """A converted model plus what the job needs to feed it."""

    module: nn.Module
    input_name: str
    input_shape: tuple[int | None, ...]
    num_outputs: int | None
    opset: int


def load_onnx_model(
    path: Path,
    *,
    input_size: tuple[int, int] | None = None,
    dynamic_side: int | None = None,
    verify_batches: int = 2,
    seed: int = 0,
) -> ImportedModel:
    """Read, normalise, convert and verify an image classifier exported to ONNX.

    ``input_size`` is ``preprocessing.input_size`` (H, W): it must match a static model input
    and is required when the model's height or width is dynamic, unless ``dynamic_side`` gives
    the side to verify a dynamic one at (a model stored before any job names its size).
    """
    original = _read(path)
    input_name, input_shape = _image_input(original.graph)
    num_outputs = _single_output_classes(original.graph)
    if input_size is None and dynamic_side is not None:
        height, width = (side or dynamic_side for side in input_shape[2:])
        input_size = (height, width)
    verify_shape = _verification_shape(input_shape, input_size)
    opset = _default_opset(original)
    module = _convert(_normalise(original, opset))
    _verify(module, original, input_name, verify_shape, batches=verify_batches, seed=seed)
    return ImportedModel(
        module=module,
        input_name=input_name,
        input_shape=input_shape,
        num_outputs=num_outputs,
        opset=opset,
    )


def _read(path: Path) -> onnx.ModelProto:
    """Parse from bytes so that no tensor is ever read from a path the file names."""
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except DecodeError as exc:
        raise ModelImportError(
            "invalid_model", "the uploaded file is not an ONNX model (it is not a ModelProto)"
        ) from exc
    external = [tensor.name for tensor in _tensors(model.graph) if uses_external_data(tensor)]
    if external:
        raise ModelImportError(
            "invalid_model",
            f"the model keeps {len(external)} tensor(s) in external data files "
            f"(e.g. {external[0]!r}); upload a single self-contained .onnx file "
            "(torch.onnx.export(..., external_data=False))",
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelImportError("invalid_model", f"not a valid ONNX model: {exc}") from exc
    return model


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph and its subgraphs: where external data can hide."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _image_input(graph: onnx.GraphProto) -> tuple[str, tuple[int | None, ...]]:
    """The single float32 [N, 3, H, W] input, with None for dynamic dimensions."""
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(repr(value.name) for value in inputs)
        raise ModelImportError(
            "unsupported_model",
            f"model has {len(inputs)} inputs ({names}); expected one image input [N, 3, H, W]",
        )
    value = inputs[0]
    tensor_type = value.type.tensor_type
    shape = tuple(dim.dim_value or None for dim in tensor_type.shape.dim)
    if (
        not value.type.HasField("tensor_type")
        or tensor_type.elem_type != onnx.TensorProto.FLOAT
        or not tensor_type.HasField("shape")
        or len(shape) != 4
        or shape[1] != 3
    ):
        raise ModelImportError(
            "unsupported_model",
            f"input {value.name!r} must be float32 [N, 3, H, W], got {_describe(value.type)}",
        )
    return value.name, shape


def _describe(value_type: onnx.TypeProto) -> str:
    """A type as users read it, e.g. ``uint8 [batch, 1, 28, 28]``."""
    if not value_type.HasField("tensor_type"):
        return f"a non-tensor ({value_type.WhichOneof('value')})"
    tensor_type = value_type.tensor_type
    elem_type = tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "undefined"
    if not tensor_type.HasField("shape"):
        return f"{dtype} of unknown rank"
    dims = ", ".join(str(dim.dim_value or dim.dim_param or "?") for dim in tensor_type.shape.dim)
    return f"{dtype} [{dims}]"


def _single_output_classes(graph: onnx.GraphProto) -> int | None:
    """Check there is one output; its static last dimension is the number of classes."""
    if len(graph.output) != 1:
        names = ", ".join(repr(value.name) for value in graph.output)
        raise ModelImportError(
            "unsupported_model",
            f"model has {len(graph.output)} outputs ({names}); expected one output of class scores",
        )
    dims = graph.output[0].type.tensor_type.shape.dim
    return (dims[-1].dim_value or None) if dims else None


def _verification_shape(
    input_shape: tuple[int | None, ...], input_size: tuple[int, int] | None
) -> tuple[int, int, int, int]:
    """The batch shape to verify with: the model's static dims, else ``input_size``.

    Both are held to the job's input-size range first: the file states its dims in a few bytes,
    and the verification batch (``VERIFY_BATCH_SIZE`` x 3 x H x W float32) is allocated from
    them, so a 140-byte model claiming 3x40000x40000 would otherwise cost 36 GiB.
    """
    batch, channels, height, width = input_shape
    if batch is not None:
        # Training and evaluation run batches of any size; a graph traced at one batch size
        # often bakes it into Reshape constants, so it cannot be made dynamic after the fact.
        raise ModelImportError(
            "fixed_batch_size",
            f"model input batch dimension is fixed at {batch}; export it with a dynamic batch, "
            "e.g. torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})",
        )
    sides = f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE} pixels"
    if not input_size_in_range([side for side in (height, width) if side is not None]):
        raise ModelImportError(
            "input_size_out_of_range",
            f"model input is {channels}x{height or '?'}x{width or '?'}; its height and width "
            f"must lie in {sides}, as preprocessing.input_size does: export it at such a size "
            "or with a dynamic height and width",
        )
    if input_size is not None and not input_size_in_range(input_size):
        raise ModelImportError(
            "input_size_out_of_range",
            f"preprocessing.input_size is {list(input_size)}; its sides must lie in {sides}",
        )
    height, width = model_input_size(input_shape, input_size)
    return VERIFY_BATCH_SIZE, 3, height, width


def _default_opset(model: onnx.ModelProto) -> int:
    """The ai.onnx opset, which decides the operator versions onnx2torch must support."""
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    if opset is None:
        raise ModelImportError("unsupported_model", "model imports no standard ONNX opset")
    return opset


def _normalise(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Rewrite a copy of the graph into the subset that onnx2torch converts correctly."""
    normalised = onnx.ModelProto()
    normalised.CopyFrom(model)
    _inline_initializer_identities(normalised.graph)
    if opset > TARGET_OPSET:
        normalised = _lower_opset(normalised, opset)
    _drop_reshape_allowzero(normalised.graph)
    _check_converters(normalised)
    return normalised


def _inline_initializer_identities(graph: onnx.GraphProto) -> None:
    """Give each Identity-of-initializer output its own copy of the initializer.

    The TorchScript exporter deduplicates equal weights (e.g. two zero biases) into one
    initializer plus Identity nodes; onnx2torch's Conv and Gemm converters only accept weights
    that are initializers and fail with a KeyError otherwise.
    """
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    graph_outputs = {value.name for value in graph.output}
    kept = []
    for node in graph.node:
        source = (
            initializers.get(node.input[0])
            if node.op_type == "Identity" and node.domain in _DEFAULT_DOMAINS
            else None
        )
        if source is None or node.output[0] in graph_outputs:
            kept.append(node)
            continue
        copy = graph.initializer.add()
        copy.CopyFrom(source)
        copy.name = node.output[0]
    del graph.node[:]
    graph.node.extend(kept)


def _lower_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert to opset 17, which e.g. turns ReduceMean-18's axes input back into an attribute.

    The dynamo exporter always writes opset 18 or newer, for which onnx2torch has no converters.
    """
    try:
        return version_converter.convert_version(model, TARGET_OPSET)
    except (RuntimeError, ValueError) as exc:  # onnx's C++ errors, as pybind11 raises them
        raise ModelImportError(
            "unsupported_model",
            f"cannot convert the model from opset {opset} to opset {TARGET_OPSET}: {exc}",
        ) from exc


def _drop_reshape_allowzero(graph: onnx.GraphProto) -> None:
    """Remove ``allowzero=1`` from Reshape nodes, which onnx2torch refuses outright.

    The dynamo exporter writes it on every ``Tensor.view``. It only changes what a 0 in the
    target shape means (keep a zero-sized dimension instead of copying the input's), which image
    models don't rely on; one that does fails verification against ONNX Runtime.
    """
    for node in graph.node:
        if node.op_type == "Reshape":
            for attribute in node.attribute:
                if attribute.name == "allowzero":
                    node.attribute.remove(attribute)
                    break


def _check_converters(model: onnx.ModelProto) -> None:
    """Name every operator onnx2torch lacks at once, rather than failing on the first."""
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    missing = set()
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(domain, 0), domain=domain)
        except NotImplementedError:
            missing.add(f"{domain}.{node.op_type}" if domain else node.op_type)
    if missing:
        raise ModelImportError(
            "unsupported_model",
            "the model uses operators that cannot be converted to PyTorch: "
            f"{', '.join(sorted(missing))} (opset {opsets.get('', 0)})",
        )


def _convert(model: onnx.ModelProto) -> fx.GraphModule:
    """onnx2torch conversion, then the trainable float32 form the quantizer expects."""
    try:
        module = onnx2torch.convert(model)
    except NotImplementedError as exc:
        raise ModelImportError(
            "unsupported_model", f"cannot convert the model to PyTorch: {exc}"
        ) from exc
    except Exception as exc:  # onnx2torch fails on odd graphs with arbitrary exception types
        raise ModelImportError(
            "conversion_mismatch",
            f"conversion to PyTorch failed: {type(exc).__name__}: {exc}",
        ) from exc
    _matmuls_to_linear(module)
    module.float().eval().requires_grad_(True)
    return module


def _matmuls_to_linear(module: fx.GraphModule) -> None:
    """Swap MatMul-by-constant-matrix for ``nn.Linear`` so the quantizer finds it.

    The TorchScript exporter writes a bias-free ``nn.Linear`` as MatMul with a pre-transposed
    weight initializer, which onnx2torch turns into a bare ``torch.matmul`` on a buffer.
    """
    swapped = False
    for node in module.graph.nodes:
        if node.op != "call_module" or not isinstance(
            module.get_submodule(node.target), OnnxMatMul
        ):
            continue
        features, weight_node = node.args
        if weight_node.op != "get_attr":
            continue
        weight = module.get_buffer(weight_node.target)
        if weight.dim() != 2:
            continue
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        linear.weight = nn.Parameter(weight.t().contiguous())
        module.add_submodule(node.target, linear)
        node.args = (features,)
        if not weight_node.users:
            owner, _, name = weight_node.target.rpartition(".")
            delattr(module.get_submodule(owner), name)
            module.graph.erase_node(weight_node)
        swapped = True
    if swapped:
        module.recompile()


def _verify(
    module: nn.Module,
    model: onnx.ModelProto,
    input_name: str,
    shape: tuple[int, int, int, int],
    *,
    batches: int,
    seed: int,
) -> None:
    """Compare the converted module with ONNX Runtime on the uploaded model itself.

    The input batch is bounded by ``_verification_shape``; what the graph allocates inside is
    not: a few bytes of ConstantOfShape, Expand, Tile, Reshape or Resize constants can ask ONNX
    Runtime or the converted module for any size. Bounding those would take a shape interpreter
    of our own, so the backstop is the process: the API runs upload validation
    (``core.intake``) in a child under an ``RLIMIT_DATA`` budget (``core.isolation``), where
    such a model fails its allocation and is refused as over the memory budget.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    rng = np.random.default_rng(seed)
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime's own exception types derive from Exception only
        raise ModelImportError(
            "unsupported_model", f"ONNX Runtime cannot load the model to verify it: {exc}"
        ) from exc
    for index in range(batches):
        batch = rng.standard_normal(shape, dtype=np.float32)
        try:
            (expected,) = session.run(None, {input_name: batch})
        except Exception as exc:  # as above
            raise ModelImportError(
                "unsupported_model", f"ONNX Runtime fails on a {list(shape)} input: {exc}"
            ) from exc
        try:
            with torch.no_grad():
                actual = module(torch.from_numpy(batch))
        except Exception as exc:  # any failure of the converted module is a bad conversion
            raise ModelImportError(
                "conversion_mismatch",
                f"the converted module fails on a {list(shape)} input: {type(exc).__name__}: {exc}",
            ) from exc
        _compare(actual, np.asarray(expected, dtype=np.float64), index)


def _compare(actual: object, expected: np.ndarray, index: int) -> None:
    """Relative to the output's scale, so that large logits don't fail on float rounding."""
    if not isinstance(actual, torch.Tensor) or tuple(actual.shape) != expected.shape:
        got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
        raise ModelImportError(
            "conversion_mismatch",
            f"the converted module returns {got} where ONNX Runtime returns {expected.shape}",
        )
    error = float(np.max(np.abs(actual.double().numpy() - expected), initial=0.0))
    tolerance = 1e-3 * (1 + float(np.max(np.abs(expected), initial=0.0)))
    if not error <= tolerance:  # also catches NaN
        raise ModelImportError(
            "conversion_mismatch",
            f"the converted module differs from ONNX Runtime by {error:.3g} "
            f"(tolerance {tolerance:.3g}) on random batch {index}",
        )
