"""The benchmark suite's own logic: perf_analyzer input data, its output parsers, the statistics and
ratios, the report; one real perf_analyzer run against the session's tritonserver."""
from __future__ import annotations

import base64
import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from benchmarks import pa_inputs
from benchmarks import perf_analyzer as pa
from benchmarks.budgets import BUDGETS
from benchmarks.inprocess import STAGES
from benchmarks.report import comparison, summary_markdown
from benchmarks.samples import SAMPLE_IMAGE, derived_images, load_samples
from benchmarks.stats import LatencyStats, ratio, speedup
from evfsam.specs import EVF_SAM, GRAPHS
from tests import bench_support

DATA = Path(__file__).parent / "data" / "perf_analyzer"
IMAGE, PROMPT = EVF_SAM.inputs


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return load_samples(derived_images(SAMPLE_IMAGE, tmp_path_factory.mktemp("bench_images")))


def _decoded_elements(entry) -> list:
    """An input-data entry's payload, parsed by tritonclient's own BYTES deserialiser."""
    return [bytes(e) for e in deserialize_bytes_tensor(pa_inputs.decode_entry(entry))]


def test_ensemble_input_data_round_trips_real_files_and_prompts(samples):
    data = json.loads(json.dumps(pa_inputs.ensemble_input_data(samples)))  # as perf_analyzer reads it
    assert len(data["data"]) == len(samples) >= 4
    for step, sample in zip(data["data"], samples):
        assert set(step) == {IMAGE.name, PROMPT.name}
        assert step[IMAGE.name]["shape"] == list(IMAGE.shape[1:])
        assert _decoded_elements(step[IMAGE.name]) == [sample.image]
        assert _decoded_elements(step[PROMPT.name]) == [sample.prompt.encode("utf-8")]
    assert {s.describe()["format"] for s in samples} == {"JPEG", "PNG"}


def test_bytes_serialisation_matches_tritonclient():
    elements = [b"", b"zebra top left", "größer".encode(), bytes(range(256))]
    ours = pa_inputs.serialize_bytes_tensor(elements)
    assert ours == serialize_byte_tensor(np.array(elements, dtype=object)).item()
    assert pa_inputs.deserialize_bytes_tensor(ours) == elements
    with pytest.raises(ValueError):
        pa_inputs.deserialize_bytes_tensor(ours[:-1])


@pytest.mark.parametrize("spec", GRAPHS, ids=lambda s: s.name)
def test_engine_input_data_round_trips_tensors(spec):
    rng = np.random.default_rng(0)
    feeds = [spec.sample_inputs(rng, {"batch": 1}, vocab_size=256) for _ in range(2)]
    data = pa_inputs.engine_input_data(spec, feeds)
    for step, feed in zip(data["data"], feeds):
        for tensor in spec.inputs:
            entry = step[tensor.name]
            decoded = np.frombuffer(pa_inputs.decode_entry(entry), dtype=tensor.np_dtype).reshape(entry["shape"])
            np.testing.assert_array_equal(decoded, feed[tensor.name][0])
    with pytest.raises(ValueError, match="batch 1"):
        pa_inputs.engine_input_data(spec, [spec.sample_inputs(rng, {"batch": 2}, vocab_size=256)])


def test_latency_stats_percentiles_and_throughput():
    stats = LatencyStats.from_seconds([0.1, 0.2, 0.3, 0.4], items_per_call=2)
    assert stats.count == 4 and stats.min_ms == pytest.approx(100.0) and stats.mean_ms == pytest.approx(250.0)
    assert stats.p50_ms == pytest.approx(250.0) and stats.p99_ms == pytest.approx(397.0)
    assert stats.throughput == pytest.approx(8.0)  # 2 items per 0.25 s
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0.0) is None and ratio(None, 1.0) is None
    assert speedup(50.0, 100.0) == 2.0
    with pytest.raises(ValueError):
        LatencyStats.from_seconds([])


def test_request_counts_are_bounded():
    budget = BUDGETS["tiny"]
    assert budget.requests(1, latency_s=budget.level_seconds / 10) == 10
    assert budget.requests(4, latency_s=100.0) == budget.min_requests_per_stream * 4
    assert budget.requests(1, latency_s=1e-6) == budget.max_requests


def test_parses_real_perf_analyzer_ensemble_output():
    log = (DATA / "evf_sam_c2.log").read_text()
    point = pa.read_point(EVF_SAM.name, 51, DATA / "evf_sam_c2.csv", log)
    (row,) = pa.read_csv(DATA / "evf_sam_c2.csv")
    assert point.concurrency == 2 and point.throughput == row["Inferences/Second"] > 0
    assert point.p50_ms == row["p50 latency"] / 1000 <= point.p90_ms <= point.p95_ms <= point.p99_ms
    assert point.mean_ms == row["Avg latency"] / 1000 and "Server Queue" in point.client_ms
    assert set(point.server) == {EVF_SAM.name, *STAGES}
    for name in STAGES:
        composing = point.server[name]
        assert composing.inference_count == 51 and composing.execution_count <= 51
        assert composing.avg_batch >= 1.0
        assert sum(composing.parts_ms.values()) == pytest.approx(composing.avg_latency_ms, abs=0.01)
        assert {"queue", "compute infer"} <= set(composing.parts_ms)
    assert json.dumps(point.to_dict())


def test_parses_real_perf_analyzer_single_model_output():
    spec = GRAPHS[0]
    log = (DATA / f"{spec.name}_c1.log").read_text()
    point = pa.read_point(spec.name, 164, DATA / f"{spec.name}_c1.csv", log)
    assert set(point.server) == {spec.name}
    assert point.server[spec.name].inference_count == 164 and point.server[spec.name].avg_batch == 1.0


@pytest.fixture
def synthetic_results():
    return bench_support.synthetic_results()


def test_comparison_ratios_and_serving_overhead(synthetic_results):
    cmp = comparison(synthetic_results)
    eager, ort, single, best = cmp["rows"]
    assert eager["latency_speedup_vs_eager"] == 1.0
    assert ort["latency_speedup_vs_eager"] == 2.0 and ort["throughput_vs_eager"] == 2.0
    assert single["latency_speedup_vs_eager"] == pytest.approx(1.6) and "concurrency 1" in single["deployment"]
    assert best["throughput_vs_eager"] == pytest.approx(2.4) and "concurrency 2" in best["deployment"]
    overhead = cmp["serving_overhead_c1"]
    assert overhead["p50_ratio"] == 1.25 and overhead["p50_extra_ms"] == 50.0 and overhead["throughput_ratio"] == 0.8
    markdown = summary_markdown(synthetic_results, cmp, ["plot.png"])
    assert "| (c) Triton evf_sam, concurrency 2 |" in markdown and "**1.25×**" in markdown


@pytest.mark.triton
@bench_support.needs_perf_analyzer
def test_real_perf_analyzer_accepts_generated_input_data(triton_server, samples, tmp_path):
    data = pa_inputs.write_json(pa_inputs.ensemble_input_data(samples[:2]), tmp_path / "evf_sam.json")
    point = pa.run_point(EVF_SAM.name, triton_server.grpc_url, data, 1, 3, tmp_path)
    assert point.throughput > 0 and point.p50_ms > 0
    assert point.server[EVF_SAM.name].inference_count == 3
    assert set(STAGES) <= set(point.server)


class _EncodeState(ctypes.Structure):
    _fields_ = [("step", ctypes.c_int), ("result", ctypes.c_char), ("stepcount", ctypes.c_int)]


class _DecodeState(ctypes.Structure):
    _fields_ = [("step", ctypes.c_int), ("plainchar", ctypes.c_char)]


@pytest.fixture(scope="module")
def libb64_compat(tmp_path_factory):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    return pa.build_libb64_compat(tmp_path_factory.mktemp("libb64"))


def _chunks(data: bytes, rng) -> list:
    cuts = sorted(rng.integers(0, len(data) + 1, size=3).tolist())
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 53, 54, 55, 1000])
def test_libb64_compat_matches_python_base64_in_chunks(libb64_compat, size):
    lib = ctypes.CDLL(str(libb64_compat / pa.LIBB64))
    rng = np.random.default_rng(size)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    state, out = _EncodeState(), ctypes.create_string_buffer(2 * size + 16)
    lib.base64_init_encodestate(ctypes.byref(state))
    written = 0
    for chunk in _chunks(data, rng):
        written += lib.base64_encode_block(chunk, len(chunk), ctypes.byref(out, written), ctypes.byref(state))
    written += lib.base64_encode_blockend(ctypes.byref(out, written), ctypes.byref(state))
    encoded = out.raw[:written]
    # libb64 1.2's format: a newline after every 18 complete 3-byte groups (72 characters) and one at the end
    flat = base64.b64encode(data)
    complete = flat[: 4 * (size // 3)]
    expected = b"".join(complete[i:i + 72] + (b"\n" if i + 72 <= len(complete) else b"")
                        for i in range(0, len(complete), 72))
    expected += flat[len(complete):] + b"\n"
    assert encoded == expected
    decoder, plain = _DecodeState(), ctypes.create_string_buffer(size + 4)
    lib.base64_init_decodestate(ctypes.byref(decoder))
    produced = 0
    for chunk in _chunks(encoded, rng):
        produced += lib.base64_decode_block(chunk, len(chunk), ctypes.byref(plain, produced), ctypes.byref(decoder))
    assert plain.raw[:produced] == data


@bench_support.needs_perf_analyzer
def test_perf_analyzer_environment_leaves_no_library_missing():
    assert pa.missing_libraries(pa.binary(), pa.environment()) == []


@pytest.mark.triton
def test_real_perf_analyzer_runs_on_the_libb64_compat_build(libb64_compat, triton_server, samples, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", str(libb64_compat))
    env = pa.environment()
    loaded = subprocess.run([pa.binary()], env={**env, "LD_TRACE_LOADED_OBJECTS": "1"}, capture_output=True,
                            text=True).stdout
    assert f"{pa.LIBB64} => {libb64_compat / pa.LIBB64}" in loaded
    data = pa_inputs.write_json(pa_inputs.ensemble_input_data(samples[:2]), tmp_path / "evf_sam.json")
    point = pa.run_point(EVF_SAM.name, triton_server.grpc_url, data, 1, 2, tmp_path)
    assert point.server[EVF_SAM.name].inference_count == 2
