"""The TensorRT path without TensorRT: profiles, operator support, the FP16 precision policies (checked
on ONNX Runtime with FP16 storage emulated), the builder's command line, and the builder's flow against
a stand-in for the `tensorrt` module (which checks this code, not TensorRT) with ONNX Runtime standing
in for the engines the accuracy gate runs (tests/test_accuracy_gate.py tests the gate itself)."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from evfsam.specs import BATCH, GRAPHS, GRAPHS_BY_NAME, ORI, SAM_IMAGE_ENCODER
from export import tensorrt_build as tb
from export.accuracy_gate import OnnxRuntimeRunner
from export.precision import (ALL_GROUPS, FP16_MAX, FP32_MODULES, NORMALISATION, POLICIES, POLICIES_BY_NAME, SOFTMAX,
                              PrecisionPlan, PrecisionPolicy, add_statistics, compare_fp16, emulate_fp16,
                              fallback_ladder, format_reports, keeps_fp32)
from export.trt_support import TENSORRT_VERSION, unsupported, unsupported_ops

REPO_ROOT = Path(__file__).resolve().parent.parent
FP16_REL_TOLERANCE = 1e-2  # max |fp16 - fp32| / max |fp32| per output


# ---------------------------------------------------------------------------------------------------
# fixtures: a tiny random-weight checkpoint and its three graphs, built here in tmp dirs


@pytest.fixture(scope="module")
def tiny_model(loaded_model, tiny_checkpoint):
    model, config = loaded_model
    return model, config, tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_graphs(onnx_dir) -> Path:
    """The tiny EVF-SAM checkpoint's exported graphs (with manifest and tokenizer)."""
    return onnx_dir


@pytest.fixture(scope="module")
def graph_and_config(onnx_dir, sam2_onnx_dir, loaded_model, loaded_sam2_model):
    """graph spec -> (its exported file, the config of the model it came from), for both families."""
    def find(spec):
        if spec in ORI.graphs:
            return onnx_dir / spec.onnx_file, loaded_model[1]
        return sam2_onnx_dir / spec.onnx_file, loaded_sam2_model[1]
    return find


def sample(spec, config, seed=0, batch=2) -> Dict[str, np.ndarray]:
    return spec.sample_inputs(np.random.default_rng(seed), {BATCH: batch}, config.beit3.vocab_size)


# ---------------------------------------------------------------------------------------------------
# profiles: the engines and their Triton configurations come from the same spec


@pytest.mark.parametrize("spec", GRAPHS, ids=lambda s: s.name)
def test_profile_covers_spec_axes(spec):
    profile = tb.optimization_profile(spec)
    assert list(profile) == list(spec.input_names)
    for tensor in spec.inputs:
        shapes = profile[tensor.name]
        leading = spec.axes[tensor.shape[0]]  # BATCH, or IMAGES for a decoder's image features
        assert shapes["min"][0] == leading.min and shapes["max"][0] == leading.max
        for axis, dim in enumerate(tensor.shape):
            low, opt, high = (shapes[p][axis] for p in tb.PROFILE_POINTS)
            assert low <= opt <= high
            if isinstance(dim, int):
                assert low == opt == high == dim
            else:
                assert (low, opt, high) == (spec.axes[dim].min, spec.axes[dim].opt, spec.axes[dim].max)


@pytest.fixture(scope="module")
def tensorrt_repository(tiny_graphs, tmp_path_factory) -> Path:
    pytest.importorskip("serving.repository")
    out = tmp_path_factory.mktemp("trt_repository") / "repo"
    command = [sys.executable, "-m", "serving.repository", "--flavor", "tensorrt", "--device", "gpu",
               "--onnx-dir", str(tiny_graphs), "--output", str(out)]
    subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
    return out


def read_config(path: Path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("spec", ORI.graphs, ids=lambda s: s.name)
def test_tensorrt_model_config_agrees_with_profile(tensorrt_repository, spec):
    config = read_config(tensorrt_repository / spec.name / "config.pbtxt")
    profile = tb.optimization_profile(spec)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == spec.max_batch_size
    first_axis = 1 if spec.triton_batching else 0  # Triton's batch axis is not in dims
    if spec.triton_batching:
        assert config.max_batch_size == profile[spec.input_names[0]]["max"][0]
        assert max(config.dynamic_batching.preferred_batch_size) <= config.max_batch_size
    assert Path(tb.plan_path(tensorrt_repository, spec)).parent.is_dir()
    for entry in config.input:
        shapes = profile[entry.name]
        expected = [-1 if shapes["min"][axis] != shapes["max"][axis] else shapes["max"][axis]
                    for axis in range(first_axis, len(shapes["max"]))]
        assert list(entry.dims) == expected, entry.name
    for warmup in config.model_warmup:
        for name, tensor in warmup.inputs.items():
            shapes = profile[name]
            full = ([warmup.batch_size] if spec.triton_batching else []) + list(tensor.dims)
            assert all(lo <= d <= hi for d, lo, hi in zip(full, shapes["min"], shapes["max"])), name


# ---------------------------------------------------------------------------------------------------
# operator support for the targeted TensorRT


@pytest.mark.parametrize("spec", GRAPHS, ids=lambda s: s.name)
def test_exported_graphs_use_only_supported_operators(graph_and_config, spec):
    findings = unsupported_ops(graph_and_config(spec)[0])
    assert not findings, f"not parseable by TensorRT {TENSORRT_VERSION}:\n" + "\n".join(map(str, findings))


def test_support_check_reports_unknown_ops_opsets_and_types():
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="/u/Unique"),
             helper.make_node("Cast", ["x"], ["d"], name="/c/Cast", to=TensorProto.DOUBLE),
             helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="/s/Unsqueeze")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("u", "y")],
        value_info=[helper.make_tensor_value_info("d", TensorProto.DOUBLE, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    problems = {(f.node, f.problem.split()[0]) for f in unsupported(model)}
    assert ("/u/Unique", "operator") in problems
    assert ("/s/Unsqueeze", "input") in problems  # axes must be a build-time constant
    assert ("d", "DOUBLE") in problems
    assert ("<model>", "opset") in problems


# ---------------------------------------------------------------------------------------------------
# the precision plan


def test_precision_rule():
    assert keeps_fp32("LayerNormalization", "/blocks.0/norm1/LayerNormalization")
    assert keeps_fp32("Softmax", "/blocks.0/attn/Softmax")
    assert keeps_fp32("Conv", "/image_encoder/neck/neck.0/Conv")
    assert keeps_fp32("Sub", "/up/up.1/Sub", norm_scopes={"/up/up.1/"})
    assert not keeps_fp32("MatMul", "/blocks.0/attn/MatMul")
    assert not keeps_fp32("Conv", "/image_encoder/patch_embed/proj/Conv")
    # each group alone
    assert not keeps_fp32("Softmax", "/blocks.0/attn/Softmax", groups={NORMALISATION, FP32_MODULES})
    assert not keeps_fp32("LayerNormalization", "/blocks.0/norm1/LayerNormalization", groups={SOFTMAX})
    assert not keeps_fp32("Conv", "/image_encoder/neck/neck.0/Conv", groups={NORMALISATION})
    assert not keeps_fp32("Sub", "/up/up.1/Sub", norm_scopes={"/up/up.1/"}, groups={SOFTMAX, FP32_MODULES})


def test_policies_go_from_fastest_to_strictest():
    assert [p.name for p in POLICIES] == ["fp16", "fp16-prefer-norms", "fp16-obey-norms-softmax", "fp32"]
    assert [p.name for p in fallback_ladder("fp16-prefer-norms")] == ["fp16-prefer-norms", "fp16-obey-norms-softmax",
                                                                      "fp32"]
    assert [p.name for p in fallback_ladder("fp16", fallback=False)] == ["fp16"]
    assert POLICIES_BY_NAME["fp16-obey-norms-softmax"].pinned == ALL_GROUPS
    with pytest.raises(ValueError, match="pins nothing"):
        PrecisionPolicy("bad", False, "obey", frozenset({SOFTMAX}), "")
    with pytest.raises(ValueError, match="need"):
        PrecisionPolicy("bad", True, "obey", frozenset(), "")


def fp32_ops(path: Path) -> Dict[str, str]:
    model = onnx.load(str(path))
    plan = PrecisionPlan.for_model(model)
    return {n.name: n.op_type for n in model.graph.node if plan.keeps_fp32(n.name)}


def test_plan_keeps_norms_softmax_and_sam_neck_fp32(tiny_graphs):
    model = onnx.load(str(tiny_graphs / SAM_IMAGE_ENCODER.onnx_file))
    kept = fp32_ops(tiny_graphs / SAM_IMAGE_ENCODER.onnx_file)
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax") or "/neck/" in node.name:
            assert node.name in kept, node.name
        if node.op_type in ("MatMul", "Einsum", "Erf"):  # the attention / MLP compute stays FP16
            assert node.name not in kept, node.name
    decoder = fp32_ops(tiny_graphs / GRAPHS_BY_NAME["prompt_mask_decoder"].onnx_file)
    layer_norm_2d = {name for name in decoder if name.startswith("/output_upscaling/output_upscaling.1/")}
    assert {"Pow", "Sqrt", "Div", "Sub"} <= {decoder[name] for name in layer_norm_2d}
    assert not any(op in ("MatMul", "Gemm", "ConvTranspose") for op in decoder.values())


def square_model(value_name="y") -> onnx.ModelProto:
    node = helper.make_node("Mul", ["x", "x"], [value_name], name="/block/Mul")
    graph = helper.make_graph([node], "square", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(value_name, TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_model(model: onnx.ModelProto, inputs, outputs=None):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, inputs)


def test_emulation_stores_fp16_outside_the_plan_and_fp32_inside():
    x = {"x": np.array([300.0, 1.0 / 3.0], np.float32)}  # 300^2 > 65504
    fp16, activations = emulate_fp16(square_model(), PrecisionPlan.unprotected())
    assert activations == ["x::fp16", "y"]  # the input entering the FP16 region, the product
    squared, absmax = run_model(add_statistics(fp16, ["y"]), x, ["y", "y::absmax"])
    assert np.isinf(squared[0]) and np.isinf(absmax)
    assert squared[1] == np.float32(np.float16(np.float16(1 / 3) ** 2))
    kept, activations = emulate_fp16(square_model(), PrecisionPlan(frozenset({"/block/Mul"})))
    assert activations == [] and run_model(kept, x)[0][0] == 90000.0


@pytest.mark.parametrize("spec", GRAPHS, ids=lambda s: s.name)
def test_fp16_plan_is_finite_and_close_to_fp32(graph_and_config, spec):
    path, config = graph_and_config(spec)
    inputs = sample(spec, config)
    report = compare_fp16(path, inputs, graph=spec.name)
    print("\n" + format_reports([report]))
    assert report.ok, f"FP16 overflow in {report.first_overflow}"
    assert report.largest_fp16_value < FP16_MAX / 16
    for output in report.outputs:
        assert output.max_rel < FP16_REL_TOLERANCE, output


@pytest.fixture(scope="module")
def large_activation_encoder(tiny_model, tmp_path_factory) -> Path:
    """The tiny SAM encoder with a residual stream in the hundreds (the scale of the outlier
    channels of large ViTs): its positional embedding scaled x1000."""
    import copy

    import torch

    from export.onnx_export import export_graph

    model = copy.deepcopy(tiny_model[0])
    with torch.no_grad():
        model.visual_model.image_encoder.pos_embed.mul_(1000.0)
    return export_graph(model, SAM_IMAGE_ENCODER, tmp_path_factory.mktemp("trt_large_activations"))


def test_plan_prevents_the_neck_overflow_of_an_unprotected_fp16_encoder(large_activation_encoder, tiny_model):
    inputs = sample(SAM_IMAGE_ENCODER, tiny_model[1], batch=1)
    planned = compare_fp16(large_activation_encoder, inputs)
    naive = compare_fp16(large_activation_encoder, inputs, PrecisionPlan.unprotected())
    print("\n" + format_reports([planned, naive]))
    assert planned.ok and planned.outputs[0].max_rel < FP16_REL_TOLERANCE
    # Unprotected, (x - u)^2 of SAM's LayerNorm2d overflows in the neck: the output stays finite
    # (x / sqrt(inf) = 0) but is wrong, which nothing downstream would notice.
    assert naive.first_overflow and "/neck/" in naive.first_overflow
    assert naive.outputs[0].max_rel > 0.1


@pytest.mark.slow
def test_fp16_plan_on_full_size_random_weights(tmp_path_factory):
    """SAM ViT-H + BEiT-3 large with random weights: 8 minutes and 17 GB peak RAM on 2 cores (the
    checkpoint and the export; the comparisons alone take ~9 GB)."""
    from evfsam.checkpoint import load_evf_sam
    from export.onnx_export import export_graph
    from export.tiny_checkpoint import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("trt_full_checkpoint"), size="full")
    model, config, _ = load_evf_sam(checkpoint)
    out = tmp_path_factory.mktemp("trt_full_onnx")
    paths = {spec.name: export_graph(model, spec, out, vocab_size=config.beit3.vocab_size) for spec in ORI.graphs}
    del model
    reports = []
    for spec in ORI.graphs:
        inputs = sample(spec, config, batch=1)
        reports.append(compare_fp16(paths[spec.name], inputs, graph=spec.name, threads=2))
        reports.append(compare_fp16(paths[spec.name], inputs, PrecisionPlan.unprotected(), spec.name, threads=2))
    print("\n" + format_reports(reports))
    for report in reports[::2]:
        assert report.ok and all(o.max_rel < FP16_REL_TOLERANCE for o in report.outputs), report


# ---------------------------------------------------------------------------------------------------
# the builder's command line


def run_builder(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.tensorrt_build", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True)


@pytest.mark.skipif(tb.import_tensorrt() is not None, reason="TensorRT is installed here")
def test_builder_without_tensorrt_exits_3_or_0_when_optional(tiny_graphs, tmp_path):
    args = ["--onnx-dir", str(tiny_graphs), "--repository", str(tmp_path / "repo")]
    missing = run_builder(*args)
    assert missing.returncode == tb.EXIT_NO_TENSORRT == 3
    assert "TensorRT is not importable" in missing.stderr
    optional = run_builder(*args, "--optional")
    assert optional.returncode == 0 and "TensorRT is not importable" in optional.stderr
    assert not (tmp_path / "repo").exists()


def test_builder_exits_2_on_missing_onnx(tmp_path):
    result = run_builder("--onnx-dir", str(tmp_path), "--repository", str(tmp_path / "repo"))
    assert result.returncode == tb.EXIT_MISSING_ONNX
    assert SAM_IMAGE_ENCODER.onnx_file in result.stderr


def test_print_trtexec_uses_the_profile_and_the_policy(tiny_graphs, tmp_path):
    spec = GRAPHS_BY_NAME["beit3_fusion_encoder"]
    args = ["--onnx-dir", str(tiny_graphs), "--repository", str(tmp_path), "--graphs", spec.name, "--print-trtexec"]
    strict = run_builder(*args, "--precision-policy", "fp16-obey-norms-softmax")
    assert strict.returncode == 0, strict.stderr
    shapes = spec.profile_shapes("max")
    expected = ",".join(f"{name}:{'x'.join(map(str, shapes[name]))}" for name in spec.input_names)
    assert f"--maxShapes={expected}" in strict.stdout
    layer_norms = [n for n, op in fp32_ops(tiny_graphs / spec.onnx_file).items() if op == "LayerNormalization"]
    softmaxes = [n for n, op in fp32_ops(tiny_graphs / spec.onnx_file).items() if op == "Softmax"]
    pins = strict.stdout.split("--layerPrecisions=")[1].split()[0]
    assert f"{layer_norms[0]}:fp32" in pins and f"{softmaxes[0]}:fp32" in pins and "Constant" not in pins
    assert f"--layerOutputTypes={pins}" in strict.stdout
    assert "--precisionConstraints=obey" in strict.stdout and "--fp16" in strict.stdout
    fastest = run_builder(*args)
    assert "--fp16" in fastest.stdout and "--precisionConstraints=none" in fastest.stdout
    assert "--layerPrecisions" not in fastest.stdout and "not accuracy-gated" in fastest.stderr
    fp32 = run_builder(*args, "--fp32")
    assert "--fp16" not in fp32.stdout and "--noTF32" in fp32.stdout


def test_onnx_node_of_layer():
    nodes = ["/a/LayerNormalization", "/a/Add_1"]
    assert tb.onnx_node_of("whatever", "[ONNX Layer: /a/LayerNormalization]", nodes) == nodes[0]
    assert tb.onnx_node_of("/a/Add_1", "", nodes) == "/a/Add_1"
    assert tb.onnx_node_of("/a/LayerNormalization_3", "", nodes) == nodes[0]
    assert tb.onnx_node_of("ONNXTRT_helper", "", nodes) is None


# ---------------------------------------------------------------------------------------------------
# the builder's flow against a stand-in `tensorrt` module


class FakeLayer:
    def __init__(self, name: str, layer_type: str, metadata: str, output_dtypes: List[str]):
        self.name, self.type, self.metadata = name, layer_type, metadata
        self._dtypes = list(output_dtypes)
        self.precision = None
        self.output_types: Dict[int, str] = {}

    @property
    def num_outputs(self):
        return len(self._dtypes)

    def get_output(self, i):
        return types.SimpleNamespace(dtype=self._dtypes[i])

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class FakeNetwork:
    def __init__(self):
        self.inputs, self.outputs, self.layers = [], [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i):
        return types.SimpleNamespace(name=self.inputs[i])

    def get_output(self, i):
        return types.SimpleNamespace(name=self.outputs[i])

    def get_layer(self, i):
        return self.layers[i]


LAYER_TYPES = {"LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX"}


def fake_tensorrt(parse_error: str = "", build_error: str = "") -> types.ModuleType:
    """Just the API surface export/tensorrt_build.py uses; the parser makes one layer per ONNX node
    (plus an unnamed-metadata helper layer `<node>_1` per normalisation, as the real parser does)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TENSORRT_VERSION
    trt.float32, trt.float16, trt.int64 = "float32", "float16", "int64"
    trt.LayerType = types.SimpleNamespace(NORMALIZATION="NORMALIZATION", SOFTMAX="SOFTMAX", CONSTANT="CONSTANT")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY",
                                            PREFER_PRECISION_CONSTRAINTS="PREFER", TF32="TF32")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.ILogger = type("ILogger", (), {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3,
                                       "__init__": lambda self: None})
    trt.built, trt.builds = {}, []

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 1 if parse_error else 0

        def get_error(self, i):
            return parse_error

        def parse_from_file(self, path):
            if parse_error:
                return False
            graph = onnx.load(path, load_external_data=False).graph
            self.network.inputs = [i.name for i in graph.input]
            self.network.outputs = [o.name for o in graph.output]
            for node in graph.node:
                if node.op_type == "Constant":
                    continue
                dtype = "int64" if node.op_type in ("Shape", "Equal") else "float32"
                layer_type = LAYER_TYPES.get(node.op_type, node.op_type.upper())
                self.network.layers.append(FakeLayer(node.name, layer_type, f"[ONNX Layer: {node.name}]", [dtype]))
                if layer_type == "NORMALIZATION":
                    self.network.layers.append(FakeLayer(node.name + "_1", "SHUFFLE", "", ["float32"]))
            return True

    class Config:
        def __init__(self):
            self.flags, self.profiles = {"TF32"}, []  # TensorRT sets TF32 by default
            self.profiling_verbosity = None

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def create_timing_cache(self, blob):
            return types.SimpleNamespace(serialize=lambda: blob + b"+timing")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing_cache = cache
            return True

        def get_timing_cache(self):
            return self.timing_cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return FakeNetwork()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(shapes={}, set_shape=lambda name, *s: profile_shapes.__setitem__(name, s))

        def build_serialized_network(self, network, config):
            if build_error:
                self.logger.log(trt.ILogger.ERROR, build_error)
                return None
            trt.built.update(network=network, config=config, profile=dict(profile_shapes))
            trt.builds.append(dict(trt.built))
            return b"plan-bytes"

    profile_shapes: Dict[str, tuple] = {}
    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


def faithful(graphs: Path):
    """Engines that compute exactly the ONNX graph: the gate passes them."""
    return lambda trt, plan: OnnxRuntimeRunner(graphs / GRAPHS_BY_NAME[trt.built["graph"]].onnx_file, label="faithful")


def build_with(monkeypatch, trt, tiny_graphs, tmp_path, *extra, runner=None) -> int:
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tb, "engine_runner", runner or faithful(tiny_graphs))
    real_build = tb.build_engine

    def build_engine(trt_module, spec, onnx_path, options, policy):
        trt.built["graph"] = spec.name
        return real_build(trt_module, spec, onnx_path, options, policy)

    monkeypatch.setattr(tb, "build_engine", build_engine)
    return tb.main(["--onnx-dir", str(tiny_graphs), "--repository", str(tmp_path / "repo"),
                    "--timing-cache", str(tmp_path / "timing.cache"), *extra])


def test_builder_writes_plan_metadata_and_timing_cache(monkeypatch, tiny_graphs, tmp_path):
    from export.onnx_export import file_digest

    trt = fake_tensorrt()
    assert build_with(monkeypatch, trt, tiny_graphs, tmp_path, "--graphs", SAM_IMAGE_ENCODER.name) == 0
    repo = tmp_path / "repo"
    assert tb.plan_path(repo, SAM_IMAGE_ENCODER).read_bytes() == b"plan-bytes"
    metadata = json.loads(tb.metadata_path(repo, SAM_IMAGE_ENCODER).read_text())
    assert metadata["tensorrt_version"] == TENSORRT_VERSION and metadata["precision"] == "fp16"
    assert metadata["precision_policy"]["name"] == "fp16" and len(metadata["attempts"]) == 1
    assert metadata["max_batch_size"] == SAM_IMAGE_ENCODER.max_batch_size
    assert metadata["onnx"]["sha256"] == file_digest(tiny_graphs / SAM_IMAGE_ENCODER.onnx_file)
    profile = tb.optimization_profile(SAM_IMAGE_ENCODER)
    assert metadata["profile"] == {n: {k: list(v) for k, v in s.items()} for n, s in profile.items()}
    assert trt.built["profile"] == {n: tuple(s[p] for p in tb.PROFILE_POINTS) for n, s in profile.items()}
    assert trt.built["config"].flags == {"FP16", "TF32"} and trt.built["config"].profiling_verbosity == "DETAILED"
    assert (tmp_path / "timing.cache").read_bytes() == b"+timing"
    accuracy = metadata["accuracy"]
    assert accuracy["passed"] and accuracy["engine"] == "faithful" and "onnxruntime" in accuracy["reference"]
    assert {c["case"] for c in accuracy["checks"]} == {f"{image}|{case}" for image in ("demo_scene.png", "sample.jpg")
                                                       for case in ("4 prompts", "1 prompt padded to 128")}


def pinning_graph() -> onnx.ModelProto:
    """A hand-made graph with one node of every kind the policies treat differently."""
    f = TensorProto.FLOAT
    weights = [helper.make_tensor(name, f, [8, 8], np.eye(8, dtype=np.float32).ravel().tolist())
               for name in ("w_q", "w_v", "w_neck")]
    weights += [helper.make_tensor("ln_scale", f, [8], [1.0] * 8), helper.make_tensor("ln_bias", f, [8], [0.0] * 8),
                helper.make_tensor("axes", TensorProto.INT64, [1], [-1]), helper.make_tensor("eps", f, [], [1e-6])]
    node = helper.make_node
    nodes = [
        node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["n"], name="/blocks.0/norm1/LayerNormalization"),
        node("MatMul", ["n", "w_q"], ["q"], name="/blocks.0/attn/MatMul"),
        node("Softmax", ["q"], ["p"], name="/blocks.0/attn/Softmax", axis=-1),
        node("MatMul", ["p", "w_v"], ["a"], name="/blocks.0/attn/MatMul_1"),
        node("Relu", ["a"], ["r"], name="/blocks.0/mlp/act/Relu"),
        node("MatMul", ["r", "w_neck"], ["c"], name="/neck/neck.0/MatMul"),
        node("Shape", ["c"], ["c_shape"], name="/neck/neck.0/Shape"),
        # SAM's LayerNorm2d as exported: mean / pow / sqrt make the whole scope a normalisation
        node("ReduceMean", ["c", "axes"], ["u"], name="/up/up.1/ReduceMean"),
        node("Sub", ["c", "u"], ["d"], name="/up/up.1/Sub"),
        node("Constant", [], ["two"], name="/up/up.1/Constant", value=helper.make_tensor("two", f, [], [2.0])),
        node("Pow", ["d", "two"], ["d2"], name="/up/up.1/Pow"),
        node("ReduceMean", ["d2", "axes"], ["v"], name="/up/up.1/ReduceMean_1"),
        node("Add", ["v", "eps"], ["ve"], name="/up/up.1/Add"),
        node("Sqrt", ["ve"], ["s"], name="/up/up.1/Sqrt"),
        node("Div", ["d", "s"], ["y"], name="/up/up.1/Div"),
        node("Add", ["y", "r"], ["out"], name="/head/Add"),
    ]
    graph = helper.make_graph(nodes, "pinning", [helper.make_tensor_value_info("x", f, [2, 8])],
                              [helper.make_tensor_value_info("out", f, [2, 8]),
                               helper.make_tensor_value_info("c_shape", TensorProto.INT64, [2])], initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# Written out by hand from the rule in export/precision.py's docstring, not computed by it.
NORMALISATION_LAYERS = {
    "/blocks.0/norm1/LayerNormalization", "/blocks.0/norm1/LayerNormalization_1",  # its helper layer too
    "/up/up.1/ReduceMean", "/up/up.1/Sub", "/up/up.1/Pow", "/up/up.1/ReduceMean_1", "/up/up.1/Add",
    "/up/up.1/Sqrt", "/up/up.1/Div",
}
NECK_LAYERS = {"/neck/neck.0/MatMul"}  # not its Shape: an int64 output has no precision
EXPECTED_PINS = {
    "fp16": (set(), {"FP16", "TF32"}),
    "fp16-prefer-norms": (NORMALISATION_LAYERS | NECK_LAYERS, {"FP16", "TF32", "PREFER"}),
    "fp16-obey-norms-softmax": (NORMALISATION_LAYERS | NECK_LAYERS | {"/blocks.0/attn/Softmax"}, {"FP16", "TF32", "OBEY"}),
    "fp32": (set(), set()),
}


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_builder_pins_the_layers_of_the_policy(tmp_path, policy):
    onnx_path = tmp_path / "pinning.onnx"
    onnx.save(pinning_graph(), str(onnx_path))
    spec = types.SimpleNamespace(name="pinning", input_names=("x",), output_names=("out", "c_shape"),
                                 profile_shapes=lambda which: {"x": (2, 8)}, axes={})
    trt = fake_tensorrt()
    engine = tb.build_engine(trt, spec, onnx_path, tb.BuildOptions(), policy)
    pinned, flags = EXPECTED_PINS[policy.name]
    layers = trt.built["network"].layers
    assert {layer.name for layer in layers if layer.precision == "float32"} == pinned
    assert {layer.name for layer in layers if layer.output_types == {0: "float32"}} == pinned
    assert set(engine.fp32_layers) == pinned
    assert trt.built["config"].flags == flags


def test_builder_falls_back_to_a_stricter_policy_when_the_gate_rejects_the_engine(monkeypatch, tiny_graphs, tmp_path):
    decoder = GRAPHS_BY_NAME["prompt_mask_decoder"]
    engines = iter([OnnxRuntimeRunner(noisy_decoder(tiny_graphs, tmp_path), label="noisy"),
                    OnnxRuntimeRunner(tiny_graphs / decoder.onnx_file, label="faithful")])
    trt = fake_tensorrt()
    status = build_with(monkeypatch, trt, tiny_graphs, tmp_path, "--graphs", decoder.name,
                        runner=lambda trt_module, plan: next(engines))
    assert status == 0
    metadata = json.loads(tb.metadata_path(tmp_path / "repo", decoder).read_text())
    first, second = metadata["attempts"]
    assert first["policy"] == "fp16" and not first["passed"] and "'low_res_masks'" in first["failure"]
    assert second["policy"] == "fp16-prefer-norms" and second["passed"] and second["failure"] is None
    assert metadata["precision_policy"]["name"] == "fp16-prefer-norms" and metadata["fp32_layers"]
    assert [b["config"].flags for b in trt.builds] == [{"FP16", "TF32"}, {"FP16", "TF32", "PREFER"}]
    masks = [c for c in metadata["accuracy"]["checks"] if c["output"] == "low_res_masks"]
    assert masks and all(c["mask_iou"] == 1.0 for c in masks)


def noisy_decoder(graphs: Path, tmp_path: Path) -> Path:
    from tests.test_accuracy_gate import perturbed_graph

    noise = np.random.default_rng(0).normal(0, 1.0, (1, 1, 256, 256))
    return perturbed_graph(graphs / "prompt_mask_decoder.onnx", "low_res_masks", noise, tmp_path / "noisy")


@pytest.mark.parametrize("extra", [(), ("--no-fallback",)], ids=["every-policy", "no-fallback"])
def test_builder_writes_no_plan_when_no_policy_passes(monkeypatch, tiny_graphs, tmp_path, capsys, extra):
    decoder = GRAPHS_BY_NAME["prompt_mask_decoder"]
    noisy = noisy_decoder(tiny_graphs, tmp_path)
    trt = fake_tensorrt()
    status = build_with(monkeypatch, trt, tiny_graphs, tmp_path, "--graphs", decoder.name, *extra,
                        runner=lambda trt_module, plan: OnnxRuntimeRunner(noisy, label="noisy"))
    assert status == tb.EXIT_ACCURACY == 4
    error = capsys.readouterr().err
    assert "prompt_mask_decoder" in error and "'low_res_masks'" in error and "x over" in error
    assert len(trt.builds) == (1 if extra else len(POLICIES))
    assert not tb.plan_path(tmp_path / "repo", decoder).exists()


def test_builder_fp32_pins_nothing_and_disables_tf32(monkeypatch, tiny_graphs, tmp_path):
    trt = fake_tensorrt()
    assert build_with(monkeypatch, trt, tiny_graphs, tmp_path, "--graphs", SAM_IMAGE_ENCODER.name, "--fp32") == 0
    assert not trt.built["config"].flags
    assert not any(layer.precision for layer in trt.built["network"].layers)
    metadata = json.loads(tb.metadata_path(tmp_path / "repo", SAM_IMAGE_ENCODER).read_text())
    assert metadata["precision"] == "fp32" and metadata["precision_policy"]["name"] == "fp32"


@pytest.mark.parametrize("failure", ["parse", "build"])
def test_builder_failure_exits_1_with_tensorrt_message(monkeypatch, tiny_graphs, tmp_path, capsys, failure):
    message = f"fake TensorRT {failure} error: In node 12 (importFoo): UNSUPPORTED_NODE"
    trt = fake_tensorrt(**{f"{failure}_error": message})
    assert build_with(monkeypatch, trt, tiny_graphs, tmp_path) == tb.EXIT_BUILD_FAILED
    assert message in capsys.readouterr().err
    assert not tb.plan_path(tmp_path / "repo", SAM_IMAGE_ENCODER).exists()


def test_cuda_runtime_round_trip_or_cuda_error():
    """The TensorRT runner's device memory: a real round trip where a GPU is visible, else CUDA's
    own error message as a CudaError (never a silent zero)."""
    from export.trt_runner import CudaError, CudaRuntime

    try:
        cuda = CudaRuntime()
    except CudaError as exc:
        pytest.skip(str(exc))
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    try:
        pointer = cuda.malloc(data.nbytes)
    except CudaError as exc:
        assert "cudaMalloc(48) failed with CUDA error" in str(exc)
        return
    back = np.full_like(data, np.nan)
    cuda.to_device(pointer, data)
    cuda.to_host(back, pointer)
    cuda.free(pointer)
    np.testing.assert_array_equal(back, data)
