"""Load an EVF-SAM or EVF-SAM2 checkpoint in the layout upstream publishes (`YxZhang/evf-sam`,
`YxZhang/evf-sam2`, and their `-multitask` variants).

A checkpoint is a directory (or a Hugging Face hub id, downloaded when online) holding
`config.json`, the weights as `model.safetensors`, `pytorch_model.bin`, or shards with
`model.safetensors.index.json` / `pytorch_model.bin.index.json`, and the XLM-R tokenizer files
(multitask checkpoints add `added_tokens.json`).  fp16 / bf16 weights are loaded and cast to float32.

Both families' config.json say `model_type: "evf"`, and `sam_scale: "large"` means SAM ViT-L in
one and SAM-2 Hiera-L in the other, so the family ("ori" or "sam2") is decided by the weight names,
read from the safetensors headers / shard index without loading tensors.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Set, Tuple, Union

import torch

from .modeling.builder import PIXEL_MEAN, PIXEL_STD, ConfigError, EvfConfig, build_evf_model, config_from_dict
from .modeling.evf_sam import EvfSamModel
from .modeling.evf_sam2 import EvfSam2Model

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.bin",
    "*.index.json",
    "sentencepiece.bpe.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",  # the multitask checkpoints' "[semantic]"
]
# Weight-name prefixes that tell the families apart.
FAMILY_KEY_PREFIXES = {
    "ori": "visual_model.image_encoder.blocks.",  # SAM ViT
    "sam2": "visual_model.image_encoder.trunk.",  # SAM-2 Hiera
}
# config.json "architectures" as upstream writes them.
ARCHITECTURES = {"EvfSamModel": "ori", "EvfSam2Model": "sam2"}


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable or does not match the model it describes."""


def resolve_checkpoint(checkpoint: str) -> Path:
    """A local directory as is; anything else is taken as a Hugging Face hub repository id."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint {checkpoint!r} is a file; pass the directory holding config.json")
    if checkpoint.count("/") != 1 or checkpoint.startswith((".", "/")):
        raise CheckpointError(f"checkpoint {checkpoint!r} is neither a directory nor a hub id like 'YxZhang/evf-sam'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=checkpoint, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, unknown repo: all end the same way for the user
        raise CheckpointError(f"could not download {checkpoint!r} from the Hugging Face hub: {exc}") from exc


def read_raw_config(directory: Path) -> Dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found (an EVF-SAM checkpoint needs config.json)")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    return raw


def read_config(directory: Path) -> EvfConfig:
    """The checkpoint's config (`EvfSamConfig` or `EvfSam2Config`; `.family` says which)."""
    raw = read_raw_config(directory)
    family = detect_family(raw, weight_keys(directory, weight_files(directory)), directory)
    try:
        return config_from_dict(raw, family)
    except ConfigError as exc:
        raise CheckpointError(f"{exc} (EVF-SAM family {family!r}, from the weight names)") from exc


def detect_family(raw: Mapping[str, Any], keys: Set[str], where: Union[Path, str] = "checkpoint") -> str:
    """"ori" or "sam2" from the weight names, checked against config.json's `architectures`."""
    found = [family for family, prefix in FAMILY_KEY_PREFIXES.items() if any(k.startswith(prefix) for k in keys)]
    if len(found) != 1:
        described = ", ".join(f"{prefix}* ({family})" for family, prefix in FAMILY_KEY_PREFIXES.items())
        state = "both" if found else "neither"
        raise CheckpointError(f"{where}: cannot tell the EVF-SAM family: the weights have {state} of {described}")
    family = found[0]
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list):
        raise CheckpointError(f"{where}: config.json 'architectures' must be a list, got {architectures!r}")
    for name in architectures:
        if name not in ARCHITECTURES:
            raise CheckpointError(
                f"{where}: config.json architecture {name!r} is not supported (supported: {sorted(ARCHITECTURES)})"
            )
        if ARCHITECTURES[name] != family:
            raise CheckpointError(
                f"{where}: config.json says {name!r} ({ARCHITECTURES[name]}) but the weights are "
                f"{family!r} ({FAMILY_KEY_PREFIXES[family]}*)"
            )
    return family


def weight_keys(directory: Path, files: List[Path]) -> Set[str]:
    """Tensor names without loading tensors: the shard index, safetensors headers, or a mmap'd .bin."""
    for index_name in INDEX_FILES:
        if (directory / index_name).is_file():
            return set(_read_index(directory / index_name))
    keys: Set[str] = set()
    for path in files:
        keys |= _safetensors_keys(path) if path.suffix == ".safetensors" else _bin_keys(path)
    return keys


def _safetensors_keys(path: Path) -> Set[str]:
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > path.stat().st_size - 8:
                raise ValueError(f"header of {header_size} bytes in a file of {path.stat().st_size}")
            header = json.loads(f.read(header_size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read weights (safetensors header: {exc})") from exc
    return {k for k in header if k != "__metadata__"}


def _bin_keys(path: Path) -> Set[str]:
    try:
        part = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(part, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(part).__name__}")
    return set(part)


def _read_index(index_path: Path) -> Dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index: {exc}") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' must be an object")
    return weight_map


def weight_files(directory: Path) -> List[Path]:
    for index_name in INDEX_FILES:
        index_path = directory / index_name
        if index_path.is_file():
            weight_map = _read_index(index_path)
            shards = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{index_path}: shard files missing: {missing}")
            return shards
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(
        f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES + INDEX_FILES)})"
    )


def read_state_dict(files: Iterable[Path]) -> Dict[str, torch.Tensor]:
    state: Dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                part = load_file(str(path))
            else:
                part = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
        if not isinstance(part, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(part).__name__}")
        state.update(part)
    return state


def check_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match config.json: " + "; ".join(problems))


def load_evf_sam(checkpoint: str | os.PathLike) -> Tuple[Union[EvfSamModel, EvfSam2Model], EvfConfig, Path]:
    """Build EVF-SAM or EVF-SAM2 (`config.family`) from `checkpoint` (dir or hub id), load its
    weights strictly, eval() in fp32."""
    directory = resolve_checkpoint(str(checkpoint))
    config = read_config(directory)
    state = read_state_dict(weight_files(directory))
    with torch.device("meta"):  # no random init: the checkpoint's tensors become the parameters
        model = build_evf_model(config)
    check_state_dict(model, state)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    if config.family == "ori":
        _materialise_sam_pixel_buffers(model)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors without values after loading: {leftovers[:8]}")
    return model.eval(), config, directory


def _materialise_sam_pixel_buffers(model: EvfSamModel) -> None:
    """SAM's pixel mean/std are not in state dicts; give them their values (segment-anything's)."""
    sam = model.visual_model
    for name, values in (("pixel_mean", PIXEL_MEAN), ("pixel_std", PIXEL_STD)):
        sam.register_buffer(name, torch.tensor(values).view(-1, 1, 1), persistent=False)
