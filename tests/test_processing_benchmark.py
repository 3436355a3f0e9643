"""benchmarks/processing.py measures like with like: its input is fixed, and the pre-rewrite baseline
computes what the new code computes."""
from __future__ import annotations

import numpy as np

from benchmarks import processing_baseline as before
from benchmarks.processing import decoder_logits, full_hd_jpeg, summary_markdown
from evfsam import processing as after
from tests.images import scene


def test_benchmark_image_is_a_fixed_1080p_jpeg():
    data = full_hd_jpeg()
    assert data == full_hd_jpeg()
    assert data[:2] == b"\xff\xd8" and 500_000 < len(data) < 900_000
    assert after.decode_image(data).shape == (1080, 1920, 3)


def test_baseline_computes_what_the_new_code_computes():
    rgb = scene(300, 500, seed=4)
    old_view, old_resized = before.sam_view(rgb)
    new_view, new_resized = after.sam_view(rgb, "ori")
    assert old_resized == new_resized
    np.testing.assert_allclose(new_view, old_view, rtol=0, atol=1e-6)
    np.testing.assert_allclose(after.beit3_view(rgb), before.beit3_view(rgb), rtol=0, atol=1e-4)
    logits = decoder_logits(2)
    for low_res in logits:
        reference = before.mask_logits(low_res, new_resized, (300, 500))
        differ = after.binary_mask(low_res, new_resized, (300, 500)) != before.binary_mask(low_res, new_resized, (300, 500))
        assert not differ.any() or np.abs(reference[differ.astype(bool)]).max() < 1e-3
    assert 0.02 < (logits > 0).mean() < 0.6  # blob-like masks, neither empty nor full


def test_summary_reports_the_goal_and_speedups():
    stage = lambda name, variant, ms: {"stage": name, "variant": variant, "cpu": {"p50_ms": ms, "p90_ms": ms},
                                       "wall": {"p50_ms": ms, "p90_ms": ms}}
    results = {"meta": {"date": "2026-12-02", "repeats": 3, "git": {"commit": "0" * 40, "dirty": False},
                        "machine": {"cpu_model": "X", "vcpus": 2, "hypervisor": None, "isa": "avx2", "python": "3.11"},
                        "versions": {"numpy": "1"}, "load_average": {"before": (0, 0, 0), "after": (0, 0, 0)},
                        "others_cpu_share": 0.0, "input": "a JPEG"},
               "stages": [stage("BEiT-3 view", "before", 40.0), stage("BEiT-3 view", "after", 4.0),
                          stage("request ori (decode+views+1 mask)", "after", 30.0)]}
    text = summary_markdown(results)
    assert "| BEiT-3 view | after | 4.00 | 4.00 | 4.00 | 4.00 | 10.0x |  |" in text
    assert "takes 30.0 ms of CPU (p50): it misses the 25 ms goal" in text
