"""The served cache / N-prompts benchmark: its perf_analyzer input data, the Prometheus reader the cache
counters come from, the report; real perf_analyzer runs on the session server, checked point by point."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from tritonclient.utils import deserialize_bytes_tensor

from benchmarks import pa_inputs, prompt_sweep
from benchmarks.budgets import BUDGETS
from benchmarks.plots import write_all
from benchmarks.report import comparison, served_prompt_rows, summary_markdown
from benchmarks.samples import PROMPTS, SAMPLE_IMAGE, derived_images, load_samples
from benchmarks.server_stats import SweepIntegrityError
from evfsam.embedding_cache import image_key
from evfsam.specs import EVF_SAM, EVF_SAM_PROMPTS, ORI, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER
from serving import metrics
from tests import bench_support
from tests.test_prompts_model import cache_counts

IMAGE, IMAGE_KEY, PROMPTS_INPUT = (EVF_SAM_PROMPTS.input(n) for n in ("image", "image_key", "prompts"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return load_samples(derived_images(SAMPLE_IMAGE, tmp_path_factory.mktemp("sweep_images")))


def _elements(entry) -> list:
    return [bytes(e) for e in deserialize_bytes_tensor(pa_inputs.decode_entry(entry))]


@pytest.mark.parametrize("by_key", [False, True], ids=["image_bytes", "image_key"])
def test_prompts_input_data_one_step_per_image_with_n_prompts(samples, by_key):
    data = json.loads(json.dumps(pa_inputs.prompts_input_data(samples, 6, by_key=by_key)))
    images = list(dict.fromkeys(s.image for s in samples))
    assert len(samples) > len(images) == len(data["data"]) == 3  # a repeated image is one step
    for step, image in zip(data["data"], images):
        sample = next(s for s in samples if s.image == image)
        prompts = _elements(step[PROMPTS_INPUT.name])
        assert step[PROMPTS_INPUT.name]["shape"] == [6] and len(prompts) == 6
        assert prompts[0] == sample.prompt.encode() and {p.decode() for p in prompts} == set(PROMPTS)
        if by_key:
            assert set(step) == {IMAGE_KEY.name, PROMPTS_INPUT.name}
            assert _elements(step[IMAGE_KEY.name]) == [image_key(image).encode()]
        else:
            assert set(step) == {IMAGE.name, PROMPTS_INPUT.name}
            assert _elements(step[IMAGE.name]) == [image] and step[IMAGE.name]["shape"] == [1]


def test_metrics_parser_reads_labels_and_sums_matches():
    text = "\n".join([
        "# HELP nv_inference_count Number of inferences",
        "# TYPE nv_inference_count counter",
        'nv_inference_count{model="sam_image_encoder",version="1"} 12',
        'nv_inference_count{model="beit3_fusion_encoder",version="1"} 3.5e1',
        'odd_label{model="a \\"quoted\\" name, with comma",version="2"} 1',
        "",
        "unlabelled_gauge 7",
    ])
    samples = metrics.parse(text)
    assert len(samples) == 4
    assert metrics.total(samples, "nv_inference_count") == 47.0
    assert metrics.total(samples, "nv_inference_count", model="sam_image_encoder") == 12.0
    assert metrics.total(samples, "nv_inference_count", model="nope") == 0.0
    assert dict(samples[2].labels)["model"] == 'a \\"quoted\\" name, with comma'
    assert metrics.totals(samples, ["unlabelled_gauge", "absent"]) == {"unlabelled_gauge": 7.0, "absent": 0.0}
    with pytest.raises(metrics.MetricsFormatError, match="line 2"):
        metrics.parse("ok 1\n{broken\n")
    with pytest.raises(metrics.MetricsFormatError, match="not a number"):
        metrics.parse("name{a=\"b\"} NaNish")


def _served_point(model: str, mode: str, count: int, mean_ms: float) -> dict:
    cached = mode != prompt_sweep.UNCACHED
    return {"model": model, "mode": mode, "prompts": count, "request_count": 3, "mean_ms": mean_ms, "p50_ms": mean_ms,
            "p99_ms": mean_ms, "prompts_per_s": 1000.0 * count / mean_ms,
            "models": bench_support.served_models(mean_ms, 0.0 if cached else 1.0, model),
            "cache": {"hits": 3 if cached else 0, "misses": 0 if cached else 3}}


def test_report_and_plot_of_the_served_sweep(tmp_path):
    synthetic_results = bench_support.synthetic_results()
    means = {"uncached": {1: 250.0, 4: 400.0}, "cached_bytes": {1: 60.0, 4: 160.0}, "cached_key": {1: 50.0, 4: 160.0}}
    synthetic_results["served"] = {
        "cache_bytes": 512 * 1024**2, "prompt_counts": [1, 4],
        "prompts": {mode: {str(n): _served_point(EVF_SAM_PROMPTS.name, mode, n, ms) for n, ms in by_n.items()}
                    for mode, by_n in means.items()},
        "repeated_image": {"uncached": _served_point(EVF_SAM.name, "uncached", 1, 240.0),
                           "cached_bytes": _served_point(EVF_SAM.name, "cached_bytes", 1, 20.0)}}
    one, four = served_prompt_rows(synthetic_results)
    assert one["baseline"] == 4.0  # evf_sam at concurrency 1: mean 250 ms
    assert four["uncached"] == 10.0 and four["uncached_vs_baseline"] == 2.5
    assert one["cached_vs_uncached"] == 5.0 and four["cached_vs_baseline"] == 6.25
    cmp = comparison(synthetic_results)
    assert cmp["targets"] == {"prompts": 4, "cached_prompts_per_s": 25.0, "repeated_image_speedup": 12.0}
    written = write_all(synthetic_results, tmp_path)
    assert "served_prompts.png" in written and (tmp_path / "served_prompts.png").stat().st_size > 10_000
    markdown = summary_markdown(synthetic_results, cmp, written)
    assert "### `evf_sam_prompts`: N prompts per request" in markdown
    assert "| 4 | 4.00 | 10.00 | 25.00 | 25.00 | 2.50× | 2.50× | 6.25× |" in markdown
    assert "| cached (image bytes again) | 3 | 20.0 | 20.0 | 20.0 | 12.00× |" in markdown
    assert "**12.0×** faster cached than uncached" in markdown


@pytest.mark.triton
@bench_support.needs_perf_analyzer
def test_real_sweep_points_on_the_session_server(triton_server, samples, tmp_path):
    """The session server's cache is on: cached points (evf_sam_prompts and a repeated image through evf_sam)
    pass their check with real perf_analyzer runs, and an `uncached` point against it is caught by the
    integrity check instead of being reported."""
    budget = replace(BUDGETS["tiny"], served_prompt_seconds=0.01, min_requests_per_stream=3)
    server, one_image = triton_server.server, samples[:1]
    before = cache_counts(triton_server)
    by_bytes = prompt_sweep.measure_point(server, ORI, EVF_SAM_PROMPTS.name, prompt_sweep.CACHED_BYTES, 4, one_image,
                                          budget, tmp_path, tmp_path)
    assert by_bytes["server_requests"] == by_bytes["request_count"] == 3
    assert by_bytes["cache"]["hits"] == 3 and by_bytes["cache"]["misses"] == 0
    assert by_bytes["models"][SAM_IMAGE_ENCODER.name]["calls"] == 0.0
    assert by_bytes["models"][PROMPT_MASK_DECODER.name]["calls"] == 1.0  # 4 prompts: one decoder call
    assert by_bytes["prompts_per_s"] == pytest.approx(4000.0 / by_bytes["mean_ms"])
    by_key = prompt_sweep.measure_point(server, ORI, EVF_SAM_PROMPTS.name, prompt_sweep.CACHED_KEY, 2, one_image,
                                        budget, tmp_path, tmp_path)
    assert by_key["cache"] == {"hits": 3, "misses": 0, "evictions": 0}
    repeated = prompt_sweep.measure_point(server, ORI, EVF_SAM.name, prompt_sweep.CACHED_BYTES, 1, one_image, budget,
                                          tmp_path, tmp_path)
    assert repeated["cache"]["hits"] == repeated["server_requests"] == 3
    assert (tmp_path / EVF_SAM.name / "cached_bytes_n1" / f"{EVF_SAM.name}_c1.csv").is_file()
    after = cache_counts(triton_server)
    assert after["hits"] - before["hits"] >= 9
    with pytest.raises(SweepIntegrityError, match="uncached N=1: the server answered 3 evf_sam_prompts requests with 0"):
        prompt_sweep.measure_point(server, ORI, EVF_SAM_PROMPTS.name, prompt_sweep.UNCACHED, 1, one_image, budget,
                                   tmp_path, tmp_path)
