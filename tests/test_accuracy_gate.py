"""The accuracy gate of the engine build, driven by ONNX Runtime "engines": the exported tiny graphs
as they are (faithful) and with noise added to an output (perturbed), on the shipped sample image and
prompts, against ONNX Runtime FP32."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from evfsam.specs import BEIT3_FUSION_ENCODER, MAX_TEXT_TOKENS, ORI, PROMPT_MASK_DECODER, GraphSpec
from export.accuracy_gate import (AccuracyGateError, MASK_TOLERANCE, OnnxRuntimeRunner, Tolerance, broadcast_rows,
                                  check_engine, compare_output, mask_iou, reference_feeds, require_pass)

NOISE_FRACTION = 0.05  # of the output's largest |value|: 5x the 1e-2 tolerance


@pytest.fixture(scope="module")
def feeds(onnx_dir):
    return reference_feeds(ORI.graphs, onnx_dir)


def perturbed_graph(source: Path, output: str, noise: np.ndarray, out_dir: Path) -> Path:
    """`source` with `noise` added to graph output `output` (an Add node after its producer)."""
    model = onnx.load(str(source))
    clean = output + "::clean"
    for node in model.graph.node:
        node.output[:] = [clean if name == output else name for name in node.output]
        node.input[:] = [clean if name == output else name for name in node.input]
    model.graph.initializer.append(numpy_helper.from_array(noise.astype(np.float32), output + "::noise"))
    model.graph.node.append(helper.make_node("Add", [clean, output + "::noise"], [output], name="/test/AddNoise"))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    onnx.save(model, str(target))
    return target


def noisy_engine(spec: GraphSpec, onnx_dir: Path, feeds, tmp_path: Path) -> OnnxRuntimeRunner:
    """The graph with uniform noise of NOISE_FRACTION x the reference's scale on its first output."""
    output = spec.outputs[0]
    reference = feeds.reference(spec, feeds.cases[0])[output.name]
    shape = [1 if isinstance(d, str) else d for d in output.shape]
    noise = np.random.default_rng(0).uniform(-1, 1, shape) * NOISE_FRACTION * np.abs(reference).max()
    return OnnxRuntimeRunner(perturbed_graph(onnx_dir / spec.onnx_file, output.name, noise, tmp_path),
                             label="perturbed")


@pytest.mark.parametrize("spec", ORI.graphs, ids=lambda s: s.name)
def test_gate_accepts_a_faithful_engine(onnx_dir, feeds, spec):
    report = require_pass(check_engine(spec, OnnxRuntimeRunner(onnx_dir / spec.onnx_file, label="same graph"), feeds))
    assert len(report.checks) == len(feeds.cases) * len(spec.outputs)
    assert not report.synthetic_inputs  # every input is real: preprocessed or another graph's output
    assert all(c.max_rel < 1e-5 for c in report.checks)


@pytest.mark.parametrize("spec", ORI.graphs, ids=lambda s: s.name)
def test_gate_rejects_an_engine_with_noise_on_an_output(onnx_dir, feeds, spec, tmp_path):
    report = check_engine(spec, noisy_engine(spec, onnx_dir, feeds, tmp_path), feeds)
    with pytest.raises(AccuracyGateError) as error:
        require_pass(report)
    message = str(error.value)
    assert spec.name in message and repr(spec.outputs[0].name) in message and "x over" in message
    worst = report.failures()[0]
    assert worst.output == spec.outputs[0].name
    assert NOISE_FRACTION / 2 < worst.max_rel < NOISE_FRACTION * 2  # the noise, measured back (scales differ by case)
    untouched = [c for c in report.checks if c.output != spec.outputs[0].name]
    assert all(c.passed for c in untouched)


def test_decoder_gate_measures_mask_iou_of_real_masks(feeds):
    report = check_engine(PROMPT_MASK_DECODER, feeds.runner(PROMPT_MASK_DECODER), feeds)
    masks = [c for c in report.checks if c.output == "low_res_masks"]
    assert masks and all(c.mask_iou == 1.0 and c.tolerance == MASK_TOLERANCE for c in masks)
    logits = feeds.reference(PROMPT_MASK_DECODER, feeds.cases[0])["low_res_masks"]
    assert 0.02 < (logits > 0).mean() < 0.98  # masks with both classes: the IoU is informative


def test_cases_batch_prompts_of_different_lengths_and_pad_one_to_the_maximum(feeds):
    batched, padded = (feeds.feeds(BEIT3_FUSION_ENCODER, case) for case in feeds.cases[:2])
    lengths = batched["attention_mask"].sum(axis=1)
    assert len(set(lengths)) > 1 and batched["attention_mask"].shape[1] > lengths.min()
    assert batched["images_evf"].shape[0] == len(lengths)  # the image repeated for every prompt
    assert padded["input_ids"].shape == (1, MAX_TEXT_TOKENS) and padded["attention_mask"].sum() < MAX_TEXT_TOKENS


def test_broadcast_rows_refuses_mismatched_batches_and_profile_overflow():
    good = {"image_embeddings": np.zeros((1, 256, 64, 64), np.float32), "text_embeds": np.zeros((3, 1, 256), np.float32)}
    assert broadcast_rows(PROMPT_MASK_DECODER, good)["image_embeddings"].shape[0] == 1  # the graph broadcasts it
    beit3 = {"images_evf": np.zeros((1, 3, 224, 224), np.float32), "input_ids": np.zeros((3, 8), np.int64),
             "attention_mask": np.ones((3, 8), np.int64)}
    assert broadcast_rows(BEIT3_FUSION_ENCODER, beit3)["images_evf"].shape[0] == 3  # one view for three prompts
    with pytest.raises(ValueError, match="rows"):
        broadcast_rows(BEIT3_FUSION_ENCODER, {**beit3, "images_evf": np.zeros((2, 3, 224, 224), np.float32)})
    too_many = PROMPT_MASK_DECODER.max_rows + 1
    with pytest.raises(ValueError, match="outside the profile"):
        broadcast_rows(PROMPT_MASK_DECODER, {**good, "text_embeds": np.zeros((too_many, 1, 256), np.float32)})


def test_output_comparison_flags_non_finite_values_and_low_mask_iou():
    reference = np.array([[-2.0, -1.0, 1.0, 2.0]], np.float32)
    assert mask_iou(reference, reference) == 1.0 and mask_iou(-np.ones(3), -np.ones(3)) == 1.0
    flipped = compare_output("c", "m", reference, np.array([[-2.0, 1.0, 1.0, 2.0]], np.float32), Tolerance(1.0, 0.9))
    assert flipped.mask_iou == pytest.approx(2 / 3) and not flipped.passed and "mask IoU" in flipped.excess()
    nan = compare_output("c", "x", reference, np.array([[np.nan, -1.0, 1.0, 2.0]], np.float32), Tolerance(1.0))
    assert not nan.finite and not nan.passed and "NaN" in nan.excess()
