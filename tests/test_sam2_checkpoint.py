"""EVF-SAM2 checkpoints: the family from the weight names, strict loading, dtypes, shards, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from evfsam.checkpoint import CheckpointError, load_evf_sam, read_config, read_state_dict, weight_files, weight_keys
from evfsam.modeling.builder import EvfSam2Config
from evfsam.modeling.evf_sam import EvfSamModel
from evfsam.modeling.evf_sam2 import EvfSam2Model
from export.tiny_checkpoint import SAM2_SIZES, _write_weights


@pytest.fixture(scope="module")
def sam2_state(tiny_sam2_checkpoint):
    return read_state_dict(weight_files(tiny_sam2_checkpoint))


@pytest.fixture
def checkpoint(tiny_sam2_checkpoint, tmp_path):
    """A private copy of the tiny EVF-SAM2 checkpoint to damage."""
    return shutil.copytree(tiny_sam2_checkpoint, tmp_path / "ckpt")


def _rewrite(directory, state, weights_format="safetensors"):
    for old in list(directory.glob("*.safetensors")) + list(directory.glob("*.bin")) + list(directory.glob("*.index.json")):
        old.unlink()
    _write_weights(directory, state, weights_format)


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _error(directory) -> str:
    with pytest.raises(CheckpointError) as info:
        load_evf_sam(directory)
    return str(info.value)


def test_families_are_told_apart_by_weight_names(tiny_checkpoint, tiny_sam2_checkpoint):
    """Both config.json files say model_type "evf"; "large" would be valid for either family."""
    ori, ori_config, _ = load_evf_sam(tiny_checkpoint)
    sam2, sam2_config, _ = load_evf_sam(tiny_sam2_checkpoint)
    assert (ori_config.family, type(ori)) == ("ori", EvfSamModel)
    assert (sam2_config.family, type(sam2)) == ("sam2", EvfSam2Model)
    assert sam2_config.sam_scale == "large" and sam2_config.sam.embed_dim == 8


def _published_dtype(name: str) -> torch.dtype:
    """YxZhang/evf-sam2's model.safetensors is 3,145,168,996 bytes: with this architecture that is
    SAM-2 (224,430,386 parameters) in float16 and BEiT-3 + projection (674,014,464) in float32."""
    return torch.float16 if name.startswith("visual_model.") else torch.float32


@pytest.mark.parametrize("weights_format, dtype_of", [
    ("safetensors", _published_dtype), ("bin", lambda _name: torch.bfloat16), ("sharded", lambda _name: torch.float16),
], ids=["safetensors-published-dtypes", "bin-bfloat16", "sharded-float16"])
def test_round_trip_formats_and_dtypes(checkpoint, sam2_state, weights_format, dtype_of):
    _rewrite(checkpoint, {k: v.to(dtype_of(k)) for k, v in sam2_state.items()}, weights_format)
    model, config, _ = load_evf_sam(checkpoint)
    loaded = model.state_dict()
    assert config.family == "sam2" and set(loaded) == set(sam2_state)
    for name, tensor in sam2_state.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.to(dtype_of(name)).float()), name


def test_family_is_read_from_headers_without_tensors(checkpoint, sam2_state):
    """Damaged tensor data, intact safetensors header: the config still resolves, loading fails."""
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert weight_keys(checkpoint, weight_files(checkpoint)) == set(sam2_state)
    assert read_config(checkpoint).family == "sam2"
    assert "model.safetensors: cannot read weights" in _error(checkpoint)


def test_shard_index_names_the_weights(checkpoint, sam2_state):
    _rewrite(checkpoint, sam2_state, "sharded")
    for shard in checkpoint.glob("model-*.safetensors"):
        shard.write_bytes(b"")  # the index alone decides the family
    assert read_config(checkpoint).family == "sam2"


def test_neither_family(checkpoint, sam2_state):
    prefix = "visual_model.image_encoder.trunk."
    _rewrite(checkpoint, {k.replace(prefix, "visual_model.image_encoder.body."): v for k, v in sam2_state.items()})
    assert "cannot tell the EVF-SAM family: the weights have neither" in _error(checkpoint)


def test_both_families(checkpoint, sam2_state):
    _rewrite(checkpoint, {**sam2_state, "visual_model.image_encoder.blocks.0.norm1.weight": torch.ones(8)})
    assert "cannot tell the EVF-SAM family: the weights have both" in _error(checkpoint)


@pytest.mark.parametrize("change, expected", [
    ({"architectures": ["EvfSamModel"]}, "config.json says 'EvfSamModel' (ori) but the weights are 'sam2'"),
    ({"architectures": ["EvfEffiSamModel"]}, "architecture 'EvfEffiSamModel' is not supported"),
    ({"sam_scale": "huge"}, "'sam_scale' is 'huge', expected one of ['large', 'tiny'] (EVF-SAM family 'sam2'"),
    ({"sam_image_encoder": {"depth": 2}}, "'sam_image_encoder' sizes an EVF-SAM 'ori' image encoder, not 'sam2'"),
    ({"sam2_image_encoder": {"depth": 2}}, "unknown keys in 'sam2_image_encoder': ['depth']"),
    ({"sam2_image_encoder": {**SAM2_SIZES["tiny"]["sam2_image_encoder"], "stages": [1, 2, 3]}},
     "stages (1, 2, 3) must be 4 positive block counts; window_spec (8, 4, 16, 8) needs one window size per stage"),
    ({"sam2_image_encoder": {**SAM2_SIZES["tiny"]["sam2_image_encoder"], "global_att_blocks": [7]}},
     "global_att_blocks (7,) outside depth 7"),
    ({"sam2_image_encoder": {**SAM2_SIZES["tiny"]["sam2_image_encoder"], "num_heads": 3}},
     "num_heads 3 must divide embed_dim 8"),
    ({"model_type": "sam2"}, "model_type is 'sam2', expected 'evf'"),
])
def test_bad_config(checkpoint, change, expected):
    _edit_config(checkpoint, **change)
    assert expected in _error(checkpoint)


def test_hiera_l_config_with_tiny_weights_names_the_mismatch(checkpoint):
    """sam_scale "large" without the size override is Hiera-L: 48 blocks, 1152 channels at stride 32."""
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.pop("sam2_image_encoder")
    (checkpoint / "config.json").write_text(json.dumps(raw))
    message = _error(checkpoint)
    assert "missing keys: visual_model.image_encoder.trunk.blocks.10.attn.proj.bias" in message
    assert ("wrong shapes: visual_model.image_encoder.neck.convs.0.conv.weight: "
            "checkpoint (256, 64, 1, 1) vs model (256, 1152, 1, 1)") in message


def test_missing_and_unexpected_keys_are_named(checkpoint, sam2_state):
    state = dict(sam2_state)
    state.pop("visual_model.no_mem_embed")
    state["visual_model.memory_encoder.fuser.layers.0.gamma"] = torch.ones(256)  # Meta's name, not upstream's
    _rewrite(checkpoint, state)
    message = _error(checkpoint)
    assert "missing keys: visual_model.no_mem_embed" in message
    assert "unexpected keys: visual_model.memory_encoder.fuser.layers.0.gamma" in message


def test_size_presets_build():
    for size, channels in (("vit-b", [896, 448, 224, 112]), ("full", [1152, 576, 288, 144])):
        config = EvfSam2Config.from_dict({"model_type": "evf", "out_dim": 256, **SAM2_SIZES[size]})
        assert config.sam.channel_list == channels, size
