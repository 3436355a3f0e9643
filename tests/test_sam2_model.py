"""EVF-SAM2's own SAM-2 modules against Meta's SAM-2 (pip sam2==1.1.0), built and called as upstream
EVF-SAM2 builds and calls it (see tests/sam2_reference.py), with the same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evfsam.checkpoint import load_evf_sam
from evfsam.modeling.builder import EvfSam2Config, EvfSamConfig, build_evf_model
from evfsam.modeling.sam2 import MASK_SELECTIONS, MULTIMASK_BEST, SINGLE_STABILITY
from evfsam.processing import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from tests.sam2_reference import (
    build_meta_sam2,
    meta_state_dict,
    upstream_decode,
    upstream_image_features,
    upstream_state_dict,
)

# The published checkpoints' config.json (YxZhang/evf-sam2 and YxZhang/evf-sam, as on the hub).
EVF_SAM2_CONFIG = {"architectures": ["EvfSam2Model"], "bos_token_id": 0, "eos_token_id": 2, "hidden_size": 1024,
                   "mm_extractor_scale": "large", "model_type": "evf", "out_dim": 256, "pad_token_id": 1,
                   "sam_scale": "large", "tie_word_embeddings": False, "torch_dtype": "float16",
                   "transformers_version": "4.43.3"}
EVF_SAM_CONFIG = {**EVF_SAM2_CONFIG, "architectures": ["EvfSamModel"], "sam_scale": "huge"}
PROMPTS = 4


@pytest.fixture(scope="module")
def models(tiny_sam2_checkpoint):
    """Ours from the tiny checkpoint, and Meta's SAM-2 holding the same weights."""
    ours, config, _ = load_evf_sam(tiny_sam2_checkpoint)
    theirs = build_meta_sam2(config.sam)
    visual = {k[len("visual_model."):]: v for k, v in ours.state_dict().items() if k.startswith("visual_model.")}
    theirs.load_state_dict(meta_state_dict(visual), strict=True)
    return ours, theirs


@pytest.fixture(scope="module")
def sample_image() -> torch.Tensor:
    """assets/sample.jpg as upstream's SAM-2 view: resized to 1024x1024, normalised."""
    rgb = np.asarray(Image.open("assets/sample.jpg").convert("RGB").resize((1024, 1024), Image.BILINEAR), np.float32)
    return torch.from_numpy((rgb - SAM_PIXEL_MEAN) / SAM_PIXEL_STD).permute(2, 0, 1)[None].float()


@pytest.fixture(scope="module")
def features(models, sample_image):
    """(ours, upstream's) image features of the sample image, and PROMPTS prompts' text embeddings."""
    ours, theirs = models
    with torch.inference_mode():
        our_features = ours.encode_image(sample_image)
        their_features = upstream_image_features(theirs, sample_image)
        generator = torch.Generator().manual_seed(0)
        text = ours.encode_prompt(
            torch.randn(PROMPTS, 3, 224, 224, generator=generator),
            torch.randint(4, 100, (PROMPTS, 7), generator=generator),
            torch.ones(PROMPTS, 7, dtype=torch.long),
        )
    return our_features, their_features, text


@pytest.fixture(scope="module")
def decoded(models, features):
    """Our decode_masks for the sample image (M=1) and all prompts, per mask selection."""
    ours, _ = models
    (embeddings, feats_0, feats_1), _, text = features
    with torch.inference_mode():
        return {mode: ours.decode_masks(embeddings, feats_0, feats_1, text, mode) for mode in MASK_SELECTIONS}


def _assert_close(ours, theirs, atol, name=""):
    assert ours.shape == theirs.shape, name
    difference = (ours - theirs).abs().max().item()
    assert difference <= atol, f"{name}: max abs difference {difference:.3g} > {atol:.3g}"


def _meta_device(build):
    """Build on the meta device; Meta's Hiera calls `.item()` on a drop-path schedule, kept on CPU."""
    real_linspace = torch.linspace
    torch.linspace = lambda *args, **kwargs: real_linspace(*args, **{**kwargs, "device": "cpu"})
    try:
        with torch.device("meta"):
            return build()
    finally:
        torch.linspace = real_linspace


def test_full_size_state_dict_is_upstream_sam2_hiera_l_plus_beit3():
    """Every key and shape of the published EVF-SAM2: SAM2Base (sam2_hiera_l) + ori's BEiT-3-L and MLP."""
    config = EvfSam2Config.from_dict(EVF_SAM2_CONFIG)
    ours = {k: tuple(v.shape) for k, v in _meta_device(lambda: build_evf_model(config)).state_dict().items()}
    meta_sam2 = _meta_device(lambda: build_meta_sam2(config.sam))
    expected = {"visual_model." + k: tuple(v.shape) for k, v in upstream_state_dict(meta_sam2).items()}
    ori = _meta_device(lambda: build_evf_model(EvfSamConfig.from_dict(EVF_SAM_CONFIG)))
    expected.update({k: tuple(v.shape) for k, v in ori.state_dict().items() if not k.startswith("visual_model.")})
    assert ours == expected
    assert ours["visual_model.memory_encoder.fuser.layers.1.weight"] == (256,)  # Meta's `gamma`
    assert ours["visual_model.image_encoder.trunk.blocks.47.mlp.layers.1.weight"] == (1152, 4608)
    assert sum(np.prod(s) for k, s in ours.items() if k.startswith("visual_model.")) == 224_430_386


@pytest.mark.parametrize("size", [256, 320])  # 320: stages of 80/40/20/10 pad the 16- and 8-windows
def test_image_encoder_levels_match_meta(models, size):
    ours, theirs = models
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    encoder = ours.visual_model.image_encoder
    with torch.inference_mode():
        our_trunk = encoder.trunk(images)
        their_trunk = theirs.image_encoder.trunk(images)
        our_levels = encoder(images)
        their_out = theirs.image_encoder(images)
    assert len(our_trunk) == len(their_trunk) == 4
    for level, (a, b) in enumerate(zip(our_trunk, their_trunk)):
        _assert_close(a, b, 1e-5, f"trunk level {level}")
    assert len(our_levels) == len(their_out["backbone_fpn"]) == 3  # scalp 1
    for level, (a, b) in enumerate(zip(our_levels, their_out["backbone_fpn"])):
        _assert_close(a, b, 1e-5, f"neck level {level}")
    for level, (a, b) in enumerate(zip(encoder.position_encodings(our_levels), their_out["vision_pos_enc"])):
        _assert_close(a, b, 1e-6, f"position encoding {level}")


def test_trunk_position_embedding_is_a_reusable_constant(models):
    ours, theirs = models
    trunk = ours.visual_model.image_encoder.trunk
    with torch.inference_mode():
        constant = ours.trunk_position_embedding()
        _assert_close(constant, theirs.image_encoder.trunk._get_pos_embed((256, 256)), 0, "position embedding")
        images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
        small = trunk.position_embedding(64, 64)
        for a, b in zip(trunk(images, small), trunk(images)):
            assert torch.equal(a, b)
    assert constant.shape == (1, 256, 256, 8)


def test_encode_image_matches_upstream_image_path(features):
    """forward_image + _prepare_backbone_features + no_mem_embed, as upstream's inference()."""
    (ours, their_features) = features[0], features[1]
    assert [tuple(f.shape) for f in ours] == [(1, 256, 64, 64), (1, 32, 256, 256), (1, 64, 128, 128)]
    for name, a, b in zip(("image_embeddings", "high_res_feats_0", "high_res_feats_1"), ours, their_features):
        _assert_close(a, b, 1e-4, name)


@pytest.mark.parametrize("mask_selection, multimask_output", [(MULTIMASK_BEST, True), (SINGLE_STABILITY, False)])
def test_decode_masks_matches_upstream(models, features, decoded, mask_selection, multimask_output):
    """One image, several prompts; in single-stability mode the fallback triggers for some prompts only."""
    _, theirs = models
    (embeddings, feats_0, feats_1), _, text = features
    masks, iou = decoded[mask_selection]
    with torch.inference_mode():
        ref_masks, ref_iou = upstream_decode(theirs, embeddings, feats_0, feats_1, text, multimask_output)
    assert masks.shape == (PROMPTS, 1, 256, 256) and iou.shape == (PROMPTS, 1)
    _assert_close(masks, ref_masks, 1e-4, "mask logits")
    _assert_close(iou, ref_iou, 1e-6, "iou")
    assert ((masks > 0).float().mean((1, 2, 3)) < 0.95).all() and ((masks > 0).float().mean((1, 2, 3)) > 0.01).all()
    if mask_selection == SINGLE_STABILITY:
        decoder = theirs.sam_mask_decoder
        with torch.inference_mode():
            token0 = decoder.predict_masks(
                embeddings, theirs.sam_prompt_encoder.get_dense_pe(), text, theirs.sam_prompt_encoder(None, None, None)[1],
                repeat_image=True, high_res_features=[feats_0, feats_1])[0][:, :1]
        stable = decoder._get_stability_scores(token0).flatten() >= 0.98
        assert stable.any() and not stable.all(), "the tiny checkpoint should exercise both branches"
        _assert_close(masks[stable], token0[stable], 1e-4, "stable prompts keep token 0")
        assert ((masks[~stable] - token0[~stable]).abs().amax((1, 2, 3)) > 1).all(), "unstable prompts fall back"


@pytest.mark.parametrize("mask_selection", MASK_SELECTIONS)
def test_broadcast_image_equals_paired_images(models, features, decoded, mask_selection):
    """M=1 image for N prompts == the image repeated (M=N, image i with prompt i)."""
    ours, _ = models
    (embeddings, feats_0, feats_1), _, text = features
    broadcast = decoded[mask_selection]
    with torch.inference_mode():
        paired = ours.decode_masks(*(f.repeat(PROMPTS, 1, 1, 1) for f in (embeddings, feats_0, feats_1)), text,
                                   mask_selection)
        single = ours.decode_masks(embeddings, feats_0, feats_1, text[2:3], mask_selection)
    _assert_close(broadcast[0], paired[0], 1e-4, "masks")  # logits of O(10): float32 rounding
    _assert_close(broadcast[1], paired[1], 1e-6, "iou")
    _assert_close(broadcast[0][2:3], single[0], 1e-4, "prompt 2 alone")


def test_mask_selection_is_checked(models, features):
    ours, _ = models
    (embeddings, feats_0, feats_1), _, text = features
    with pytest.raises(ValueError, match="mask_selection 'best'"):
        ours.decode_masks(embeddings, feats_0, feats_1, text, "best")


class _EncodeImageGraph(torch.nn.Module):
    """What an export wrapper does: the trunk position embedding held as a constant."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("trunk_position_embedding", model.trunk_position_embedding())

    def forward(self, images):
        return self.model.encode_image(images, self.trunk_position_embedding)


class _DecodeMasksGraph(torch.nn.Module):
    def __init__(self, model, mask_selection):
        super().__init__()
        self.model = model
        self.mask_selection = mask_selection

    def forward(self, image_embeddings, high_res_feats_0, high_res_feats_1, text_embeds):
        return self.model.decode_masks(image_embeddings, high_res_feats_0, high_res_feats_1, text_embeds,
                                       self.mask_selection)


def _export(module, args, path, input_names, output_names, dynamic_axes):
    import warnings

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=17)
    import onnx
    import onnxruntime

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    return ops, onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mask_selection", MASK_SELECTIONS)
def test_decoder_traces_to_onnx_with_image_and_prompt_batches(models, features, decoded, tmp_path, mask_selection):
    """One graph serves M=1 (broadcast) and M=N (paired) images for any N; the mode is baked in."""
    ours, _ = models
    (embeddings, feats_0, feats_1), _, text = features
    names = ["image_embeddings", "high_res_feats_0", "high_res_feats_1", "text_embeds"]
    axes = {**{n: {0: "images"} for n in names[:3]}, "text_embeds": {0: "prompts"},
            "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}}
    ops, session = _export(_DecodeMasksGraph(ours, mask_selection), (embeddings, feats_0, feats_1, text[:2]),
                           tmp_path / "decoder.onnx", names, ["low_res_masks", "iou_predictions"], axes)
    assert not ops & {"Resize", "Tile", "Loop", "If"}
    expected = decoded[mask_selection]
    for images in (1, PROMPTS):
        image_inputs = [f.repeat(images, 1, 1, 1).numpy() for f in (embeddings, feats_0, feats_1)]
        masks, iou = session.run(None, dict(zip(names, image_inputs + [text.numpy()])))
        np.testing.assert_allclose(masks, expected[0].numpy(), rtol=0, atol=2e-4)
        np.testing.assert_allclose(iou, expected[1].numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_image_encoder_traces_to_onnx_without_resize_or_tile(models, features, sample_image, tmp_path):
    """At 1024x1024 with a dynamic batch; bicubic Resize and Tile would not be TensorRT-friendly.
    (Slow: ~20 s on 2 cores; the export integration tests run the same graph.)"""
    ours, _ = models
    names = ["image_embeddings", "high_res_feats_0", "high_res_feats_1"]
    ops, session = _export(_EncodeImageGraph(ours), (sample_image,), tmp_path / "encoder.onnx", ["images"], names,
                           {n: {0: "batch"} for n in ["images"] + names})
    assert not ops & {"Resize", "Tile", "Loop", "If"}
    outputs = session.run(None, {"images": sample_image.repeat(2, 1, 1, 1).numpy()})
    for name, output, expected in zip(names, outputs, features[0]):
        for row in output:
            np.testing.assert_allclose(row, expected[0].numpy(), rtol=0, atol=1e-4, err_msg=name)
