"""The ONNX graphs of both families: parity with PyTorch, padding and broadcast equivalence, provenance,
the typed failure."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evfsam.specs import BEIT3_FUSION_ENCODER, ORI, PROMPT_MASK_DECODER, SAM2, SAM2_PROMPT_MASK_DECODER, TOKENIZER_FILE
from export.onnx_export import ExportValidationError, ort_session, validate_graph

PROMPTS = ["zebra top left", "the man in the red shirt", "  a cat  ", "Ünïcödé piñata 😀", "left", "x" * 40,
           "the second giraffe from the right, behind the fence"]


def test_export_writes_graphs_tokenizer_and_manifest(onnx_dir, tiny_checkpoint):
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert (manifest["family"], manifest["recipe"], manifest["multitask"]) == ("ori", "ori", False)
    assert manifest["checkpoint"] == str(tiny_checkpoint) and len(manifest["checkpoint_sha256"]) == 64
    for spec in ORI.graphs:
        assert (onnx_dir / spec.onnx_file).is_file()
        assert len(manifest["graphs"][spec.name]["sha256"]) == 64
        import onnx

        graph = onnx.load(str(onnx_dir / spec.onnx_file)).graph
        assert [i.name for i in graph.input] == list(spec.input_names)
        assert [o.name for o in graph.output] == list(spec.output_names)
        batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param, f"{spec.name}: batch axis is not dynamic"
    assert manifest["opset"] >= 17
    assert (onnx_dir / TOKENIZER_FILE).is_file()


@pytest.mark.parametrize("spec", ORI.graphs, ids=lambda s: s.name)
@pytest.mark.parametrize("batch, text_len", [(1, 2), (5, 21)])
def test_graph_parity_at_untraced_shapes(loaded_model, onnx_dir, spec, batch, text_len):
    model, config = loaded_model
    results = validate_graph(model, spec, onnx_dir / spec.onnx_file, vocab_size=config.beit3.vocab_size,
                             axes={"batch": batch, "text_len": text_len}, seed=batch)
    assert all(r.ok for r in results)
    assert {r.output for r in results} == set(spec.output_names)


@pytest.mark.parametrize("spec", SAM2.graphs, ids=lambda s: s.name)
def test_sam2_graph_parity_at_untraced_shapes(loaded_sam2_model, sam2_onnx_dir, spec):
    model, config = loaded_sam2_model
    results = validate_graph(model, spec, sam2_onnx_dir / spec.onnx_file, vocab_size=config.beit3.vocab_size,
                             axes={"batch": 3, "text_len": 11}, seed=7, recipe="sam2-v2")
    assert all(r.ok for r in results)
    assert {r.output for r in results} == set(spec.output_names)


def test_sam2_export_records_family_recipe_and_multitask(sam2_onnx_dir):
    manifest = json.loads((sam2_onnx_dir / "manifest.json").read_text())
    assert (manifest["family"], manifest["recipe"], manifest["multitask"]) == ("sam2", "sam2-v2", True)
    assert set(manifest["graphs"]) == {g.name for g in SAM2.graphs}


def test_sam2_single_stability_recipe_exports_its_own_decoder(tiny_sam2_checkpoint, loaded_sam2_model, tmp_path):
    """--recipe sam2-v1 bakes the stability fallback into the decoder graph; the default (sam2-v2) does not."""
    from export.__main__ import parse_args, run

    run(parse_args(["--checkpoint", str(tiny_sam2_checkpoint), "--output-dir", str(tmp_path),
                    "--recipe", "sam2-v1", "--graphs", SAM2_PROMPT_MASK_DECODER.name]))
    model, config = loaded_sam2_model
    results = validate_graph(model, SAM2_PROMPT_MASK_DECODER, tmp_path / SAM2_PROMPT_MASK_DECODER.onnx_file,
                             recipe="sam2-v1", axes={"batch": 4}, seed=2)
    assert all(r.ok for r in results)
    with pytest.raises(ExportValidationError):  # the graph is not the multimask-best one
        validate_graph(model, SAM2_PROMPT_MASK_DECODER, tmp_path / SAM2_PROMPT_MASK_DECODER.onnx_file,
                       recipe="sam2-v2", axes={"batch": 4}, seed=2)


def test_recipe_of_another_family_is_refused(tiny_checkpoint, tmp_path):
    from evfsam.provenance import ProvenanceError
    from export.__main__ import parse_args, run

    with pytest.raises(ProvenanceError, match="recipe 'sam2-v1' is for 'sam2' checkpoints"):
        run(parse_args(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path), "--recipe", "sam2-v1"]))


def test_validation_fails_typed_when_graph_disagrees(loaded_model, onnx_dir):
    model, config = loaded_model
    decoder_bias = model.visual_model.mask_decoder.iou_prediction_head.layers[2].bias
    original = decoder_bias.detach().clone()
    try:
        with torch.no_grad():
            decoder_bias += 0.5
        with pytest.raises(ExportValidationError) as info:
            validate_graph(model, PROMPT_MASK_DECODER, onnx_dir / PROMPT_MASK_DECODER.onnx_file,
                           vocab_size=config.beit3.vocab_size)
    finally:
        with torch.no_grad():
            decoder_bias.copy_(original)
    assert info.value.output == "iou_predictions" and info.value.max_abs == pytest.approx(0.5, abs=1e-3)
    assert "prompt_mask_decoder: output 'iou_predictions'" in str(info.value)


def test_tokenizer_json_matches_upstream_slow_tokenizer(prompt_tokenizer, upstream_tokenizer):
    for prompt in PROMPTS:
        assert prompt_tokenizer.encode(prompt) == upstream_tokenizer(prompt)["input_ids"], prompt
    ids = prompt_tokenizer.encode("zebra top left")
    assert ids[0] == 0 and ids[-1] == 2  # <s> ... </s>


def _beit3_inputs(prompt_tokenizer, prompts, rng):
    from evfsam.tokenization import pad_batch

    input_ids, attention_mask = pad_batch([prompt_tokenizer.encode(p) for p in prompts])
    images = rng.standard_normal((len(prompts), 3, 224, 224)).astype(np.float32)
    return {"images_evf": images, "input_ids": input_ids, "attention_mask": attention_mask}


def test_padded_prompts_equal_unpadded(onnx_dir, prompt_tokenizer):
    session = ort_session(onnx_dir / BEIT3_FUSION_ENCODER.onnx_file)
    feeds = _beit3_inputs(prompt_tokenizer, PROMPTS, np.random.default_rng(0))
    assert (feeds["attention_mask"] == 0).any()
    (batched,) = session.run(None, feeds)
    for row in range(len(PROMPTS)):
        n = int(feeds["attention_mask"][row].sum())
        (alone,) = session.run(None, {"images_evf": feeds["images_evf"][row:row + 1],
                                      "input_ids": feeds["input_ids"][row:row + 1, :n],
                                      "attention_mask": feeds["attention_mask"][row:row + 1, :n]})
        np.testing.assert_allclose(batched[row], alone[0], rtol=0, atol=1e-5)
    # ... and the mask is what makes that true: without it the padded rows change.
    unmasked = dict(feeds, attention_mask=np.ones_like(feeds["attention_mask"]))
    (ignored_padding,) = session.run(None, unmasked)
    padded_rows = (feeds["attention_mask"] == 0).any(axis=1)
    assert np.abs(ignored_padding[padded_rows] - batched[padded_rows]).max() > 1e-3


def test_decoder_equals_upstream_decoder_broadcast_and_paired(loaded_model, onnx_dir, torch_pipeline):
    """One image broadcast over N prompts (the served case) and image i with prompt i both equal
    segment-anything's own MaskDecoder called per prompt as upstream calls it."""
    rng = np.random.default_rng(3)
    embeddings = rng.standard_normal((3, 256, 64, 64)).astype(np.float32)
    text = rng.standard_normal((3, 1, 256)).astype(np.float32)
    session = ort_session(onnx_dir / PROMPT_MASK_DECODER.onnx_file)
    paired = session.run(None, {"image_embeddings": embeddings, "text_embeds": text})
    broadcast = session.run(None, {"image_embeddings": embeddings[:1], "text_embeds": text})
    for i in range(3):
        for masks, iou, image in ((*paired, embeddings[i:i + 1]), (*broadcast, embeddings[:1])):
            ref_masks, ref_iou = torch_pipeline.decode(torch.from_numpy(image), torch.from_numpy(text[i:i + 1]))
            np.testing.assert_allclose(masks[i:i + 1], ref_masks.numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(iou[i:i + 1], ref_iou.numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_full_size_export_uses_external_data(tmp_path):
    """SAM-H + BEiT-3-L with random weights: the >2 GB path. Time and peak memory go in the README."""
    from export.__main__ import parse_args, run
    from export.tiny_checkpoint import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "full", size="full")
    out = tmp_path / "onnx"
    run(parse_args(["--checkpoint", str(checkpoint), "--output-dir", str(out)]))
    assert (out / "sam_image_encoder.onnx.data").stat().st_size > 2 * 1024**3
    assert (out / "sam_image_encoder.onnx").stat().st_size < 50 * 1024**2
