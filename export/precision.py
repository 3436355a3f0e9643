"""The FP16 precision plan, in one place: which nodes of an exported graph stay FP32.

The TensorRT builder (`export/tensorrt_build.py`) builds FP16 engines with exactly these nodes pinned to
FP32, and the ONNX Runtime check below converts the same ONNX graph to FP16 with the same nodes kept
FP32, so the CPU check exercises the plan the engines are built with.

Kept in FP32 (`keeps_fp32`):

* `LayerNormalization` and `Softmax`: reductions over a whole row, the layers TensorRT itself warns
  about ("running layernorm after self-attention in FP16 may cause overflow") and the known failure of
  FP16 ViT / SAM encoders.
* hand-written normalisations: SAM's `LayerNorm2d` (the image encoder's neck, the mask decoder's output
  upscaling) is exported as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add.  `(x - u)^2`
  overflows FP16's 65504 as soon as |x - u| > 256, so every node in the module scope of a
  ReduceMean / Pow / Sqrt node stays FP32.
* SAM's neck (`/neck/`): upstream EVF-SAM runs it in float32 when the rest of the model is half,
  "to prevent overflow"; its 1x1 convolution reads the raw residual stream of the ViT.

Everything else (matmuls, convolutions, GELU, residual adds, attention scores) runs in FP16.

ONNX Runtime check (`emulate_fp16`, `compare_fp16`): FP16 storage emulated in a float32 graph.
Every float tensor of the FP16 region (produced by a node outside the plan, or entering the region
from FP32) is cast to float16 and back, so it rounds and overflows to inf exactly as an FP16 tensor
between TensorRT layers; weights and constants of the region are float16-rounded; the plan's nodes see
float32.  Arithmetic inside each op stays float32 (TensorRT's FP16 GEMMs and convolutions accumulate
in FP32 too), so this finds overflow of stored activations, not inside a fused kernel.  A real float16
graph is no better on the CPU: ONNX Runtime runs float16 nodes that have no CPU kernel (Pow,
ReduceMean, ...) in float32 and drops the narrowing casts between them, which hid an overflow of
SAM's neck that the emulation shows.  Both runs count the inf / NaN values of every FP16
activation, so a report names the first one that overflowed (non-finite in FP16, finite in FP32:
masking with -inf is not an overflow) and the largest finite FP16 value (the headroom).

    python -m export.precision --onnx-dir build/onnx [--graphs ...] [--unprotected]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_OP_TYPES = frozenset({"LayerNormalization", "Softmax"})
NORM_STATISTIC_OP_TYPES = frozenset({"ReduceMean", "Pow", "Sqrt", "ReduceSumSquare", "ReduceL2"})
FP32_MODULES = ("/neck/",)
FP16_MAX = float(np.finfo(np.float16).max)
# Ops that accept any input dtype: they read shapes or convert, they never compute on the values.
DTYPE_AGNOSTIC_OP_TYPES = frozenset({"Shape", "Size", "Cast"})
ABSMAX_SUFFIX = "::absmax"
NONFINITE_SUFFIX = "::nonfinite"
UNROUNDED, ROUNDED = "::fp32", "::fp16"


def module_scope(node_name: str) -> str:
    """'/image_encoder/neck/neck.1/Pow' -> '/image_encoder/neck/neck.1/'; '' for a top-level node."""
    cut = node_name.rfind("/")
    return node_name[: cut + 1] if cut > 0 else ""


def keeps_fp32(op_type: str, node_name: str, norm_scopes: Iterable[str] = ()) -> bool:
    """The precision rule: True where a node (or the TensorRT layer made from it) must stay FP32."""
    return (
        op_type in FP32_OP_TYPES
        or op_type in NORM_STATISTIC_OP_TYPES
        or any(module in node_name for module in FP32_MODULES)
        or any(node_name.startswith(scope) for scope in norm_scopes)
    )


@dataclass(frozen=True)
class PrecisionPlan:
    """The names of the nodes that stay FP32 in one graph."""

    fp32_nodes: FrozenSet[str]

    @classmethod
    def for_nodes(cls, nodes: Iterable[Tuple[str, str]]) -> "PrecisionPlan":
        """From (op_type, node name) pairs."""
        nodes = list(nodes)
        scopes = {module_scope(name) for op, name in nodes if op in NORM_STATISTIC_OP_TYPES} - {""}
        return cls(frozenset(name for op, name in nodes if keeps_fp32(op, name, scopes)))

    @classmethod
    def for_model(cls, model: onnx.ModelProto) -> "PrecisionPlan":
        return cls.for_nodes((node.op_type, node.name) for node in model.graph.node)

    @classmethod
    def unprotected(cls) -> "PrecisionPlan":
        """Nothing kept FP32: the naive conversion the plan is measured against."""
        return cls(frozenset())

    def keeps_fp32(self, node_name: str) -> bool:
        return node_name in self.fp32_nodes


# ---------------------------------------------------------------------------------------------------
# FP16 emulation for ONNX Runtime


def emulate_fp16(model: onnx.ModelProto, plan: PrecisionPlan) -> Tuple[onnx.ModelProto, List[str]]:
    """A copy of `model` in which every float tensor of the FP16 region (produced by a node outside
    `plan`, or entering the region from FP32) is rounded to float16 and back, and the region's float
    weights and constants are float16-rounded; the plan's nodes read and write unrounded float32.
    Also returns the rounded activations in graph order (a border copy of tensor `t` is `t::fp16`)."""
    emulation = _Fp16Emulation(model, plan)
    return emulation.rewrite(), emulation.activations


def add_statistics(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Add two float32 graph outputs per tensor, in place: `<t>::absmax`, the largest finite |x|, and
    `<t>::nonfinite`, how many values are inf or NaN."""
    zero = "::statistics_zero"
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
    for name in tensors:
        bad, absmax, nonfinite = name + "::bad", name + ABSMAX_SUFFIX, name + NONFINITE_SUFFIX
        model.graph.node.extend([
            helper.make_node("IsInf", [name], [name + "::inf"]),
            helper.make_node("IsNaN", [name], [name + "::nan"]),
            helper.make_node("Or", [name + "::inf", name + "::nan"], [bad]),
            helper.make_node("Cast", [bad], [bad + "::count"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", [bad + "::count"], [nonfinite], keepdims=0),
            helper.make_node("Abs", [name], [name + "::abs"]),
            helper.make_node("Where", [bad, zero, name + "::abs"], [name + "::finite_abs"]),
            helper.make_node("ReduceMax", [name + "::finite_abs"], [absmax], keepdims=0),
        ])
        model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in (absmax, nonfinite))
    return model


class _Fp16Emulation:
    def __init__(self, model: onnx.ModelProto, plan: PrecisionPlan):
        self.source = model
        self.plan = plan
        self.float_tensors = _float_tensor_names(model)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.fp16_region: Set[str] = set()  # float tensors holding float16-rounded values
        self.borders: Dict[str, str] = {}  # float32 tensor -> its rounded copy for the FP16 region
        self.activations: List[str] = []  # rounded tensors computed at run time, in graph order
        self.nodes: List[onnx.NodeProto] = []
        self.new_initializers: List[onnx.TensorProto] = []

    def rewrite(self) -> onnx.ModelProto:
        for node in self.source.graph.node:
            self._convert_node(node)
        graph = helper.make_graph(
            self.nodes, self.source.graph.name + "_fp16", list(self.source.graph.input), list(self.source.graph.output),
            initializer=self._used_initializers(),
        )
        model = helper.make_model(graph, opset_imports=list(self.source.opset_import))
        model.ir_version = self.source.ir_version
        return model

    def _convert_node(self, source: onnx.NodeProto) -> None:
        node = onnx.NodeProto()
        node.CopyFrom(source)
        if self.plan.keeps_fp32(node.name):
            self.nodes.append(node)
            return
        if node.op_type not in DTYPE_AGNOSTIC_OP_TYPES:
            node.input[:] = [self._fp16_input(name) for name in node.input]
        floats = [name for name in node.output if name in self.float_tensors]
        self.fp16_region.update(floats)
        if node.op_type == "Constant":
            _round_float_attributes(node)
            self.nodes.append(node)
            return
        node.output[:] = [name + UNROUNDED if name in floats else name for name in node.output]
        self.nodes.append(node)
        for name in floats:
            self._append_rounding(name + UNROUNDED, name)

    def _fp16_input(self, name: str) -> str:
        """The float16-rounded version of an input of an FP16-region node."""
        if name not in self.float_tensors or name in self.fp16_region:
            return name
        if name not in self.borders:
            if name in self.initializers:
                self.borders[name] = self._rounded_initializer(name)
            else:
                self.borders[name] = name + ROUNDED
                self._append_rounding(name, name + ROUNDED)
        return self.borders[name]

    def _append_rounding(self, source: str, target: str) -> None:
        """Cast to float16 and back: FP16 storage (rounding, overflow to inf) in a float32 graph."""
        half = target + "::half"
        self.nodes += [
            helper.make_node("Cast", [source], [half], name=half, to=TensorProto.FLOAT16),
            helper.make_node("Cast", [half], [target], name=target + "::float", to=TensorProto.FLOAT),
        ]
        self.activations.append(target)

    def _rounded_initializer(self, name: str) -> str:
        with np.errstate(over="ignore"):
            rounded = numpy_helper.to_array(self.initializers[name]).astype(np.float16).astype(np.float32)
        self.new_initializers.append(numpy_helper.from_array(rounded, name + ROUNDED))
        return name + ROUNDED

    def _used_initializers(self) -> List[onnx.TensorProto]:
        used = {name for node in self.nodes for name in node.input}
        return [t for t in self.source.graph.initializer if t.name in used] + self.new_initializers


def _float_tensor_names(model: onnx.ModelProto) -> FrozenSet[str]:
    """Every float32 tensor of the graph, by ONNX type inference on the structure alone (weights as
    typed inputs: inference serialises the model, which fails past protobuf's 2 GB)."""
    graph = model.graph
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    skeleton = helper.make_model(
        helper.make_graph(graph.node, graph.name, list(graph.input) + weights, graph.output),
        opset_imports=model.opset_import,
    )
    skeleton.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    infos = list(inferred.input) + list(inferred.output) + list(inferred.value_info)
    typed = {v.name for v in infos}
    untyped = [o for n in graph.node for o in n.output if o and o not in typed]
    if untyped or len(inferred.node) != len(graph.node):
        raise ValueError(f"type inference left {len(untyped)} tensors untyped, e.g. {untyped[:3]}")
    return frozenset(v.name for v in infos if v.type.tensor_type.elem_type == TensorProto.FLOAT)


def _round_float_attributes(node: onnx.NodeProto) -> None:
    """Round a Constant's float32 value to float16 precision (it stays float32)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            with np.errstate(over="ignore"):
                value = numpy_helper.to_array(attr.t).astype(np.float16).astype(np.float32)
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))


# ---------------------------------------------------------------------------------------------------
# Running the comparison


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float  # max |fp16 - fp32| / max |fp32|
    finite: bool


@dataclass
class Fp16Report:
    graph: str
    plan: str  # "planned", "unprotected" or "custom"
    fp32_nodes: int
    fp16_tensors: int
    outputs: List[OutputDiff]
    largest_fp16_tensor: str
    largest_fp16_value: float  # largest finite |x| over the FP16 activations
    first_overflow: Optional[str]  # first FP16 activation (graph order) with inf / NaN where FP32 had none

    @property
    def range_used(self) -> float:
        """The largest finite FP16 activation as a fraction of FP16's max (65504)."""
        return self.largest_fp16_value / FP16_MAX

    @property
    def ok(self) -> bool:
        return self.first_overflow is None and all(o.finite for o in self.outputs)


def compare_fp16(
    onnx_path: Path, inputs: Mapping[str, np.ndarray], plan: Optional[PrecisionPlan] = None,
    graph: str = "", threads: Optional[int] = None,
) -> Fp16Report:
    """Run `onnx_path` in float32 and with FP16 storage under `plan` (default: the precision plan) on
    ONNX Runtime CPU with the same inputs; both runs report statistics of the FP16 activations."""
    model = onnx.load(str(onnx_path))
    label = "planned" if plan is None else ("unprotected" if not plan.fp32_nodes else "custom")
    plan = PrecisionPlan.for_model(model) if plan is None else plan
    output_names = [o.name for o in model.graph.output]
    fp16, activations = emulate_fp16(model, plan)
    originals = list(dict.fromkeys(_unrounded_name(name) for name in activations))
    reference = _run_with_statistics(add_statistics(model, originals), output_names, originals, inputs, threads)
    del model
    results = _run_with_statistics(add_statistics(fp16, activations), output_names, activations, inputs, threads)
    outputs = [_diff(name, ref, out) for name, ref, out in zip(output_names, reference[0], results[0])]
    return _report(graph or onnx_path.stem, label, plan, outputs, activations, results[1], reference[1])


def _unrounded_name(activation: str) -> str:
    return activation[: -len(ROUNDED)] if activation.endswith(ROUNDED) else activation


def _run_with_statistics(model: onnx.ModelProto, outputs: Sequence[str], tensors: Sequence[str],
                         inputs: Mapping[str, np.ndarray], threads: Optional[int]):
    """(graph outputs, {tensor: (absmax, nonfinite count)}); `model` is consumed."""
    stat_names = [t + suffix for t in tensors for suffix in (ABSMAX_SUFFIX, NONFINITE_SUFFIX)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        # Saving moves the weights into the external file in place: the proto is not usable after.
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        del model
        results = _run(path, list(outputs) + stat_names, inputs, threads)
    values = results[len(outputs):]
    stats = {t: (float(values[2 * i]), float(values[2 * i + 1])) for i, t in enumerate(tensors)}
    return results[: len(outputs)], stats


def _report(graph: str, label: str, plan: PrecisionPlan, outputs: List[OutputDiff], activations: List[str],
            fp16: Dict[str, Tuple[float, float]], fp32: Dict[str, Tuple[float, float]]) -> Fp16Report:
    overflows = [a for a in activations if fp16[a][1] > fp32[_unrounded_name(a)][1]]
    largest = max(activations, key=lambda a: fp16[a][0]) if activations else ""
    return Fp16Report(graph, label, len(plan.fp32_nodes), len(activations), outputs, largest,
                      fp16[largest][0] if largest else 0.0, overflows[0] if overflows else None)


def _diff(name: str, reference: np.ndarray, actual: np.ndarray) -> OutputDiff:
    finite = bool(np.all(np.isfinite(actual) | ~np.isfinite(reference)))
    error = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(np.max(error)) if error.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return OutputDiff(name, max_abs, max_abs / scale if scale > 0 else max_abs, finite)


def _run(path: Path, outputs: Sequence[str], inputs: Mapping[str, np.ndarray],
         threads: Optional[int]) -> List[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(list(outputs), dict(inputs))


def format_reports(reports: Iterable[Fp16Report]) -> str:
    header = (f"{'graph':<22} {'plan':<12} {'fp32 nodes':>10} {'output':<16} {'max abs':>9} {'max rel':>9} "
              f"{'max |fp16 act|':>14} {'of 65504':>8}  first FP16 overflow")
    lines = [header, "-" * len(header)]
    for r in reports:
        for o in r.outputs:
            lines.append(
                f"{r.graph:<22} {r.plan:<12} {r.fp32_nodes:>10} {o.name:<16} {o.max_abs:>9.2e} {o.max_rel:>9.2e} "
                f"{r.largest_fp16_value:>14.4g} {r.range_used:>8.2%}  {r.first_overflow or '-'}"
            )
    return "\n".join(lines)


def _manifest_vocab_size(onnx_dir: Path) -> int:
    """The text vocabulary the graphs were exported with (`python -m export` writes it down)."""
    import json

    manifest = onnx_dir / "manifest.json"
    return json.loads(manifest.read_text())["vocab_size"] if manifest.exists() else 1000


def main(argv=None) -> int:
    from evfsam.specs import BATCH, GRAPHS, GRAPHS_BY_NAME

    parser = argparse.ArgumentParser(prog="python -m export.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--graphs", nargs="+", choices=sorted(GRAPHS_BY_NAME), default=[g.name for g in GRAPHS])
    parser.add_argument("--unprotected", action="store_true", help="also run with nothing kept FP32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    vocab_size = _manifest_vocab_size(args.onnx_dir)
    reports = []
    for name in args.graphs:
        spec = GRAPHS_BY_NAME[name]
        inputs = spec.sample_inputs(np.random.default_rng(args.seed), {BATCH: args.batch}, vocab_size)
        path = args.onnx_dir / spec.onnx_file
        reports.append(compare_fp16(path, inputs, graph=name, threads=args.threads))
        if args.unprotected:
            reports.append(compare_fp16(path, inputs, PrecisionPlan.unprotected(), name, args.threads))
        print(format_reports(reports[-2 if args.unprotected else -1:]), flush=True)
    print("\n" + format_reports(reports))
    return 0 if all(r.ok for r in reports if r.plan == "planned") else 1


if __name__ == "__main__":
    sys.exit(main())
