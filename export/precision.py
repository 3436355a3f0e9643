"""The FP16 precision policies, in one place: which nodes of an exported graph stay FP32, and how hard
TensorRT is told to keep them there.

The TensorRT builder (`export/tensorrt_build.py`) builds FP16 engines under one `PrecisionPolicy` at a
time, fastest first (`POLICIES`), and keeps the first whose engine passes the accuracy gate
(`export/accuracy_gate.py`); the ONNX Runtime check below runs the same ONNX graph with FP16 storage
everywhere except the policy's FP32 nodes, so the CPU check exercises the plan the engines are built with.

Groups of nodes a policy can keep in FP32 (`keeps_fp32`):

* `NORMALISATION`: `LayerNormalization` (and the other normalisation ops) plus hand-written
  normalisations: SAM's `LayerNorm2d` (the image encoder's neck, the mask decoder's output upscaling)
  is exported as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add.  `(x - u)^2` overflows
  FP16's 65504 as soon as |x - u| > 256, so every node in the module scope of a ReduceMean / Pow /
  Sqrt node stays FP32.  TensorRT itself warns about this ("Running layernorm after self-attention in
  FP16 may cause overflow ... forcing layernorm layers to run in FP32 precision can help", quoted for
  exactly SAM's neck in NVIDIA/TensorRT#3692; maintainers: NVIDIA/TensorRT#2564, #3101).
* `SOFTMAX`: `Softmax`.  Pinning it is a cost, not a free safety margin: TensorRT's fused
  multi-head-attention kernel needs both batched matmuls in FP16 / BF16 / INT8 (the developer
  guide's MHA-fusion restrictions, quoted in NVIDIA/TensorRT#2981: SM >= 75, head size 16..256 and a
  multiple of 8, "TensorRT may decide not to fuse an MHA graph ... based on performance evaluation or
  other constraints").  The guide does not say whether an FP32 constraint on the Softmax between them
  prevents the fusion, so no policy assumes it: the builder records what TensorRT did (the engine
  inspector's layers) for each policy it tries.  The other way round, a fused FP16 MHA has produced
  silently wrong ViT outputs (SAM 3 on sm_120, TensorRT 10.16.1, NVIDIA/TensorRT#4837: "breaking the
  MHA fusion restores accuracy"), which is why the gate, not this module, decides.
* `FP32_MODULES`: SAM's neck (`/neck/`): upstream EVF-SAM runs it in float32 when the rest of the
  model is half, "to prevent overflow"; its 1x1 convolution reads the raw residual stream of the ViT.

Everything else (matmuls, convolutions, GELU, residual adds, attention scores) runs in FP16.

ONNX Runtime check (`emulate_fp16`, `compare_fp16`): FP16 storage emulated in a float32 graph.
Every float tensor of the FP16 region (produced by a node outside the plan, or entering the region
from FP32) is cast to float16 and back, so it rounds and overflows to inf exactly as an FP16 tensor
between TensorRT layers; weights and constants of the region are float16-rounded; the plan's nodes see
float32.  Arithmetic inside each op stays float32 (TensorRT's FP16 GEMMs and convolutions accumulate
in FP32 too), so this finds overflow of stored activations, not inside a fused kernel.  A real float16
graph is no better on the CPU: ONNX Runtime runs float16 nodes that have no CPU kernel (Pow,
ReduceMean, ...) in float32 and drops the narrowing casts between them, which hid an overflow of
SAM's neck that the emulation shows.  Both runs record max |x| of every FP16 activation, so a report
names the first one that overflowed (inf / NaN in FP16, finite in FP32: masking with -inf is not an
overflow) and the largest finite FP16 value (the headroom below 65504).

    python -m export.precision --onnx-dir build/onnx [--graphs ...] [--policy NAME] [--unprotected]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NORMALISATION, SOFTMAX, FP32_MODULES = "normalisation", "softmax", "fp32-modules"
ALL_GROUPS: FrozenSet[str] = frozenset({NORMALISATION, SOFTMAX, FP32_MODULES})
# Normalisations that reduce over the input at run time (BatchNormalization is a fixed affine map).
NORMALISATION_OP_TYPES = frozenset({"LayerNormalization", "GroupNormalization", "InstanceNormalization",
                                    "MeanVarianceNormalization", "LpNormalization"})
NORM_STATISTIC_OP_TYPES = frozenset({"ReduceMean", "Pow", "Sqrt", "ReduceSumSquare", "ReduceL2"})
SOFTMAX_OP_TYPES = frozenset({"Softmax", "LogSoftmax"})
FP32_MODULE_SCOPES = ("/neck/",)
FP16_MAX = float(np.finfo(np.float16).max)
# Ops that accept any input dtype: they read shapes or convert, they never compute on the values.
DTYPE_AGNOSTIC_OP_TYPES = frozenset({"Shape", "Size", "Cast"})
ABSMAX_SUFFIX = "::absmax"
UNROUNDED, ROUNDED = "::fp32", "::fp16"
PREFER, OBEY, NO_CONSTRAINTS = "prefer", "obey", "none"


def module_scope(node_name: str) -> str:
    """'/image_encoder/neck/neck.1/Pow' -> '/image_encoder/neck/neck.1/'; '' for a top-level node."""
    cut = node_name.rfind("/")
    return node_name[: cut + 1] if cut > 0 else ""


def keeps_fp32(op_type: str, node_name: str, norm_scopes: Iterable[str] = (),
               groups: Collection[str] = ALL_GROUPS) -> bool:
    """The precision rule: True where a node (or the TensorRT layer made from it) must stay FP32
    when the groups `groups` are kept."""
    if NORMALISATION in groups and (op_type in NORMALISATION_OP_TYPES or op_type in NORM_STATISTIC_OP_TYPES
                                    or any(node_name.startswith(scope) for scope in norm_scopes)):
        return True
    if SOFTMAX in groups and op_type in SOFTMAX_OP_TYPES:
        return True
    return FP32_MODULES in groups and any(module in node_name for module in FP32_MODULE_SCOPES)


@dataclass(frozen=True)
class PrecisionPolicy:
    """How an engine is built: FP16 or not, how TensorRT treats the per-layer precisions
    (`prefer`: where TensorRT has an implementation, with a warning otherwise; `obey`: the build fails
    otherwise; `none`: no per-layer precision is set), and which groups are kept FP32."""

    name: str
    fp16: bool
    constraints: str
    pinned: FrozenSet[str]
    description: str

    def __post_init__(self):
        if self.constraints not in (PREFER, OBEY, NO_CONSTRAINTS):
            raise ValueError(f"policy {self.name}: constraints {self.constraints!r} is not prefer, obey or none")
        if self.pinned - ALL_GROUPS:
            raise ValueError(f"policy {self.name}: unknown groups {sorted(self.pinned - ALL_GROUPS)}")
        if not self.fp16 and (self.pinned or self.constraints != NO_CONSTRAINTS):
            raise ValueError(f"policy {self.name}: an FP32 engine pins nothing")
        if self.fp16 and (self.constraints == NO_CONSTRAINTS) != (not self.pinned):
            raise ValueError(f"policy {self.name}: FP32 groups need prefer or obey, and prefer / obey need groups")

    @property
    def pins_layers(self) -> bool:
        return self.fp16 and bool(self.pinned)


# Fastest first: the builder falls back down this list while the accuracy gate rejects an engine.
POLICIES: Tuple[PrecisionPolicy, ...] = (
    PrecisionPolicy("fp16", True, NO_CONSTRAINTS, frozenset(),
                    "FP16 wherever TensorRT finds it faster; no layer pinned (attention and normalisations free "
                    "to fuse)"),
    PrecisionPolicy("fp16-prefer-norms", True, PREFER, frozenset({NORMALISATION, FP32_MODULES}),
                    "FP16; normalisations and SAM's neck preferred in FP32; Softmax free (attention may fuse)"),
    PrecisionPolicy("fp16-obey-norms-softmax", True, OBEY, frozenset(ALL_GROUPS),
                    "FP16; normalisations, SAM's neck and every Softmax obeyed in FP32"),
    PrecisionPolicy("fp32", False, NO_CONSTRAINTS, frozenset(), "FP32 everywhere (TF32 not enabled)"),
)
POLICIES_BY_NAME: Dict[str, PrecisionPolicy] = {p.name: p for p in POLICIES}


def fallback_ladder(start: str, fallback: bool = True) -> Tuple[PrecisionPolicy, ...]:
    """The policies tried from `start` on: `start` and every stricter one (just `start` without fallback)."""
    if start not in POLICIES_BY_NAME:
        raise KeyError(f"unknown precision policy {start!r}; choose one of {list(POLICIES_BY_NAME)}")
    index = [p.name for p in POLICIES].index(start)
    return POLICIES[index:] if fallback else (POLICIES[index],)


@dataclass(frozen=True)
class PrecisionPlan:
    """The names of the nodes that stay FP32 in one graph."""

    fp32_nodes: FrozenSet[str]

    @classmethod
    def for_nodes(cls, nodes: Iterable[Tuple[str, str]], groups: Collection[str] = ALL_GROUPS) -> "PrecisionPlan":
        """From (op_type, node name) pairs."""
        nodes = list(nodes)
        scopes = {module_scope(name) for op, name in nodes if op in NORM_STATISTIC_OP_TYPES} - {""}
        return cls(frozenset(name for op, name in nodes if keeps_fp32(op, name, scopes, groups)))

    @classmethod
    def for_model(cls, model: onnx.ModelProto, groups: Collection[str] = ALL_GROUPS) -> "PrecisionPlan":
        return cls.for_nodes(((node.op_type, node.name) for node in model.graph.node), groups)

    @classmethod
    def for_policy(cls, model: onnx.ModelProto, policy: PrecisionPolicy) -> "PrecisionPlan":
        return cls.for_model(model, policy.pinned if policy.fp16 else ())

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
    `plan`, or entering the region from FP32: inputs, weights, constants) is rounded to float16 and
    back; the plan's nodes read and write unrounded float32.  Weights are rounded by Cast nodes, so
    `model` may be the structure alone (`onnx.load(..., load_external_data=False)`).  Also returns the
    rounded activations in graph order (a border copy of tensor `t` is `t::fp16`)."""
    emulation = _Fp16Emulation(model, plan)
    return emulation.rewrite(), emulation.activations


def add_statistics(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Add a float32 graph output `<t>::absmax` = max |x| (inf or NaN once x holds one) per tensor, in
    place.  The statistic nodes follow their tensor's producer; with `Runner`'s priority-based order
    ONNX Runtime runs them early and frees the tensor (a SAM encoder has thousands of activations)."""
    wanted, produced = set(tensors), {o for node in model.graph.node for o in node.output}
    nodes = [n for name in tensors if name not in produced for n in _statistic_nodes(name)]
    for node in model.graph.node:
        nodes.append(node)
        nodes += [n for name in node.output if name in wanted for n in _statistic_nodes(name)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.output.extend(helper.make_tensor_value_info(t + ABSMAX_SUFFIX, TensorProto.FLOAT, []) for t in tensors)
    return model


def _statistic_nodes(name: str) -> List[onnx.NodeProto]:
    return [helper.make_node("Abs", [name], [name + "::abs"]),
            helper.make_node("ReduceMax", [name + "::abs"], [name + ABSMAX_SUFFIX], keepdims=0)]


class _Fp16Emulation:
    def __init__(self, model: onnx.ModelProto, plan: PrecisionPlan):
        self.source = model
        self.plan = plan
        self.float_tensors = _float_tensor_names(model)
        graph = model.graph
        self.constants = {t.name for t in graph.initializer}
        self.constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        self.fp16_region: Set[str] = set()  # float tensors holding float16-rounded values
        self.borders: Dict[str, str] = {}  # float32 tensor -> its rounded copy for the FP16 region
        self.activations: List[str] = []  # rounded tensors computed from the inputs, in graph order
        self.nodes: List[onnx.NodeProto] = []

    def rewrite(self) -> onnx.ModelProto:
        for node in self.source.graph.node:
            self._convert_node(node)
        source = self.source.graph
        graph = helper.make_graph(self.nodes, source.name + "_fp16", list(source.input), list(source.output),
                                  initializer=list(source.initializer))
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
            self.activations.append(name)

    def _fp16_input(self, name: str) -> str:
        """The float16-rounded version of an input of an FP16-region node."""
        if name not in self.float_tensors or name in self.fp16_region:
            return name
        if name not in self.borders:
            self.borders[name] = name + ROUNDED
            self._append_rounding(name, name + ROUNDED)
            if name not in self.constants:
                self.activations.append(name + ROUNDED)
        return self.borders[name]

    def _append_rounding(self, source: str, target: str) -> None:
        """Cast to float16 and back: FP16 storage (rounding, overflow to inf) in a float32 graph."""
        half = target + "::half"
        self.nodes += [
            helper.make_node("Cast", [source], [half], name=half, to=TensorProto.FLOAT16),
            helper.make_node("Cast", [half], [target], name=target + "::float", to=TensorProto.FLOAT),
        ]


def _float_tensor_names(model: onnx.ModelProto) -> FrozenSet[str]:
    """Every float32 tensor of the graph, by ONNX type inference on the structure alone (weights as
    typed inputs: inference serialises the model, which fails past protobuf's 2 GB)."""
    graph = model.graph
    declared = {i.name for i in graph.input}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
               for t in graph.initializer if t.name not in declared]
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
    plan: str  # "planned" (every group FP32), a policy name, "unprotected" or "custom"
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
    graph: str = "", threads: Optional[int] = None, policy: Optional[PrecisionPolicy] = None,
) -> Fp16Report:
    """Run `onnx_path` in float32 and with FP16 storage under `plan` (default: the FP32 nodes of
    `policy`, else every group kept FP32) on ONNX Runtime CPU with the same inputs; both runs report
    statistics of the FP16 activations.  The weights stay on disk: each run reads them from the
    graph's external data, one at a time."""
    structure = onnx.load(str(onnx_path), load_external_data=False)
    if plan is not None:
        label = "unprotected" if not plan.fp32_nodes else "custom"
    elif policy is not None:
        label, plan = policy.name, PrecisionPlan.for_policy(structure, policy)
    else:
        label, plan = "planned", PrecisionPlan.for_model(structure)
    output_names = [o.name for o in structure.graph.output]
    fp16, activations = emulate_fp16(structure, plan)
    originals = list(dict.fromkeys(_unrounded_name(name) for name in activations))
    run = Runner(onnx_path.parent, threads)
    reference, fp32_stats = run.with_statistics(add_statistics(structure, originals), output_names, originals, inputs)
    results, fp16_stats = run.with_statistics(add_statistics(fp16, activations), output_names, activations, inputs)
    outputs = [_diff(name, ref, out) for name, ref, out in zip(output_names, reference, results)]
    return _report(graph or onnx_path.stem, label, plan, outputs, activations, fp16_stats, fp32_stats)


def _unrounded_name(activation: str) -> str:
    return activation[: -len(ROUNDED)] if activation.endswith(ROUNDED) else activation


@dataclass(frozen=True)
class Runner:
    """ONNX Runtime CPU sessions for in-memory graphs whose weights stay in the external data files
    of `weights_dir` (read by the session, never copied or linked)."""

    weights_dir: Path
    threads: Optional[int] = None

    def run(self, model: onnx.ModelProto, outputs: Sequence[str], inputs: Mapping[str, np.ndarray]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(self.weights_dir))
        if self.threads:
            options.intra_op_num_threads = self.threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(list(outputs), dict(inputs))

    def with_statistics(self, model: onnx.ModelProto, outputs: Sequence[str], tensors: Sequence[str],
                        inputs: Mapping[str, np.ndarray]):
        """(graph outputs, {tensor: max |x|}) of a model `add_statistics` prepared."""
        results = self.run(model, list(outputs) + [t + ABSMAX_SUFFIX for t in tensors], inputs)
        return results[: len(outputs)], {t: float(v) for t, v in zip(tensors, results[len(outputs):])}


def _report(graph: str, label: str, plan: PrecisionPlan, outputs: List[OutputDiff], activations: List[str],
            fp16: Dict[str, float], fp32: Dict[str, float]) -> Fp16Report:
    """An overflow: a tensor whose max |x| is inf or NaN in FP16 but finite in FP32 (masking with
    -inf is not one)."""
    overflows = [a for a in activations if not np.isfinite(fp16[a]) and np.isfinite(fp32[_unrounded_name(a)])]
    finite = [a for a in activations if np.isfinite(fp16[a])]
    largest = max(finite, key=fp16.get) if finite else ""
    return Fp16Report(graph, label, len(plan.fp32_nodes), len(activations), outputs, largest,
                      fp16[largest] if largest else 0.0, overflows[0] if overflows else None)


def _diff(name: str, reference: np.ndarray, actual: np.ndarray) -> OutputDiff:
    finite = bool(np.all(np.isfinite(actual) | ~np.isfinite(reference)))
    error = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(np.max(error)) if error.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return OutputDiff(name, max_abs, max_abs / scale if scale > 0 else max_abs, finite)


def format_reports(reports: Iterable[Fp16Report]) -> str:
    header = (f"{'graph':<22} {'plan':<24} {'fp32 nodes':>10} {'output':<16} {'max abs':>9} {'max rel':>9} "
              f"{'max |fp16 act|':>14} {'of 65504':>8}  first FP16 overflow")
    lines = [header, "-" * len(header)]
    for r in reports:
        for o in r.outputs:
            lines.append(
                f"{r.graph:<22} {r.plan:<24} {r.fp32_nodes:>10} {o.name:<16} {o.max_abs:>9.2e} {o.max_rel:>9.2e} "
                f"{r.largest_fp16_value:>14.4g} {r.range_used:>8.2%}  {r.first_overflow or '-'}"
            )
    return "\n".join(lines)


def manifest_vocab_size(onnx_dir: Path) -> int:
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
    parser.add_argument("--policy", choices=[p.name for p in POLICIES if p.fp16],
                        help="emulate this policy's FP32 nodes (default: every group kept FP32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    vocab_size = manifest_vocab_size(args.onnx_dir)
    reports = []
    for name in args.graphs:
        spec = GRAPHS_BY_NAME[name]
        inputs = spec.sample_inputs(np.random.default_rng(args.seed), {BATCH: args.batch}, vocab_size)
        path = args.onnx_dir / spec.onnx_file
        policy = POLICIES_BY_NAME[args.policy] if args.policy else None
        reports.append(compare_fp16(path, inputs, graph=name, threads=args.threads, policy=policy))
        if args.unprotected:
            reports.append(compare_fp16(path, inputs, PrecisionPlan.unprotected(), name, args.threads))
        print(format_reports(reports[-2 if args.unprotected else -1:]), flush=True)
    print("\n" + format_reports(reports))
    return 0 if all(r.ok for r in reports if r.plan != "unprotected") else 1


if __name__ == "__main__":
    sys.exit(main())
