"""What a set of exported graphs (and the repository built from them) was made from.

`python -m export` records in `manifest.json`: the checkpoint as given, where it was read from, a
sha256 over its files, the model family, whether it is a multitask checkpoint and the inference
recipe.  `serving.prepare` compares that record with the checkpoint asked for, and the served models
publish it (config parameters, a log line), so a stale or different model is never served quietly.
No torch here: the serving side imports this module.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

MANIFEST_FILE = "manifest.json"
SEMANTIC_TOKEN = "[semantic]"  # the added token of upstream's -multitask checkpoints
# Files of a checkpoint that decide what it computes (weights, config, tokenizer).
CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")


class ProvenanceError(RuntimeError):
    pass


def checkpoint_files(directory: Path) -> List[Path]:
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if not files:
        raise ProvenanceError(f"{directory}: no checkpoint files")
    return files


def fingerprint(directory: Path) -> Dict[str, List[int]]:
    """{file name: [size, mtime_ns]}: cheap, to tell whether the content hash must be recomputed."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoint_files(directory)}


def content_digest(directory: Path) -> str:
    """sha256 over the checkpoint's files, names and contents, in name order."""
    digest = hashlib.sha256()
    for path in checkpoint_files(directory):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def added_tokens(directory: Path) -> List[str]:
    """The tokenizer's added tokens, as transformers' slow XLM-R tokenizer reads them."""
    tokens: List[str] = []
    added = Path(directory) / "added_tokens.json"
    if added.is_file():
        tokens += list(json.loads(added.read_text()))
    config = Path(directory) / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text()).get("added_tokens_decoder", {})
        tokens += [entry.get("content", "") for entry in decoder.values()]
    return sorted(set(tokens))


def is_multitask(directory: Path) -> bool:
    return SEMANTIC_TOKEN in added_tokens(directory)


def describe_checkpoint(checkpoint: str, directory: Path, config, recipe: Optional[str] = None) -> Dict:
    from .recipes import default_recipe, get_recipe

    family = getattr(config, "family", "ori")
    multitask = is_multitask(directory)
    chosen = recipe or default_recipe(family, multitask)
    spec = get_recipe(chosen)
    if spec.family != family:
        raise ProvenanceError(f"recipe {chosen!r} is for {spec.family!r} checkpoints; {checkpoint!r} is {family!r}")
    reason = "given with --recipe" if recipe else (
        f"default for {'multitask ' if multitask else ''}{family} checkpoints")
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_dir": str(Path(directory).resolve()),
        "checkpoint_sha256": content_digest(directory),
        "checkpoint_files": fingerprint(directory),
        "family": family,
        "multitask": multitask,
        "recipe": chosen,
        "recipe_reason": reason,
    }


def read_manifest(onnx_dir: Path) -> Optional[Dict]:
    path = Path(onnx_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def git_commit(directory: Optional[Path] = None) -> str:
    root = directory or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
