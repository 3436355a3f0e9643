"""Make sure the model repository serves the checkpoint asked for: re-export and regenerate what is stale.

    python -m serving.prepare --checkpoint DIR|HUB_ID [--recipe NAME] [--onnx-dir build/onnx]
                              [--repository build/model_repository] [repository options]

`make serve` and `make demo` run this first.  The exported graphs are stale when `manifest.json` is
missing or was made from another checkpoint (another directory, or files whose content hash differs),
with another recipe, or when a graph it lists is gone; the repository is stale when it was generated
from other graphs or with other options.  Only what is stale is rebuilt, and every decision is printed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional

from evfsam import provenance

from .repository import (RepositoryOptions, add_arguments, options_from, read_export_manifest,
                         read_repository_provenance, write_repository)


def export_staleness(checkpoint_dir: Path, onnx_dir: Path, recipe: Optional[str]) -> Optional[str]:
    """Why the graphs in `onnx_dir` do not belong to `checkpoint_dir` (None: they do)."""
    manifest = provenance.read_manifest(onnx_dir)
    if manifest is None:
        return f"no export in {onnx_dir}"
    if "checkpoint_sha256" not in manifest or "recipe" not in manifest:
        return "the export predates provenance records"
    if recipe is not None and manifest["recipe"] != recipe:
        return f"exported with recipe {manifest['recipe']!r}, {recipe!r} asked for"
    missing = [g["file"] for g in manifest.get("graphs", {}).values() if not (onnx_dir / g["file"]).is_file()]
    if missing or not (onnx_dir / manifest.get("tokenizer", "tokenizer.json")).is_file():
        return f"exported files are missing: {missing or 'tokenizer'}"
    if Path(manifest["checkpoint_dir"]) != checkpoint_dir.resolve():
        return f"exported from {manifest['checkpoint_dir']}, not {checkpoint_dir.resolve()}"
    if manifest.get("checkpoint_files") != provenance.fingerprint(checkpoint_dir):
        # files were touched: only a different content makes the export stale
        if provenance.content_digest(checkpoint_dir) != manifest["checkpoint_sha256"]:
            return f"the checkpoint's files changed since the export (sha256 {manifest['checkpoint_sha256'][:12]})"
    return None


def repository_staleness(repository: Path, onnx_dir: Path, opts: RepositoryOptions) -> Optional[str]:
    recorded = read_repository_provenance(repository)
    if recorded is None:
        return f"no generated repository in {repository}"
    manifest = read_export_manifest(onnx_dir)
    export = recorded.get("export", {})
    for key in ("checkpoint_sha256", "recipe", "graphs", "tokenizer_sha256"):
        if export.get(key) != manifest.get(key):
            return f"generated from other graphs ({key} differs)"
    wanted: Dict = {k: v for k, v in opts.__dict__.items()}
    if recorded.get("options") != wanted:
        changed = sorted(k for k in wanted if recorded.get("options", {}).get(k) != wanted[k])
        return f"generated with other options ({', '.join(changed)})"
    return None


def prepare(checkpoint: str, onnx_dir: Path, repository: Path, opts: RepositoryOptions,
            recipe: Optional[str] = None) -> Dict:
    from evfsam.checkpoint import resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    reason = export_staleness(directory, onnx_dir, recipe)
    if reason is not None:
        print(f"exporting {checkpoint}: {reason}", flush=True)
        from export.__main__ import parse_args, run

        run(parse_args(["--checkpoint", checkpoint, "--output-dir", str(onnx_dir)]
                       + (["--recipe", recipe] if recipe else [])))
    else:
        print(f"{onnx_dir} is up to date for {checkpoint}", flush=True)
    reason = repository_staleness(repository, onnx_dir, opts)
    if reason is not None:
        print(f"generating {repository}: {reason}", flush=True)
        write_repository(repository, onnx_dir, opts)
    else:
        print(f"{repository} is up to date", flush=True)
    manifest = read_export_manifest(onnx_dir)
    print(f"serving {manifest['checkpoint']}: family {manifest['family']}, recipe {manifest['recipe']}, "
          f"checkpoint sha256 {manifest['checkpoint_sha256'][:12]}, {opts.flavor} on {opts.device}", flush=True)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or Hugging Face hub id")
    parser.add_argument("--recipe", default=None, help="inference recipe (default: the checkpoint's own)")
    parser.add_argument("--onnx-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--repository", type=Path, default=Path("build/model_repository"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    from evfsam.checkpoint import CheckpointError
    from export.onnx_export import ExportValidationError

    try:
        prepare(args.checkpoint, args.onnx_dir, args.repository, options_from(args), args.recipe)
    except (CheckpointError, provenance.ProvenanceError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportValidationError as exc:
        print(f"validation failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
