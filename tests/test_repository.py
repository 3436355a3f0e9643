"""The generated model repository: every flavor's configs parse as Triton ModelConfig and agree with
the graph specs."""
from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS, GRAPHS, TOKENIZER_FILE
from serving.repository import FLAVORS, RepositoryOptions, write_repository

DTYPES = {v: k for k, v in model_config_pb2.DataType.items()}


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module", params=FLAVORS)
def repository(request, onnx_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "repo"
    return request.param, write_repository(out, onnx_dir, RepositoryOptions(flavor=request.param))


def test_engine_configs_follow_specs(repository):
    flavor, repo = repository
    platform = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx", "python-ort": ""}[flavor]
    for spec in GRAPHS:
        config = parse(repo / spec.name / "config.pbtxt")
        assert config.name == spec.name and config.platform == platform
        assert config.max_batch_size == spec.max_batch_size
        assert [(i.name, DTYPES[i.data_type], list(i.dims)) for i in config.input] == [
            (t.name, t.triton_dtype, list(t.triton_dims())) for t in spec.inputs]
        assert [o.name for o in config.output] == list(spec.output_names)
        assert list(config.dynamic_batching.preferred_batch_size) == list(spec.preferred_batch_sizes)
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size > 0 and policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert config.model_warmup and config.instance_group
        version_dir = repo / spec.name / "1"
        if flavor == "python-ort":
            assert config.backend == "python" and (version_dir / "model.py").is_file()
            assert (version_dir / spec.onnx_file).is_file()
        elif flavor == "onnxruntime":
            assert (version_dir / "model.onnx").is_file()


def test_ensemble_and_prompts_model(repository):
    _, repo = repository
    ensemble = parse(repo / EVF_SAM.name / "config.pbtxt")
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == EVF_SAM.max_batch_size
    assert [i.name for i in ensemble.input] == [t.name for t in EVF_SAM.inputs]
    steps = [s.model_name for s in ensemble.ensemble_scheduling.step]
    assert steps == ["preprocess", *(g.name for g in GRAPHS), "postprocess"]
    produced = {t for s in ensemble.ensemble_scheduling.step for t in s.output_map.values()}
    consumed = {t for s in ensemble.ensemble_scheduling.step for t in s.input_map.values()}
    assert consumed - produced == {t.name for t in EVF_SAM.inputs}  # every tensor has a producer
    prompts = parse(repo / EVF_SAM_PROMPTS.name / "config.pbtxt")
    assert {i.name: i.optional for i in prompts.input} == {t.name: t.optional for t in EVF_SAM_PROMPTS.inputs}
    for model in ("preprocess", EVF_SAM_PROMPTS.name):
        assert (repo / model / "1" / TOKENIZER_FILE).is_file()
        assert (repo / model / "1" / "evfsam" / "processing.py").is_file()  # the repository stands alone


def test_unknown_flavor_is_refused(onnx_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown flavor 'openvino'"):
        write_repository(tmp_path / "repo", onnx_dir, RepositoryOptions(flavor="openvino"))


def test_missing_onnx_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `make export` first"):
        write_repository(tmp_path / "repo", tmp_path / "no_onnx", RepositoryOptions())
