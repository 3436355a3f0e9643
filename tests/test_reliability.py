"""The fast subset of `make reliability` (benchmarks/reliability/) against real tritonservers: a few hundred
fuzzed requests, overload, co-batching of a bad request with good ones, and `python -m serving.server`
bringing the server back after a python-backend stub is killed.  The long runs (soaks, goodput under
client deadlines, every fault) are `make reliability`, with committed results."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks import pa_inputs
from benchmarks.reliability import cobatch, fuzz, models, overload, probes, soak
from benchmarks.reliability import report as soak_report
from benchmarks.reliability.faults import Requests
from benchmarks.reliability.inputs import SAMPLE_IMAGE, image_set, unique_jpeg
from benchmarks.reliability.launcher import Launcher
from benchmarks.reliability.rss import SERVER_KINDS, SERVER_LABEL, RssSampler, growth
from evfsam.embedding_cache import image_key
from evfsam.processing import decode_image
from serving import processes

FUZZ_REQUESTS = 200


# ---- without a server ---------------------------------------------------------------------------------

def test_unique_jpeg_is_another_key_for_the_same_pixels():
    original = SAMPLE_IMAGE.read_bytes()
    copies = [unique_jpeg(original, serial) for serial in (1, 2)]
    assert len({image_key(data) for data in [original, *copies]}) == 3
    for data in copies:
        assert np.array_equal(decode_image(data), decode_image(original))


def test_image_set_is_distinct_decodable_files():
    images = image_set(6)
    assert len({image_key(data) for data in images}) == 6
    assert {Image.open(io.BytesIO(data)).format for data in images} == {"JPEG", "PNG", "WEBP"}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "WEBP"])
def test_declared_size_edit_is_what_a_decoder_reads(fmt):
    data = fuzz.image_corpus()[fmt]
    edited = fuzz.set_declared_size(fmt, data, 3000, 2000)
    assert len(edited) == len(data)
    assert Image.open(io.BytesIO(edited)).size == (3000, 2000)


def test_soak_inputs_are_perf_analyzer_steps_of_every_image(tmp_path):
    images = image_set(3)
    paths = soak.write_inputs(images, tmp_path)
    def elements(entry):
        return pa_inputs.deserialize_bytes_tensor(pa_inputs.decode_entry(entry))

    single = json.loads(paths["evf_sam"].read_text())["data"]
    assert [elements(step["image"]) for step in single] == [[image] for image in images]
    many = json.loads(paths["evf_sam_prompts"].read_text())["data"]
    assert [elements(step["image"]) for step in many] == [[image] for image in images]
    assert all(len(elements(step["prompts"])) == soak.PROMPTS_PER_REQUEST for step in many)


def test_fuzz_cases_are_reproducible_and_cover_every_category():
    corpus = fuzz.image_corpus()
    first = fuzz.CaseGenerator(5, corpus, corpus["JPEG"]).cases(400)
    again = fuzz.CaseGenerator(5, corpus, corpus["JPEG"]).cases(400)
    assert [(c.category, c.kind, c.protocol) for c in first] == [(c.category, c.kind, c.protocol) for c in again]
    assert {c.category for c in first} == set(fuzz.CATEGORIES)
    assert {c.protocol for c in first} == {"grpc", "http"}


def test_leak_check_finds_tracebacks_and_paths_only():
    assert fuzz.leaks('Traceback (most recent call last):\n  File "model.py", line 3')
    assert fuzz.leaks("failed in /opt/tritonserver/models/evf_sam/1/model.py")
    assert fuzz.leaks("error in model.py")
    assert not fuzz.leaks("prompt is 9000 bytes; the limit is 8192 bytes")
    assert not fuzz.leaks("data is not a recognised image format (JPEG, PNG, WebP, BMP, TIFF, ...)")
    assert not fuzz.leaks("Stub process 'evf_sam_0_0' is not healthy.")


def test_rss_growth_is_measured_after_the_warmup():
    times = [float(t) for t in range(0, 100, 5)]
    rising = [100.0 + t for t in times]
    flat = [50.0] * len(times)
    result = growth(times, {"a": rising, "b": flat}, warmup_s=20.0)
    assert result["b"]["growth_mib"] == 0.0
    assert result["a"]["after_warmup_mib"] == 120.0 and result["a"]["end_mib"] == 195.0
    assert result["total"]["growth_mib"] == result["a"]["growth_mib"]


def test_soak_report_judges_private_memory_and_counts_the_shared_regions_once():
    times = [float(t) for t in range(0, 100, 5)]
    vmrss = {"tritonserver": [300.0 + 2 * t for t in times], "stub_0_0": [100.0] * len(times)}
    private = {"tritonserver": [80.0 + 0.1 * t for t in times], "stub_0_0": [60.0 + t for t in times]}
    kinds = {"anon": private["tritonserver"], "file": [40.0] * len(times), "shmem": [180.0 + 1.9 * t for t in times],
             "shm_regions": [150.0] * len(times)}
    soak_result = {"rss_growth": growth(times, vmrss, 20.0), "private_growth": growth(times, private, 20.0),
                   "server_kinds_growth": {k: v for k, v in growth(times, kinds, 20.0).items() if k != "total"},
                   "rss": {"server_region_mappings": [12] * len(times)}}
    rows = {line.split(" | ")[0].strip("| "): line for line in soak_report.growth_lines(soak_result) if line.startswith("| ")}
    assert rows["tritonserver"].endswith("| **yes** |")  # VmRSS +150 MiB, its own memory +7.5 MiB
    assert rows["stub_0_0"].endswith("| **NO** |")  # VmRSS flat, its own memory +75 MiB
    assert rows[soak_report.REGIONS_LABEL].endswith("| **yes** |")
    assert "12 mappings" in soak_report.server_kinds_lines(soak_result["server_kinds_growth"], [12])[0]



def test_soak_report_measures_growth_from_later_warmups_too():
    times = [float(t) for t in range(0, 1800, 5)]
    settling = [50.0 + min(t, 600.0) / 5 for t in times]  # +120 MiB over the first 10 min, then flat
    soak_result = {"plan": {"warmup_s": 180.0}, "models": {"evf_sam": {"rounds": [
                       {"t_s": 0.0, "seconds": 100.0, "requests": 8}, {"t_s": 100.0, "seconds": 500.0, "requests": 40}]}},
                   "rss": {"t_s": times, "private_mib": {"tritonserver": [80.0] * len(times), "evf_sam_0_0": settling},
                           "server_kinds_mib": {"shm_regions": [200.0] * len(times)}}}
    rows = [line for line in soak_report.later_warmup_lines(soak_result) if line.startswith("| ") and "min |" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 3 min", "| 10 min", "| 15 min"]
    assert rows[0].split(" | ")[1] == "8" and rows[1].split(" | ")[1] == "48"
    assert rows[0].endswith("| **NO** |") and rows[1].endswith("| **yes** |") and rows[2].endswith("| **yes** |")


# ---- against the shared test server --------------------------------------------------------------------

@pytest.mark.triton
def test_fuzz_gets_clean_answers_and_the_server_stays_ready(triton_server):
    report = fuzz.run(triton_server.http_url, triton_server.grpc_url, FUZZ_REQUESTS, seed=3, workers=4,
                      stub_check=triton_server.server.dead_stubs)
    categories = report["by_category"]
    assert set(categories) == set(fuzz.CATEGORIES)
    for name in ("image", "prompt", "tensor", "valid"):  # what reaches the models: exactly as the contract says
        assert categories[name].get("unexpected", 0) == 0, [p for p in report["problems"] if p["category"] == name]
    assert categories["valid"]["ok"] == categories["valid"]["requests"]
    assert report["totals"].get("leaks", 0) == 0, report["problems"]
    assert report["totals"].get("no_answer", 0) == 0, report["problems"]
    # Triton's own HTTP JSON and gRPC protobuf parsers answer malformed bodies with 500 / INTERNAL
    # (tritonserver 2.51): allowed here, but nothing else.
    for problem in report["problems"]:
        assert problem["category"] in ("http", "grpc") and "parse" in problem["message"].lower(), problem
    assert report["readiness"]["not_ready"] == 0 and report["ready_after"]
    assert report["dead_stubs_after"] == []


@pytest.mark.triton
def test_overload_rejects_the_excess_at_once_and_serves_right_after(triton_server):
    result = overload.run(triton_server.http_url, triton_server.grpc_url, triton_server.server.repository)
    queue, instances = result["max_queue_size"], result["front_instances"]
    outcomes = result["outcomes"]
    assert set(outcomes) == {overload.ACCEPTED, overload.REJECTED}, outcomes
    assert outcomes[overload.ACCEPTED] + outcomes[overload.REJECTED] == 10 * queue
    assert queue + instances <= outcomes[overload.ACCEPTED] < 2 * (queue + instances)
    assert result["rejection_status"] == ["StatusCode.UNAVAILABLE"]
    assert result["ready_after"] and result["readiness"]["not_ready"] == 0
    assert result["good_request_after"]["mask_shape"][0] == 1


@pytest.mark.triton
def test_the_soak_sampler_splits_the_server_rss_and_measures_its_stubs_regions(triton_server):
    server_pid = triton_server.server.process.pid
    with RssSampler(server_pid, interval_s=0.2) as sampler:
        time.sleep(0.5)
    sampled = sampler.to_dict()
    kinds = sampled["server_kinds_mib"]
    assert set(kinds) == set(SERVER_KINDS) and all(len(kinds[k]) == len(sampled["t_s"]) >= 3 for k in kinds)
    last = {kind: column[-1] for kind, column in kinds.items()}
    assert last["anon"] + last["file"] + last["shmem"] == pytest.approx(sampled["rss_mib"][SERVER_LABEL][-1], abs=0.2)
    assert sampled["private_mib"][SERVER_LABEL][-1] == last["anon"]
    assert set(sampled["private_mib"]) == set(sampled["rss_mib"]) == {SERVER_LABEL, *processes.stub_processes(server_pid)}
    regions = [os.stat(f"/dev/shm/{name}").st_size for name in processes.stub_shm_regions(server_pid)]
    assert len(regions) == len(processes.stub_processes(server_pid)) > 0
    assert sampled["server_region_mappings"][-1] >= len(regions)  # each region at least once, once per growth
    # the server has passed tensors through its stubs' regions: it maps them and has touched some of them
    assert 0 < last["shmem"] and 0 < last["shm_regions"] <= sum(regions) / 2**20 + 0.1, (last, sum(regions))


# ---- a repository whose engines hold their batches, under python -m serving.server ----------------------

@pytest.fixture(scope="module")
def held_launcher(onnx_dir, tmp_path_factory):
    """Engines that wait (up to 3 s) for a batch of four; the launcher make serve runs."""
    root = tmp_path_factory.mktemp("held")
    repository = models.churn_repository(onnx_dir, root / "repository", ort_threads=1)
    models.hold_batches(repository, [s.name for s in cobatch.BATCHED_ENGINES], cobatch.GROUP_SIZE,
                        cobatch.HOLD_DELAY_US)
    with Launcher(repository, root / "serve.log") as launcher:
        yield launcher


@pytest.mark.triton
def test_a_bad_request_batched_with_good_ones_fails_alone(held_launcher, onnx_dir):
    results = cobatch.run(held_launcher.http_url, held_launcher.grpc_url, onnx_dir)
    for engine, result in results.items():
        assert result["one_batch"], (engine, result["counts"])  # Triton's statistics: one execution of 4
        assert result["goods_correct"], (engine, result["good_max_abs_error"])
    beit3 = results[cobatch.BEIT3_FUSION_ENCODER.name]["bad"]
    assert beit3["error"] == "StatusCode.INTERNAL: beit3_fusion_encoder: inference failed"
    assert results[cobatch.SAM_IMAGE_ENCODER.name]["bad"] == {"answered": True, "all_nan": True}


@pytest.mark.triton
def test_the_launcher_replaces_a_server_whose_stub_died(held_launcher):
    server_pid = held_launcher.server_pid()
    requests = Requests(held_launcher.grpc_url, random.Random(5).randrange(10**9))
    assert requests.one()["outcome"] == "ok"
    victim = processes.stub_processes(server_pid)[f"{cobatch.BEIT3_FUSION_ENCODER.name}_0_0"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 240
    while held_launcher.server_pid() in (None, server_pid) or not probes.server_ready(held_launcher.http_url):
        assert time.monotonic() < deadline, "no new tritonserver"
        time.sleep(0.2)
    assert requests.one()["outcome"] == "ok"
    assert held_launcher.log_lines("beit3_fusion_encoder_0_0 died and tritonserver does not restart it")
