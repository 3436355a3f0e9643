"""Load an EVF-SAM checkpoint in the layout upstream publishes (e.g. `YxZhang/evf-sam`).

A checkpoint is a directory (or a Hugging Face hub id, downloaded when online) holding
`config.json`, the weights as `model.safetensors`, `pytorch_model.bin`, or shards with
`model.safetensors.index.json` / `pytorch_model.bin.index.json`, and the XLM-R tokenizer files.
fp16 / bf16 weights are loaded and cast to float32.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch

from .modeling.builder import PIXEL_MEAN, PIXEL_STD, ConfigError, EvfSamConfig, build_evf_sam
from .modeling.evf_sam import EvfSamModel

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
]


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


def read_config(directory: Path) -> EvfSamConfig:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found (an EVF-SAM checkpoint needs config.json)")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from exc
    try:
        return EvfSamConfig.from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def weight_files(directory: Path) -> List[Path]:
    for index_name in INDEX_FILES:
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid shard index: {exc}") from exc
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


def load_evf_sam(checkpoint: str | os.PathLike) -> Tuple[EvfSamModel, EvfSamConfig, Path]:
    """Build EVF-SAM from `checkpoint` (dir or hub id), load its weights strictly, eval() in fp32."""
    directory = resolve_checkpoint(str(checkpoint))
    config = read_config(directory)
    state = read_state_dict(weight_files(directory))
    with torch.device("meta"):  # no random init: the checkpoint's tensors become the parameters
        model = build_evf_sam(config)
    check_state_dict(model, state)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    _materialise_non_persistent_buffers(model)
    return model.eval(), config, directory


def _materialise_non_persistent_buffers(model: EvfSamModel) -> None:
    """SAM's pixel mean/std are not in state dicts; give them their values (segment-anything's)."""
    sam = model.visual_model
    for name, values in (("pixel_mean", PIXEL_MEAN), ("pixel_std", PIXEL_STD)):
        sam.register_buffer(name, torch.tensor(values).view(-1, 1, 1), persistent=False)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors without values after loading: {leftovers[:8]}")
