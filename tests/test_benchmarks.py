"""The benchmark suite's own logic: perf_analyzer input data, its output parsers, byte-distinct images,
the statistics and ratios, the report; (b) against (a) for both families; real perf_analyzer runs
against the session's tritonserver, checked against Triton's own statistics."""
from __future__ import annotations

import base64
import ctypes
import json
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from benchmarks import pa_inputs, server_stats, triton_sweep
from benchmarks import perf_analyzer as pa
from benchmarks.budgets import BUDGETS
from benchmarks.flops import image_encoder_flops
from benchmarks.inprocess import EagerPipeline, OrtPipeline, batch_feed
from benchmarks.report import comparison, summary_markdown
from benchmarks.samples import SAMPLE_IMAGE, derived_images, distinct_images, load_samples, tagged
from benchmarks.stats import LatencyStats, ratio, speedup
from evfsam.embedding_cache import image_key
from evfsam.processing import decode_image
from evfsam.specs import EVF_SAM, GRAPHS, IMAGE_CACHE_NAME, ORI, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER
from tests import bench_support

DATA = Path(__file__).parent / "data" / "perf_analyzer"
IMAGE, PROMPT = EVF_SAM.inputs


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return load_samples(derived_images(SAMPLE_IMAGE, tmp_path_factory.mktemp("bench_images")))


def _decoded_elements(entry) -> list:
    """An input-data entry's payload, parsed by tritonclient's own BYTES deserialiser."""
    return [bytes(e) for e in deserialize_bytes_tensor(pa_inputs.decode_entry(entry))]


def test_single_prompt_input_data_round_trips_real_files_and_prompts(samples):
    data = json.loads(json.dumps(pa_inputs.single_prompt_input_data(samples)))  # as perf_analyzer reads it
    assert len(data["data"]) == len(samples) >= 4
    for step, sample in zip(data["data"], samples):
        assert set(step) == {IMAGE.name, PROMPT.name}
        assert step[IMAGE.name]["shape"] == list(IMAGE.shape[1:])
        assert _decoded_elements(step[IMAGE.name]) == [sample.image]
        assert _decoded_elements(step[PROMPT.name]) == [sample.prompt.encode("utf-8")]
    assert {s.describe()["format"] for s in samples} == {"JPEG", "PNG"}


def test_tagged_images_decode_to_the_same_pixels_under_other_keys(samples):
    images = list(dict.fromkeys(s.image for s in samples))
    copies = distinct_images(samples, 3)
    assert len(copies) == 3 * len(samples) and len({s.image for s in copies}) == len(copies)
    for copy in copies:
        original = next(image for image in images if decode_image(image).shape == decode_image(copy.image).shape)
        np.testing.assert_array_equal(decode_image(copy.image), decode_image(original))
        assert image_key(copy.image) != image_key(original)
    with pytest.raises(ValueError, match="JPEG and PNG"):
        tagged(b"GIF89a...", b"x")


def test_bytes_serialisation_matches_tritonclient():
    elements = [b"", b"zebra top left", "größer".encode(), bytes(range(256))]
    ours = pa_inputs.serialize_bytes_tensor(elements)
    assert ours == serialize_byte_tensor(np.array(elements, dtype=object)).item()
    assert pa_inputs.deserialize_bytes_tensor(ours) == elements
    with pytest.raises(ValueError):
        pa_inputs.deserialize_bytes_tensor(ours[:-1])


@pytest.mark.parametrize("spec", GRAPHS, ids=lambda s: s.name)
def test_engine_input_data_round_trips_tensors(spec):
    """Without the batch axis for the models Triton batches, whole tensors for the mask decoders."""
    rng = np.random.default_rng(0)
    one_row = {"batch": 1, "images": 1}
    feeds = [spec.sample_inputs(rng, one_row, vocab_size=256) for _ in range(2)]
    data = pa_inputs.engine_input_data(spec, feeds)
    for step, feed in zip(data["data"], feeds):
        for tensor in spec.inputs:
            entry = step[tensor.name]
            expected = feed[tensor.name][0] if spec.triton_batching else feed[tensor.name]
            assert entry["shape"] == list(expected.shape)
            decoded = np.frombuffer(pa_inputs.decode_entry(entry), dtype=tensor.np_dtype).reshape(entry["shape"])
            np.testing.assert_array_equal(decoded, expected)
    with pytest.raises(ValueError, match="batch 1"):
        pa_inputs.engine_input_data(spec, [spec.sample_inputs(rng, {"batch": 2, "images": 2}, vocab_size=256)])


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


@pytest.mark.parametrize("model, requests", [(EVF_SAM.name, 4), (PROMPT_MASK_DECODER.name, 15),
                                             (SAM_IMAGE_ENCODER.name, 164)])
def test_parses_real_perf_analyzer_output(model, requests):
    name = next(p.stem for p in DATA.glob(f"{model}_c*.csv"))
    log = (DATA / f"{name}.log").read_text()
    point = pa.read_point(model, requests, DATA / f"{name}.csv", log)
    (row,) = pa.read_csv(DATA / f"{name}.csv")
    assert point.throughput == row["Inferences/Second"] > 0 and point.concurrency == int(name.rsplit("_c", 1)[1])
    assert point.p50_ms == row["p50 latency"] / 1000 <= point.p90_ms <= point.p95_ms <= point.p99_ms
    assert point.mean_ms == row["Avg latency"] / 1000 and "Server Queue" in point.client_ms
    assert set(point.server) == {model}
    server = point.server[model]
    assert server.inference_count == requests and server.avg_batch == 1.0
    assert sum(server.parts_ms.values()) == pytest.approx(server.avg_latency_ms, abs=0.01)
    assert {"queue", "compute infer"} <= set(server.parts_ms)
    assert json.dumps(point.to_dict())


def _counters(requests, hits, misses, encoder_runs, failures=0) -> server_stats.ServerCounters:
    models = {m: {"requests": 0.0, "failures": 0.0, "executions": 0.0, "inferences": 0.0,
                  **{f"{phase}_ns": 0.0 for phase in server_stats.PHASES}}
              for m in (EVF_SAM.name, IMAGE_CACHE_NAME, *(g.name for g in ORI.graphs))}
    models[EVF_SAM.name].update(requests=requests, failures=failures, compute_infer_ns=requests * 100e6)
    for model, calls, ms in ((IMAGE_CACHE_NAME, requests, 2), (SAM_IMAGE_ENCODER.name, encoder_runs, 50),
                             (ORI.prompt_encoder.name, requests, 5), (PROMPT_MASK_DECODER.name, requests, 30)):
        models[model].update(requests=calls, executions=calls, inferences=calls, success_ns=calls * ms * 1e6,
                             queue_ns=calls * 1e6, compute_infer_ns=calls * (ms - 1) * 1e6)
    return server_stats.ServerCounters({"hits": hits, "misses": misses, "evictions": 0}, models)


def test_integrity_check_accepts_only_what_the_point_claims():
    check = server_stats.check_counts
    assert check("p", _counters(5, 0, 5, 5), EVF_SAM.name, SAM_IMAGE_ENCODER.name, expect_cached=False) == 5
    assert check("p", _counters(5, 5, 0, 0), EVF_SAM.name, SAM_IMAGE_ENCODER.name, expect_cached=True) == 5
    with pytest.raises(server_stats.SweepIntegrityError, match="uncached N=4: .* 3 cache misses, 2 hits"):
        check("uncached N=4", _counters(5, 2, 3, 3), EVF_SAM.name, SAM_IMAGE_ENCODER.name, expect_cached=False)
    with pytest.raises(server_stats.SweepIntegrityError, match="1 image-encoder runs"):
        check("p", _counters(5, 4, 1, 1), EVF_SAM.name, SAM_IMAGE_ENCODER.name, expect_cached=True)
    with pytest.raises(server_stats.SweepIntegrityError, match="answered 0"):
        check("p", _counters(0, 0, 0, 0), EVF_SAM.name, SAM_IMAGE_ENCODER.name, expect_cached=True)
    with pytest.raises(server_stats.SweepIntegrityError, match="2 failed requests"):
        check("p", _counters(5, 5, 0, 0, failures=2), EVF_SAM.name, SAM_IMAGE_ENCODER.name, expect_cached=True)


def test_breakdown_takes_the_longer_of_encoder_and_beit3_on_a_miss():
    miss = server_stats.breakdown(_counters(5, 0, 5, 5), EVF_SAM.name, ORI)
    assert miss[SAM_IMAGE_ENCODER.name] == {"calls": 1.0, "queue_ms": 1.0, "compute_ms": 49.0, "total_ms": 50.0,
                                            "avg_batch": 1.0}
    assert miss["own"]["compute_ms"] == pytest.approx(100 - (2 + 50 + 30))  # BEiT-3 ran beside the encoder
    hit = server_stats.breakdown(_counters(5, 5, 0, 0), EVF_SAM.name, ORI)
    assert hit[SAM_IMAGE_ENCODER.name]["calls"] == 0.0
    assert hit["own"]["compute_ms"] == pytest.approx(100 - (2 + 5 + 30))


@pytest.mark.parametrize("family, size, tflop", [("ori", "full", 5.96), ("sam2", "full", 1.82), ("ori", "vit-b", 0.97)])
def test_image_encoder_flops_on_the_meta_device(family, size, tflop):
    counted = image_encoder_flops(family, size)
    assert counted["tflop"] == pytest.approx(tflop, rel=0.01)
    assert sum(counted["by_part"].values()) == pytest.approx(counted["tflop"], rel=1e-3)


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
    assert "git commit `abc123`" in markdown and "| `sam_image_encoder` | 1.00 | 1.0 | 49.0 | 1.00 |" in markdown


def _agreement(eager, ort, sample):
    (reference,) = eager.segment(sample.image, [sample.prompt])
    ((mask, score),) = ort.segment(sample.image, [sample.prompt])
    return float(np.mean(reference.mask == mask)), abs(reference.score - score)


def test_inprocess_ort_pipeline_reproduces_the_eager_reference(tiny_checkpoint, onnx_dir, samples):
    ort = OrtPipeline(onnx_dir)
    eager = EagerPipeline(tiny_checkpoint, ort.recipe.name)
    assert ort.stages == ("preprocess", *(g.name for g in ORI.graphs), "postprocess")
    for sample in samples[:2]:
        pixels, score = _agreement(eager, ort, sample)
        assert pixels > 0.999 and score < 1e-4
    masks = ort.segment(samples[0].image, [s.prompt for s in samples] * 5)  # 20 prompts: two decoder calls
    singles = [ort.segment(samples[0].image, [s.prompt])[0] for s in samples]
    for (mask, score), (single_mask, single_score) in zip(masks, singles * 5):
        assert np.mean(mask == single_mask) > 0.999 and score == pytest.approx(single_score, abs=1e-5)


def test_inprocess_sam2_pipelines_agree(tiny_sam2_checkpoint, sam2_onnx_dir, samples):
    ort = OrtPipeline(sam2_onnx_dir)
    eager = EagerPipeline(tiny_sam2_checkpoint, ort.recipe.name)
    assert ort.family.name == eager.family.name == "sam2" and ort.recipe.name == "sam2-v2"
    for sample in samples[:2]:
        pixels, score = _agreement(eager, ort, sample)
        assert pixels > 0.999 and score < 1e-4
    feeds = ort.graph_feeds(samples[:2])
    decoder = ort.family.mask_decoder
    batch = batch_feed(decoder, feeds[decoder.name], 3)
    assert batch["image_embeddings"].shape[0] == 1 and batch["text_embeds"].shape[0] == 3
    assert ort.run(decoder, batch)["low_res_masks"].shape[0] == 3


@pytest.mark.triton
@bench_support.needs_perf_analyzer
def test_real_evf_sam_point_checked_against_triton_statistics(triton_server, samples, tmp_path):
    """New image bytes (a fresh tag) so every request misses; the per-model breakdown adds up.  Two images:
    the test repository's cache holds two."""
    fresh = [s.__class__(s.name, tagged(s.image, uuid.uuid4().hex.encode()), s.prompt) for s in samples[:2]]
    data = pa_inputs.write_json(pa_inputs.single_prompt_input_data(fresh), tmp_path / "evf_sam.json")
    point = triton_sweep.measured_point(triton_server.server, EVF_SAM.name, data, 1, 2, tmp_path,
                                        triton_sweep.served_inspector(ORI, expect_cached=False))
    assert point["server_requests"] == point["request_count"] == 2
    assert point["cache"]["misses"] == 2 and point["cache"]["hits"] == 0
    models = point["models"]
    assert models[SAM_IMAGE_ENCODER.name]["calls"] == 1.0 and models[PROMPT_MASK_DECODER.name]["calls"] == 1.0
    assert models[IMAGE_CACHE_NAME]["calls"] == 2.0  # get (claim) + put
    assert 0 < models[SAM_IMAGE_ENCODER.name]["total_ms"] < models[EVF_SAM.name]["compute_ms"] <= point["mean_ms"]
    assert models["own"]["compute_ms"] > 0
    with pytest.raises(server_stats.SweepIntegrityError, match="2 hits"):  # the same bytes again: all hits
        triton_sweep.measured_point(triton_server.server, EVF_SAM.name, data, 1, 2, tmp_path,
                                    triton_sweep.served_inspector(ORI, expect_cached=False))


class _EncodeState(ctypes.Structure):
    _fields_ = [("step", ctypes.c_int), ("result", ctypes.c_char), ("stepcount", ctypes.c_int)]


class _DecodeState(ctypes.Structure):
    _fields_ = [("step", ctypes.c_int), ("plainchar", ctypes.c_char)]


@pytest.fixture(scope="module")
def libb64_compat(tmp_path_factory):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    return pa.build_libb64_compat(tmp_path_factory.mktemp("libb64"))


def test_libb64_compat_builds_once_from_threads_started_together(tmp_path):
    # the soak starts its two perf_analyzer loops at once: both found the library missing and both built it
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    barrier, results = threading.Barrier(4), []

    def build():
        barrier.wait()
        try:
            results.append(pa.build_libb64_compat(tmp_path))
        except Exception as exc:  # noqa: BLE001 - the failure is what the test reports
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path] * 4
    assert [p.name for p in tmp_path.iterdir()] == [pa.LIBB64]


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
    data = pa_inputs.write_json(pa_inputs.single_prompt_input_data(samples[:2]), tmp_path / "evf_sam.json")
    point = pa.run_point(EVF_SAM.name, triton_server.grpc_url, data, 1, 2, tmp_path)
    assert point.server[EVF_SAM.name].inference_count == 2
