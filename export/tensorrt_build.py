"""Build one TensorRT engine per exported graph into the Triton model repository, accuracy-gated.

    python -m export.tensorrt_build --onnx-dir build/onnx --repository build/model_repository_tensorrt \\
        [--graphs ...] [--precision-policy fp16] [--no-fallback] [--fp32] \\
        [--timing-cache build/trt/timing.cache] [--workspace-gib 8] [--optional]

For every graph: parse `<onnx-dir>/<graph>.onnx`, add one optimisation profile whose min / opt / max
shapes (batch, text length) come from the graph's spec in `evfsam/specs.py` (the spec the Triton
configuration is generated from), build under a precision policy of `export/precision.py` (fastest
first: plain FP16, then FP16 with normalisations preferred FP32, then FP16 with normalisations and
Softmax obeyed FP32, then FP32), reuse and update a persisted timing cache, and run the engine
through the accuracy gate (`export/accuracy_gate.py`: against ONNX Runtime FP32 on the shipped
sample images and prompts).  An engine over tolerance is not written: the next, stricter policy is
built instead (`--no-fallback`: none), and when none passes the build fails naming the graph, the
output and by how much.  The first engine that passes is written to `<repository>/<graph>/1/model.plan`
with `model.plan.json` beside it (TensorRT version, GPU, policy, every attempt and why it was
rejected, the gate's per-output errors, profile, source ONNX hash).  The engine is specific to the
GPU model and the TensorRT version that built it: build it with the TensorRT of the Triton image that
serves it (docker/README.md).

Exit status: 0 built; 1 TensorRT refused a graph (its parser / builder messages are printed);
2 an ONNX file or the tokenizer is missing; 3 TensorRT is not importable (0 with `--optional`, which
only says so); 4 no policy's engine passed the accuracy gate.

`trtexec` is the documented alternative; `--print-trtexec` prints the equivalent commands (same
profile, precision constraints and timing cache) without needing TensorRT; trtexec builds are not
accuracy-gated.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Dict, List, Optional, Sequence, Tuple

from evfsam.specs import GRAPHS, GRAPHS_BY_NAME, GraphSpec

from .accuracy_gate import (ASSETS_DIR, EngineRunner, GateReport, ReferenceFeeds, check_engine, format_report,
                            reference_feeds)
from .onnx_export import file_digest
from .precision import (NORMALISATION, OBEY, POLICIES, POLICIES_BY_NAME, PREFER, SOFTMAX, PrecisionPlan,
                        PrecisionPolicy, fallback_ladder)
from .trt_runner import CudaError, EngineRunError

EXIT_OK, EXIT_BUILD_FAILED, EXIT_MISSING_ONNX, EXIT_NO_TENSORRT, EXIT_ACCURACY = 0, 1, 2, 3, 4
PLAN_FILE = "model.plan"
METADATA_FILE = PLAN_FILE + ".json"
VERSION_DIR = "1"
PROFILE_POINTS = ("min", "opt", "max")
DEFAULT_WORKSPACE_GIB = 8
ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^|\]]+)")


class BuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message carries TensorRT's own."""


@dataclass(frozen=True)
class BuildOptions:
    workspace_gib: int = DEFAULT_WORKSPACE_GIB
    timing_cache: Optional[Path] = None


@dataclass
class BuiltEngine:
    plan: bytes
    policy: PrecisionPolicy
    fp32_layers: List[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Attempt:
    """One policy's engine and what the gate said about it."""

    engine: BuiltEngine
    report: GateReport
    attention: Optional[dict] = None  # the engine inspector's attention layers, where the runner has one

    def to_dict(self) -> dict:
        failures = self.report.failures()
        return {
            "policy": self.engine.policy.name,
            "description": self.engine.policy.description,
            "passed": self.report.passed,
            "failure": failures[0].excess() if failures else None,
            "failed_checks": len(failures),
            "fp32_layers": len(self.engine.fp32_layers),
            "build_seconds": round(self.engine.seconds, 1),
            "attention": self.attention,
        }


class GatedBuildError(RuntimeError):
    """No policy of the ladder produced an engine that passes the accuracy gate."""

    def __init__(self, graph: str, attempts: List[Attempt]):
        self.attempts = attempts
        reasons = "; ".join(f"policy {a.engine.policy.name}: {a.to_dict()['failure'] or 'no check ran'}"
                            for a in attempts)
        super().__init__(f"{graph}: no engine passed the accuracy gate; {reasons}")


# ---------------------------------------------------------------------------------------------------
# Everything below this line up to `build_engine` runs without TensorRT (and is unit-tested so).


def optimization_profile(spec: GraphSpec) -> Dict[str, Dict[str, Tuple[int, ...]]]:
    """{input name: {"min" | "opt" | "max": shape}} from the spec's axis ranges."""
    points = {which: spec.profile_shapes(which) for which in PROFILE_POINTS}
    return {name: {which: points[which][name] for which in PROFILE_POINTS} for name in spec.input_names}


def plan_path(repository: Path, spec: GraphSpec) -> Path:
    return repository / spec.name / VERSION_DIR / PLAN_FILE


def metadata_path(repository: Path, spec: GraphSpec) -> Path:
    return plan_path(repository, spec).with_name(METADATA_FILE)


def build_metadata(spec: GraphSpec, onnx_path: Path, options: BuildOptions, tensorrt_version: str,
                   gpu: Dict[str, str], attempts: List[Attempt]) -> dict:
    """`model.plan.json` of the last attempt (the one written), with every attempt's outcome."""
    engine, report = attempts[-1].engine, attempts[-1].report
    return {
        "graph": spec.name,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "precision": "fp16" if engine.policy.fp16 else "fp32",
        "precision_policy": {"name": engine.policy.name, "description": engine.policy.description,
                             "constraints": engine.policy.constraints, "fp32_groups": sorted(engine.policy.pinned)},
        "fp32_layers": engine.fp32_layers,
        "attempts": [a.to_dict() for a in attempts],
        "accuracy": report.to_dict(),
        "max_batch_size": spec.max_batch_size,
        "profile": {name: {point: list(shape) for point, shape in shapes.items()}
                    for name, shapes in optimization_profile(spec).items()},
        "inputs": {t.name: t.dtype for t in spec.inputs},
        "outputs": {t.name: t.dtype for t in spec.outputs},
        "onnx": {"file": onnx_path.name, "sha256": file_digest(onnx_path)},
        "workspace_gib": options.workspace_gib,
        "build_seconds": round(sum(a.engine.seconds for a in attempts), 1),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def onnx_node_of(layer_name: str, metadata: str, node_names: Collection[str]) -> Optional[str]:
    """The ONNX node a TensorRT layer was made from: the parser's "[ONNX Layer: <node>]" metadata, or
    the layer name (the parser names a node's layers `<node>` and `<node>_<n>`)."""
    match = ONNX_LAYER.search(metadata or "")
    if match:
        return match.group(1).strip()
    if layer_name in node_names:
        return layer_name
    stem = re.sub(r"_\d+$", "", layer_name)
    return stem if stem in node_names else None


def trtexec_command(spec: GraphSpec, onnx_path: Path, repository: Path, options: BuildOptions,
                    policy: PrecisionPolicy, fp32_layers: Sequence[str] = ()) -> List[str]:
    """The `trtexec` equivalent of one policy's build; `fp32_layers` by ONNX node name (see `fp32_layer_names`)."""
    profile = optimization_profile(spec)
    shapes = {which: ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in profile.items())
              for which in PROFILE_POINTS}
    command = [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path(repository, spec)}",
        f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}",
        f"--memPoolSize=workspace:{options.workspace_gib * 1024}M", "--profilingVerbosity=detailed",
    ]
    if options.timing_cache:
        command.append(f"--timingCacheFile={options.timing_cache}")
    if not policy.fp16:
        return command + ["--noTF32"]
    command += ["--fp16", f"--precisionConstraints={policy.constraints}"]
    if policy.pins_layers and fp32_layers:
        pins = ",".join(f"{name}:fp32" for name in fp32_layers)
        command += [f"--layerPrecisions={pins}", f"--layerOutputTypes={pins}"]
    return command


def fp32_layer_names(model, policy: PrecisionPolicy) -> List[str]:
    """The policy's FP32 nodes that become TensorRT layers (Constant nodes become weights), in graph order."""
    plan = PrecisionPlan.for_policy(model, policy)
    return [n.name for n in model.graph.node if plan.keeps_fp32(n.name) and n.op_type != "Constant"]


def gpu_description() -> Dict[str, str]:
    """Name and compute capability of the GPU the engine is built on (via torch, else nvidia-smi)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "--id=0"]
        result = subprocess.run(query, capture_output=True, text=True, check=False)
        if result.returncode == 0 and "," in result.stdout:
            name, capability = (s.strip() for s in result.stdout.splitlines()[0].split(",", 1))
            return {"name": name, "compute_capability": capability}
    return {"name": "unknown", "compute_capability": "unknown"}


# ---------------------------------------------------------------------------------------------------
# TensorRT


def import_tensorrt():
    """The `tensorrt` module, or None where it is not installed (no NVIDIA container, no GPU)."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def engine_runner(trt, plan: bytes) -> EngineRunner:
    """The runner the accuracy gate drives an engine with (tests substitute an ONNX Runtime one)."""
    from .trt_runner import TensorRTRunner

    return TensorRTRunner(trt, plan, recording_logger(trt))


def build_engine(trt, spec: GraphSpec, onnx_path: Path, options: BuildOptions, policy: PrecisionPolicy) -> BuiltEngine:
    started = time.time()
    logger = recording_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{spec.name}: TensorRT could not parse {onnx_path}:\n" + "\n".join(errors))
    _check_network_io(spec, network)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_gib << 30)
    config.add_optimization_profile(_profile(builder, spec))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # tactics in the engine inspector's layers
    fp32_layers = _apply_policy(trt, config, network, policy, onnx_path)
    _load_timing_cache(config, options.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{spec.name}: TensorRT could not build the {policy.name} engine:\n" + "\n".join(logger.errors))
    _save_timing_cache(config.get_timing_cache(), options.timing_cache)
    return BuiltEngine(bytes(serialized), policy, fp32_layers, time.time() - started)


def _apply_policy(trt, config, network, policy: PrecisionPolicy, onnx_path: Path) -> List[str]:
    """Builder flags and per-layer precisions of `policy`; returns the pinned layer names."""
    if not policy.fp16:
        config.clear_flag(trt.BuilderFlag.TF32)  # TensorRT enables TF32 by default: FP32 means FP32
        return []
    config.set_flag(trt.BuilderFlag.FP16)
    if not policy.pins_layers:
        return []
    flag = {PREFER: trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS, OBEY: trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    config.set_flag(flag[policy.constraints])
    plan = PrecisionPlan.for_policy(_graph_structure(onnx_path), policy)
    return pin_fp32_layers(trt, network, plan, policy.pinned)


def pin_fp32_layers(trt, network, plan: PrecisionPlan, groups: Collection[str]) -> List[str]:
    """Constrain the layers made from the plan's FP32 nodes, and every normalisation (softmax) layer
    when normalisations (softmaxes) are kept, to FP32 compute and FP32 float outputs.  Returns the
    pinned layer names."""
    by_type = {trt.LayerType.NORMALIZATION} if NORMALISATION in groups else set()
    by_type |= {trt.LayerType.SOFTMAX} if SOFTMAX in groups else set()
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        node = onnx_node_of(layer.name, getattr(layer, "metadata", ""), plan.fp32_nodes)
        if layer.type not in by_type and not (node and plan.keeps_fp32(node)):
            continue
        float_outputs = [j for j in range(layer.num_outputs)
                         if layer.get_output(j).dtype in (trt.float32, trt.float16)]
        if not float_outputs or layer.type == trt.LayerType.CONSTANT:
            continue
        layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


def attention_evidence(runner) -> Optional[dict]:
    """The engine inspector's attention layers: a diagnostic, so a failure to read them is recorded,
    not raised."""
    if not hasattr(runner, "attention_layers"):
        return None
    try:
        return runner.attention_layers()
    except Exception as exc:  # any inspector / JSON surprise: keep the build, say what happened
        return {"error": f"{type(exc).__name__}: {exc}"}


def build_gated(trt, spec: GraphSpec, onnx_path: Path, options: BuildOptions, ladder: Sequence[PrecisionPolicy],
                feeds: ReferenceFeeds) -> List[Attempt]:
    """Build under each policy of `ladder` in turn until the gate passes an engine; returns every
    attempt, the passing one last.  Raises GatedBuildError when none passes."""
    attempts: List[Attempt] = []
    for policy in ladder:
        engine = build_engine(trt, spec, onnx_path, options, policy)
        runner = engine_runner(trt, engine.plan)
        attempts.append(Attempt(engine, check_engine(spec, runner, feeds), attention_evidence(runner)))
        del runner
        print(format_report(attempts[-1].report), flush=True)
        if attempts[-1].report.passed:
            return attempts
        print(f"{spec.name}: policy {policy.name} rejected by the accuracy gate"
              + (", trying the next one" if policy is not ladder[-1] else ""), flush=True)
    raise GatedBuildError(spec.name, attempts)


def _graph_structure(onnx_path: Path):
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


def _profile(builder, spec: GraphSpec):
    profile = builder.create_optimization_profile()
    for name, shapes in optimization_profile(spec).items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    return profile


def _check_network_io(spec: GraphSpec, network) -> None:
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if inputs != list(spec.input_names) or outputs != list(spec.output_names):
        raise BuildError(f"{spec.name}: the ONNX graph's inputs {inputs} / outputs {outputs} are not the spec's "
                         f"{list(spec.input_names)} / {list(spec.output_names)}")


def _load_timing_cache(config, path: Optional[Path]) -> None:
    blob = path.read_bytes() if path and path.exists() else b""
    if not config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False):
        print(f"warning: timing cache {path} is from another GPU or TensorRT version; starting a new one",
              file=sys.stderr)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(cache, path: Optional[Path]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(cache.serialize()))


def recording_logger(trt):
    """A TensorRT logger that prints warnings and errors and keeps the errors for the exit message."""

    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: List[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return RecordingLogger()


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.tensorrt_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--repository", type=Path, default=Path("build/model_repository_tensorrt"),
                        help="Triton model repository (python -m serving.repository --flavor tensorrt); "
                             "plans go to <repository>/<graph>/1/")
    parser.add_argument("--graphs", nargs="+", choices=sorted(GRAPHS_BY_NAME), default=None,
                        help="default: the graphs of the family recorded in <onnx-dir>/manifest.json")
    parser.add_argument("--precision-policy", choices=list(POLICIES_BY_NAME), default=POLICIES[0].name,
                        help="the first policy tried; stricter ones follow while the accuracy gate rejects "
                             "the engine: " + ", ".join(f"{p.name} ({p.description})" for p in POLICIES))
    parser.add_argument("--no-fallback", action="store_true", help="try only --precision-policy")
    parser.add_argument("--fp32", action="store_true", help="same as --precision-policy fp32")
    parser.add_argument("--assets-dir", type=Path, default=None, help="sample images of the accuracy gate "
                        "(default: the repository's assets/)")
    parser.add_argument("--timing-cache", type=Path, default=Path("build/trt/timing.cache"))
    parser.add_argument("--workspace-gib", type=int, default=DEFAULT_WORKSPACE_GIB)
    parser.add_argument("--optional", action="store_true",
                        help="without TensorRT, say so and exit 0 instead of 3")
    parser.add_argument("--print-trtexec", action="store_true",
                        help="print the equivalent trtexec commands of the first policy and exit (no TensorRT needed)")
    args = parser.parse_args(argv)
    if args.fp32:
        args.precision_policy = "fp32"
    return args


def exported_family_graphs(onnx_dir: Path) -> List[GraphSpec]:
    """The graphs of the family `python -m export` recorded in the directory (EVF-SAM when there is no
    manifest to say otherwise)."""
    from evfsam.provenance import read_manifest
    from evfsam.specs import family

    manifest = read_manifest(onnx_dir) or {}
    return list(family(manifest.get("family", "ori")).graphs)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = BuildOptions(workspace_gib=args.workspace_gib, timing_cache=args.timing_cache)
    ladder = fallback_ladder(args.precision_policy, fallback=not args.no_fallback)
    specs = [GRAPHS_BY_NAME[name] for name in args.graphs] if args.graphs else exported_family_graphs(args.onnx_dir)
    missing = [str(args.onnx_dir / s.onnx_file) for s in specs if not (args.onnx_dir / s.onnx_file).exists()]
    if missing:
        print("error: missing ONNX graphs (run `python -m export` first): " + ", ".join(missing), file=sys.stderr)
        return EXIT_MISSING_ONNX
    if args.print_trtexec:
        print("# trtexec builds are not accuracy-gated: python -m export.tensorrt_build is", file=sys.stderr)
        for spec in specs:
            onnx_path = args.onnx_dir / spec.onnx_file
            fp32_layers = fp32_layer_names(_graph_structure(onnx_path), ladder[0]) if ladder[0].pins_layers else []
            print(" ".join(trtexec_command(spec, onnx_path, args.repository, options, ladder[0], fp32_layers)))
        return EXIT_OK
    trt = import_tensorrt()
    if trt is None:
        print("TensorRT is not importable here: no engines built.  Build them in the NGC export image "
              "(make docker-export, see docker/README.md).", file=sys.stderr)
        return EXIT_OK if args.optional else EXIT_NO_TENSORRT
    try:
        feeds = _reference_feeds(args)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISSING_ONNX
    return _build_all(trt, specs, args, options, ladder, feeds)


def _reference_feeds(args: argparse.Namespace) -> ReferenceFeeds:
    """The gate's references: every graph exported to --onnx-dir (graphs feed one another's inputs)."""
    available = [spec for spec in GRAPHS if (args.onnx_dir / spec.onnx_file).exists()]
    return reference_feeds(available, args.onnx_dir, args.assets_dir or ASSETS_DIR)


def _build_all(trt, specs: List[GraphSpec], args: argparse.Namespace, options: BuildOptions,
               ladder: Sequence[PrecisionPolicy], feeds: ReferenceFeeds) -> int:
    gpu = gpu_description()
    print(f"TensorRT {trt.__version__} on {gpu['name']} (sm {gpu['compute_capability']}); precision policies "
          f"{' -> '.join(p.name for p in ladder)}; accuracy gate on {len(feeds.cases)} cases", flush=True)
    for spec in specs:
        onnx_path = args.onnx_dir / spec.onnx_file
        try:
            attempts = build_gated(trt, spec, onnx_path, options, ladder, feeds)
        except (BuildError, EngineRunError, CudaError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BUILD_FAILED
        except GatedBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ACCURACY
        engine = attempts[-1].engine
        target = plan_path(args.repository, spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(engine.plan)
        metadata = build_metadata(spec, onnx_path, options, trt.__version__, gpu, attempts)
        metadata_path(args.repository, spec).write_text(json.dumps(metadata, indent=2) + "\n")
        print(f"built {target} ({len(engine.plan) / 2**20:.0f} MiB, policy {engine.policy.name}, "
              f"{len(engine.fp32_layers)} layers pinned to FP32, {len(attempts)} attempt(s)) in "
              f"{metadata['build_seconds']:.0f} s", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
