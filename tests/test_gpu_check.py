"""`make gpu-check` without a GPU: the CPU smoke run of the whole script (tiny models, every code path
that runs on a CPU), its time budget, the family that is absent, and the fast attention modules
against the modules they replace."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.beit3_sdpa import SdpaMultiheadAttention, set_key_padding, use_sdpa_beit3
from benchmarks.model_families import FAMILIES_BY_NAME, ModelFamily, sam_fast_attention
from benchmarks.sam_sdpa import BiasSdpaAttention, SdpaAttention, use_sdpa


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CPU smoke run: tiny EVF-SAM, bf16 against fp32, eager and SDPA at batch 1, the ONNX graphs
    on the CPU provider standing in for the GPU ones (the CUDA provider is absent here: skipped)."""
    out = tmp_path_factory.mktemp("gpu_check_smoke")
    argv = ["--device", "cpu", "--families", "evf-sam", "--batches", "1", "--reference-batch", "1", "--iters", "1",
            "--warmup", "0", "--ort-providers", "CPUExecutionProvider", "CUDAExecutionProvider",
            "--budget-s", "300", "--git-commit", "test-commit", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    return json.loads((out / "results.json").read_text()), (out / "summary.md").read_text(), out


def test_smoke_run_measures_every_cpu_path(smoke):
    results, summary, out = smoke
    # ~25 s on an idle 2-core machine; the budget is generous so that a loaded machine runs every
    # step too (test_a_sweep_stops_... tests the budget itself)
    assert results["stopped_early"] is None and not any("budget" in s for s in results["skipped"])
    assert results["ceilings"]["bf16_matmul"]["tflops"] > 0 and results["ceilings"]["copy"]["gb_per_s"] > 0
    family = results["families"]["evf-sam"]
    assert family["encoder_flops_per_image"] > 0
    points = family["dtypes"]["bf16"]["points"]
    assert [(p["variant"], p["batch"]) for p in points] == [("eager", 1), ("sdpa", 1)]
    for point in points:
        assert point["vs_fp32"]["finite"] and point["vs_fp32"]["iou_min"] > 0.9  # bf16 masks vs fp32
        assert point["full"]["p50_ms"] > 0 and point["encoder_tflops"] > 0
    kernels = family["dtypes"]["bf16"]["kernels"]
    assert kernels["eager"]["image encoder"] == []  # segment-anything: explicit matmul + softmax
    assert kernels["fast"]["image encoder"] == ["flash (CPU)"]  # no mask: the flash kernel
    assert kernels["fast"]["BEiT-3, padded prompts"] and kernels["fast"]["BEiT-3, no padding"]
    blocks = family["dtypes"]["bf16"]["attention_blocks"]
    assert {(r["block"], r["implementation"]) for r in blocks} == {
        (block, impl) for block in ("global", "window") for impl in ("segment-anything", "sdpa, dense bias", "sdpa, folded")}
    assert all(r["max_rel_error_vs_fp32"] < 2e-2 for r in blocks)  # bf16 rounding, nothing worse
    assert [r["provider"] for r in results["onnx_runtime"]["rows"]] == ["CPUExecutionProvider"] * 3
    assert any("CUDAExecutionProvider" in s for s in results["skipped"])  # CPU onnxruntime here
    assert "Smoke run on CPU" in summary and "test-commit" in summary and "torch " in summary
    assert "| bf16 | sdpa | 1 |" in summary and "flash (CPU)" in summary
    assert (out / "plots" / "throughput_vs_batch.png").stat().st_size > 0


def test_a_family_without_its_module_is_skipped_with_the_reason(capsys):
    check = gpu_check.Check(gpu_check.parse_args(["--device", "cpu", "--git-commit", "x"]))
    absent = ModelFamily("evf-sam9", "sam9", "evfsam.modeling.evf_sam9", "SAM9_SIZES", sam_fast_attention)
    check.family(absent)
    assert "evf-sam9" not in check.results["families"]
    assert check.results["skipped"] == ["evf-sam9: evfsam/modeling/evf_sam9.py is not in this checkout"]
    assert "skipped evf-sam9: evfsam/modeling/evf_sam9.py is not in this checkout" in capsys.readouterr().out
    sam2 = FAMILIES_BY_NAME["evf-sam2"]
    reason = sam2.unavailable()
    assert reason is None or "evf_sam2" in reason or "SAM2_SIZES" in reason


def test_a_sweep_stops_when_the_next_point_would_overrun_the_budget():
    check = gpu_check.Check(gpu_check.parse_args(["--device", "cpu", "--iters", "4", "--warmup", "1",
                                                  "--git-commit", "x"]))
    previous = {"batch": 2, "setup_s": 1.0, "full": {"p50_ms": 1000.0}}
    calls = 2 * (4 + 1) + 2
    assert check.estimate("sdpa", 4, previous) == pytest.approx(2.0 + calls * 2.0)
    assert check.estimate("sdpa+compile", 8, previous) == pytest.approx(1.0 + calls * 4.0)
    check.budget = gpu_check.Budget(seconds=gpu_check.REPORT_RESERVE_S + 10)
    assert check.budget.allows(5) and not check.budget.allows(check.estimate("sdpa", 4, previous))


def sam_encoder(seed=0):
    from evfsam.modeling.builder import SamImageEncoderConfig, build_sam

    torch.manual_seed(seed)
    encoder = build_sam(SamImageEncoderConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))).image_encoder
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.5)
            block.attn.rel_pos_w.normal_(std=0.5)
    return encoder.eval()


@pytest.mark.parametrize("attention", [SdpaAttention, BiasSdpaAttention], ids=lambda a: a.__name__)
def test_sdpa_attention_matches_segment_anything(attention):
    encoder = sam_encoder()
    images = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        expected = encoder(images)
        assert use_sdpa(encoder, attention) == 2 and all(isinstance(b.attn, attention) for b in encoder.blocks)
        torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=1e-4)


def test_folded_attention_pads_the_head_size_for_flash():
    encoder = sam_encoder()
    use_sdpa(encoder, SdpaAttention)
    window, full = (block.attn for block in encoder.blocks)
    assert window.folded_dim == 16 + 14 + 14 + 4 and window.folded_dim % 8 == 0  # head 16, 14x14 window
    assert full.folded_dim == 16 + 64 + 64  # the 64x64 grid of a global block: already a multiple of 8


def test_beit3_sdpa_matches_eager_with_and_without_padding():
    from evfsam.modeling.builder import EvfSamConfig, build_evf_sam
    from export.tiny_checkpoint import SIZES

    torch.manual_seed(0)
    model = build_evf_sam(EvfSamConfig.from_dict({"model_type": "evf", "out_dim": 256, **SIZES["tiny"]})).eval()
    fast = copy.deepcopy(model)
    assert use_sdpa_beit3(fast) == 2 and any(isinstance(m, SdpaMultiheadAttention) for m in fast.modules())
    images, ids = torch.randn(3, 3, 224, 224), torch.randint(4, 200, (3, 16))
    padded = torch.ones(3, 16, dtype=torch.long)
    padded[1, 9:] = 0
    padded[2, 3:] = 0
    with torch.no_grad():
        set_key_padding(fast, True)
        torch.testing.assert_close(fast.encode_prompt(images, ids, padded), model.encode_prompt(images, ids, padded),
                                   atol=1e-5, rtol=1e-4)
        full = torch.ones_like(padded)
        set_key_padding(fast, False)  # no mask at all: the host knows nothing is padded
        torch.testing.assert_close(fast.encode_prompt(images, ids, full), model.encode_prompt(images, ids, full),
                                   atol=1e-5, rtol=1e-4)


def test_the_alarm_stops_the_run_and_the_report_is_still_written(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "HARD_MARGIN_S", 1)
    argv = ["--device", "cpu", "--budget-s", "0.5", "--matmul-n", "2048", "--git-commit", "x", "--out", str(tmp_path)]
    assert gpu_check.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stopped_early"] == "hard time limit of 1 s reached" and not results["families"]
    assert "stopped early: hard time limit" in (tmp_path / "summary.md").read_text()
