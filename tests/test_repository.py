"""The generated model repository: every flavor x device config parses as Triton ModelConfig and agrees
with the specs, every model has a bounded queue, and the repository says what it was built from."""
from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from evfsam.specs import (EVF_SAM, EVF_SAM_PROMPTS, IMAGE_CACHE_NAME, ORI, SAM2, TOKENIZER_FILE,
                          image_cache_spec)
from serving.repository import (DEFAULT_CACHE_MIB, PROVENANCE_FILE, RepositoryOptions, read_repository_provenance,
                                write_repository)

DTYPES = {v: k for k, v in model_config_pb2.DataType.items()}
VARIANTS = [("python-ort", "cpu"), ("python-ort", "gpu"), ("onnxruntime", "cpu"), ("onnxruntime", "gpu"),
            ("tensorrt", "gpu")]


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "-".join(v))
def repository(request, onnx_dir, tmp_path_factory):
    flavor, device = request.param
    out = tmp_path_factory.mktemp(f"{flavor}-{device}") / "repo"
    return flavor, device, write_repository(out, onnx_dir, RepositoryOptions(flavor=flavor, device=device))


def _kinds(config):
    return {model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group}


def test_engine_configs_follow_specs(repository):
    flavor, device, repo = repository
    platform = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx", "python-ort": ""}[flavor]
    for spec in ORI.graphs:
        config = parse(repo / spec.name / "config.pbtxt")
        assert config.name == spec.name and config.platform == platform
        assert config.max_batch_size == spec.max_batch_size
        assert [(i.name, DTYPES[i.data_type], list(i.dims)) for i in config.input] == [
            (t.name, t.triton_dtype, list(t.triton_dims(spec.triton_batching))) for t in spec.inputs]
        assert [o.name for o in config.output] == list(spec.output_names)
        assert list(config.dynamic_batching.preferred_batch_size) == list(spec.preferred_batch_sizes)
        assert _kinds(config) == {"KIND_GPU" if device == "gpu" else "KIND_CPU"}
        assert config.model_warmup
        version_dir = repo / spec.name / "1"
        if flavor == "python-ort":
            assert config.backend == "python" and (version_dir / "model.py").is_file()
            assert (version_dir / spec.onnx_file).is_file()
            providers = json.loads(config.parameters["execution_providers"].string_value)
            assert providers[0] == ("CUDAExecutionProvider" if device == "gpu" else "CPUExecutionProvider")
        elif flavor == "onnxruntime":
            assert (version_dir / "model.onnx").is_file()


def test_decoder_takes_one_image_broadcast_over_the_prompts(repository):
    _, _, repo = repository
    config = parse(repo / ORI.mask_decoder.name / "config.pbtxt")
    assert config.max_batch_size == 0  # two leading axes of different sizes: not batched by Triton
    assert {i.name: list(i.dims) for i in config.input} == {"image_embeddings": [-1, 256, 64, 64],
                                                            "text_embeds": [-1, 1, 256]}


def test_onnxruntime_on_gpu_uses_tensorrt_with_the_specs_profiles(onnx_dir, tmp_path):
    repo = write_repository(tmp_path / "repo", onnx_dir, RepositoryOptions(flavor="onnxruntime", device="gpu"))
    config = parse(repo / ORI.prompt_encoder.name / "config.pbtxt")
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt", "cuda"]
    trt = dict(accelerators[0].parameters)
    assert trt["precision_mode"] == "FP16" and trt["trt_engine_cache_enable"] == "1"
    assert trt["trt_profile_min_shapes"] == "images_evf:1x3x224x224,input_ids:1x2,attention_mask:1x2"
    assert trt["trt_profile_opt_shapes"] == "images_evf:4x3x224x224,input_ids:4x16,attention_mask:4x16"
    assert trt["trt_profile_max_shapes"] == "images_evf:16x3x224x224,input_ids:16x128,attention_mask:16x128"


def test_every_model_has_a_bounded_queue_that_rejects(repository):
    _, _, repo = repository
    for config_path in repo.glob("*/config.pbtxt"):
        policy = parse(config_path).dynamic_batching.default_queue_policy
        assert policy.max_queue_size > 0, config_path
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert policy.default_timeout_microseconds > 0 and policy.allow_timeout_override


def test_served_models_and_the_shared_cache(repository, tiny_checkpoint):
    _, _, repo = repository
    for spec in (EVF_SAM, EVF_SAM_PROMPTS):
        config = parse(repo / spec.name / "config.pbtxt")
        assert config.backend == "python" and config.max_batch_size == spec.max_batch_size
        assert [(i.name, i.optional) for i in config.input] == [(t.name, t.optional) for t in spec.inputs]
        assert [o.name for o in config.output] == [t.name for t in spec.outputs]
        assert _kinds(config) == {"KIND_CPU"}
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["contract"] == spec.name and params["family"] == "ori" and params["recipe"] == "ori"
        assert params["checkpoint"] == str(tiny_checkpoint) and len(params["checkpoint_sha256"]) == 64
        version_dir = repo / spec.name / "1"
        assert (version_dir / TOKENIZER_FILE).is_file()
        assert (version_dir / "evfsam" / "processing.py").is_file()  # the repository stands alone
        assert (version_dir / "model.py").read_bytes() == (repo / EVF_SAM.name / "1" / "model.py").read_bytes()
    cache = parse(repo / IMAGE_CACHE_NAME / "config.pbtxt")
    assert cache.model_transaction_policy.decoupled
    assert [g.count for g in cache.instance_group] == [1]  # one instance: one cache
    assert [o.name for o in cache.output] == [t.name for t in image_cache_spec(ORI).outputs]
    assert int(cache.parameters["cache_bytes"].string_value) == DEFAULT_CACHE_MIB["ori"] * 1024**2


def test_sam2_repository_serves_the_sam2_graphs(sam2_onnx_dir, tmp_path):
    repo = write_repository(tmp_path / "repo", sam2_onnx_dir, RepositoryOptions())
    assert {p.parent.name for p in repo.glob("*/config.pbtxt")} == {
        *(g.name for g in SAM2.graphs), EVF_SAM.name, EVF_SAM_PROMPTS.name, IMAGE_CACHE_NAME}
    params = parse(repo / EVF_SAM.name / "config.pbtxt").parameters
    assert (params["family"].string_value, params["recipe"].string_value) == ("sam2", "sam2-v2")
    cache = parse(repo / IMAGE_CACHE_NAME / "config.pbtxt")
    assert {o.name for o in cache.output} >= {"high_res_feats_0", "high_res_feats_1"}


def test_repository_records_its_provenance(onnx_dir, tmp_path):
    repo = write_repository(tmp_path / "repo", onnx_dir, RepositoryOptions())
    recorded = read_repository_provenance(repo)
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert recorded["export"]["checkpoint_sha256"] == manifest["checkpoint_sha256"]
    assert recorded["export"]["graphs"] == manifest["graphs"]
    assert recorded["options"]["flavor"] == "python-ort" and (repo / PROVENANCE_FILE).is_file()


def test_bad_options_are_refused(onnx_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown flavor 'openvino'"):
        write_repository(tmp_path / "a", onnx_dir, RepositoryOptions(flavor="openvino"))
    with pytest.raises(ValueError, match="tensorrt flavor runs on GPUs only"):
        write_repository(tmp_path / "b", onnx_dir, RepositoryOptions(flavor="tensorrt", device="cpu"))


def test_missing_export_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `make export` first"):
        write_repository(tmp_path / "repo", tmp_path / "no_onnx", RepositoryOptions())
