"""Checkpoint layout, loading round trips, upstream parameter names, and clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from evfsam.checkpoint import CheckpointError, load_evf_sam, read_state_dict, weight_files
from evfsam.modeling.builder import EvfSamConfig, build_evf_sam
from export.tiny_checkpoint import write_tiny_checkpoint

FULL_CONFIG = {"model_type": "evf", "hidden_size": 1024, "out_dim": 256, "sam_scale": "huge", "mm_extractor_scale": "large"}


@pytest.mark.parametrize("weights_format", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(tmp_path, weights_format, dtype):
    directory = write_tiny_checkpoint(tmp_path / "ckpt", weights_format=weights_format, dtype=dtype)
    saved = read_state_dict(weight_files(directory))
    model, config, _ = load_evf_sam(directory)
    loaded = model.state_dict()
    assert set(saved) == set(loaded)
    for name, tensor in saved.items():
        assert tensor.dtype == dtype
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.float()), name
    assert config.beit3.embed_dim == 32 and config.sam.depth == 2


def test_full_size_architecture_has_upstream_names_and_shapes():
    """SAM ViT-H + BEiT-3 large as upstream builds them; meta tensors, no memory."""
    with torch.device("meta"):
        model = build_evf_sam(EvfSamConfig.from_dict(FULL_CONFIG))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    beit = "mm_extractor.beit3."
    expected = {
        beit + "text_embed.weight": (64010, 1024),
        beit + "vision_embed.proj.weight": (1024, 3, 16, 16),
        beit + "vision_embed.cls_token": (1, 1, 1024),
        beit + "vision_embed.mask_token": (1, 1, 1024),
        beit + "encoder.embed_positions.A.weight": (199, 1024),  # 196 patches + [CLS] + fairseq offset 2
        beit + "encoder.embed_positions.B.weight": (1024, 1024),
        beit + "encoder.layers.23.self_attn.q_proj.A.weight": (1024, 1024),
        beit + "encoder.layers.23.self_attn.k_proj.B.bias": (1024,),
        beit + "encoder.layers.0.self_attn.inner_attn_ln.B.weight": (1024,),
        beit + "encoder.layers.0.self_attn_layer_norm.A.weight": (1024,),
        beit + "encoder.layers.0.ffn.A.fc1.weight": (4096, 1024),
        beit + "encoder.layers.0.ffn.B.ffn_layernorm.weight": (4096,),
        beit + "encoder.layers.0.final_layer_norm.B.bias": (1024,),
        beit + "encoder.layer_norm.A.weight": (1024,),
        "text_hidden_fcs.0.0.weight": (1024, 1024),
        "text_hidden_fcs.0.2.weight": (256, 1024),
        "visual_model.image_encoder.pos_embed": (1, 64, 64, 1280),
        "visual_model.image_encoder.blocks.31.attn.rel_pos_h": (127, 80),  # global block
        "visual_model.image_encoder.blocks.0.attn.rel_pos_w": (27, 80),  # windowed block
        "visual_model.prompt_encoder.no_mask_embed.weight": (1, 256),
        "visual_model.mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert not any(k.startswith(beit + "encoder.layers.24.") for k in shapes)
    assert "visual_model.pixel_mean" not in shapes  # a non-persistent buffer upstream too
    sam_parameters = sum(p.numel() for p in model.visual_model.parameters())
    assert sam_parameters == 641_090_608  # the published SAM ViT-H parameter count


def _fresh(tmp_path):
    return write_tiny_checkpoint(tmp_path / "ckpt")


def _rewrite_weights(directory, mutate):
    from safetensors.torch import save_file

    state = read_state_dict(weight_files(directory))
    mutate(state)
    save_file(state, str(directory / "model.safetensors"))


def _error(directory) -> str:
    with pytest.raises(CheckpointError) as info:
        load_evf_sam(directory)
    return str(info.value)


def test_missing_key_is_named(tmp_path):
    directory = _fresh(tmp_path)
    _rewrite_weights(directory, lambda s: s.pop("text_hidden_fcs.0.2.bias"))
    assert "missing keys: text_hidden_fcs.0.2.bias" in _error(directory)


def test_unexpected_key_is_named(tmp_path):
    directory = _fresh(tmp_path)
    _rewrite_weights(directory, lambda s: s.update({"mm_extractor.beit3.extra.weight": torch.zeros(2)}))
    assert "unexpected keys: mm_extractor.beit3.extra.weight" in _error(directory)


def test_wrong_shape_is_named(tmp_path):
    directory = _fresh(tmp_path)
    _rewrite_weights(directory, lambda s: s.update({"text_hidden_fcs.0.0.weight": torch.zeros(32, 31)}))
    assert "text_hidden_fcs.0.0.weight: checkpoint (32, 31) vs model (32, 32)" in _error(directory)


def test_corrupt_weights(tmp_path):
    directory = _fresh(tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    message = _error(directory)
    assert "model.safetensors: cannot read weights" in message


def test_missing_weights_and_config(tmp_path):
    directory = _fresh(tmp_path)
    (directory / "model.safetensors").unlink()
    assert "no weights found" in _error(directory)
    (directory / "config.json").unlink()
    assert "config.json: not found" in _error(directory)


def test_missing_shard(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "ckpt", weights_format="sharded")
    (directory / "model-00002-of-00002.safetensors").unlink()
    assert "shard files missing" in _error(directory)


@pytest.mark.parametrize("change, expected", [
    ({"model_type": "llava"}, "model_type is 'llava'"),
    ({"sam_scale": "giant"}, "'sam_scale' is 'giant'"),
    ({"mm_extractor_scale": None}, "'mm_extractor_scale' is None"),
    ({"hidden_size": 64}, "hidden_size 64 != BEiT-3 embed_dim 32"),
    ({"beit3": {"depth": 3}}, "unknown keys in 'beit3': ['depth']"),
])
def test_bad_config(tmp_path, change, expected):
    directory = _fresh(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    assert expected in _error(directory)


def test_not_json_config(tmp_path):
    directory = _fresh(tmp_path)
    (directory / "config.json").write_text("{not json")
    assert "not valid JSON" in _error(directory)


def test_unresolvable_checkpoint_names(tmp_path):
    with pytest.raises(CheckpointError, match="neither a directory nor a hub id"):
        load_evf_sam(str(tmp_path / "does" / "not" / "exist"))
    file_path = tmp_path / "file.bin"
    file_path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_evf_sam(file_path)


def test_export_cli_reports_checkpoint_errors(tmp_path, capsys):
    from export.__main__ import main

    directory = _fresh(tmp_path)
    shutil.move(directory / "model.safetensors", tmp_path / "elsewhere.safetensors")
    assert main(["--checkpoint", str(directory), "--output-dir", str(tmp_path / "out")]) == 2
    assert "no weights found" in capsys.readouterr().err
