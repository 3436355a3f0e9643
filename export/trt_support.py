"""Which ONNX operators the targeted TensorRT parses, and which nodes of a graph it would refuse.

Target: TensorRT 10.8.0.43, the version in the NGC containers `nvcr.io/nvidia/pytorch:25.01-py3`
(engine build) and `nvcr.io/nvidia/tritonserver:25.01-py3` (serving); see docker/README.md.

The operator list is the "Y" rows of onnx-tensorrt's `docs/operators.md` for TensorRT 10.0/10.1
(release/10.1-GA), every one of which is still "Y" in the table for TensorRT 10.15; 10.8 sits between
the two.  Its opset range, 9 to 20, is the narrower of the two tables' ranges.  The restrictions
checked are the ones that can apply to these graphs: inputs that must be build-time constants, and
data types TensorRT handles only partly.

    python -m export.trt_support build/onnx/*.onnx
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Set

import onnx
from onnx import TensorProto

TENSORRT_VERSION = "10.8.0.43"
OPSET_RANGE = (9, 20)

SUPPORTED_OPS: FrozenSet[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
    CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
    Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
    Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Inputs TensorRT needs as build-time constants (initializers or Constant outputs): {op: input index}.
CONSTANT_INPUTS: Dict[str, int] = {
    "Pad": 3,  # axes
    "Squeeze": 1,
    "Unsqueeze": 1,
    "CumSum": 1,
    "TopK": 1,
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},  # axes (opset >= 18)
}
# DOUBLE is cast down to FLOAT with clamping; UINT8 only as a network input or output.
PARTLY_SUPPORTED_TYPES = {
    TensorProto.DOUBLE: "DOUBLE (cast down to FLOAT)",
    TensorProto.UINT8: "UINT8 inside the network",
}
ONE_OUTPUT_OPS = frozenset({"LayerNormalization"})  # only the first output `Y` is supported


@dataclass(frozen=True)
class Finding:
    node: str
    op_type: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} [{self.op_type}]: {self.problem}"


def unsupported(model: onnx.ModelProto) -> List[Finding]:
    """Everything in `model` TensorRT 10.8's ONNX parser would refuse or only partly handle."""
    return _opset_findings(model) + _node_findings(model.graph) + _type_findings(model)


def unsupported_ops(path: Path) -> List[Finding]:
    """`unsupported` for an ONNX file; the weights are not loaded."""
    return unsupported(onnx.load(str(path), load_external_data=False))


def _opset_findings(model: onnx.ModelProto) -> List[Finding]:
    low, high = OPSET_RANGE
    return [
        Finding("<model>", "opset_import", f"opset {opset.version} outside TensorRT's {low}..{high}")
        for opset in model.opset_import
        if opset.domain in ("", "ai.onnx") and not low <= opset.version <= high
    ] + [
        Finding("<model>", "opset_import", f"custom domain {opset.domain!r} needs a TensorRT plugin")
        for opset in model.opset_import
        if opset.domain not in ("", "ai.onnx")
    ]


def _node_findings(graph: onnx.GraphProto) -> List[Finding]:
    constants = _constant_tensors(graph)
    findings = []
    for node in graph.node:
        if node.op_type not in SUPPORTED_OPS:
            findings.append(Finding(node.name, node.op_type, "operator not supported by TensorRT's ONNX parser"))
            continue
        index = CONSTANT_INPUTS.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
            findings.append(Finding(node.name, node.op_type, f"input {index} must be a build-time constant"))
        if node.op_type in ONE_OUTPUT_OPS and sum(1 for o in node.output if o) > 1:
            findings.append(Finding(node.name, node.op_type, "only the first output is supported"))
        findings += [f for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH
                     for f in _node_findings(attr.g)]
    return findings


def _type_findings(model: onnx.ModelProto) -> List[Finding]:
    graph = model.graph
    io_names = {v.name for v in list(graph.input) + list(graph.output)}
    values = list(graph.value_info) + list(graph.input) + list(graph.output)
    findings = []
    for value in values:
        elem_type = value.type.tensor_type.elem_type
        if elem_type == TensorProto.DOUBLE or (elem_type == TensorProto.UINT8 and value.name not in io_names):
            findings.append(Finding(value.name, "tensor", PARTLY_SUPPORTED_TYPES[elem_type]))
    findings += [Finding(t.name, "initializer", PARTLY_SUPPORTED_TYPES[TensorProto.DOUBLE])
                 for t in graph.initializer if t.data_type == TensorProto.DOUBLE]
    return findings


def _constant_tensors(graph: onnx.GraphProto) -> Set[str]:
    constants = {t.name for t in graph.initializer}
    constants |= {o for node in graph.node if node.op_type == "Constant" for o in node.output}
    return constants


def operator_counts(paths: Iterable[Path]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for path in paths:
        for node in onnx.load(str(path), load_external_data=False).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print("usage: python -m export.trt_support GRAPH.onnx [...]", file=sys.stderr)
        return 2
    bad = 0
    for path in paths:
        findings = unsupported_ops(path)
        bad += len(findings)
        print(f"{path}: {'ok' if not findings else f'{len(findings)} problem(s)'} for TensorRT {TENSORRT_VERSION}")
        for finding in findings:
            print(f"  {finding}")
    print("operators used: " + ", ".join(f"{op} x{n}" for op, n in operator_counts(paths).items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
