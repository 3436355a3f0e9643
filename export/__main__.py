"""python -m export --checkpoint DIR|HUB_ID [--output-dir build/onnx] [--recipe NAME]

Loads EVF-SAM (either family), writes its three ONNX graphs + tokenizer.json + manifest.json, validates
every graph against PyTorch on ONNX Runtime and prints the table.  The manifest records what the
graphs were built from (checkpoint, its content hash, family, recipe), which `serving.prepare` uses to
rebuild whatever is stale.  Exits 1 on a validation failure, 2 on a checkpoint problem.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from evfsam import provenance
from evfsam.checkpoint import CheckpointError, load_evf_sam
from evfsam.specs import TOKENIZER_FILE, family
from evfsam.tokenization import write_tokenizer_json

from .onnx_export import DEFAULT_OPSET, ExportValidationError, export_graph, file_digest, format_table, validate_graph

MANIFEST_FILE = provenance.MANIFEST_FILE


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or Hugging Face hub id")
    parser.add_argument("--output-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--recipe", default=None,
                        help="inference recipe (default: the one the checkpoint needs; see README 'Checkpoints')")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--graphs", nargs="+", default=None, help="export only these graphs of the family")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.opset < 17:
        raise SystemExit("--opset must be >= 17 (LayerNormalization)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model, config, directory = load_evf_sam(args.checkpoint)
    source = provenance.describe_checkpoint(args.checkpoint, directory, config, args.recipe)
    family_spec = family(source["family"])
    print(f"loaded {args.checkpoint}: family {source['family']}, recipe {source['recipe']} "
          f"({source['recipe_reason']}), checkpoint sha256 {source['checkpoint_sha256'][:12]}")
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # no manifest while the graphs are half written
    write_tokenizer_json(directory, out_dir / TOKENIZER_FILE)
    names = args.graphs or [g.name for g in family_spec.graphs]
    unknown = sorted(set(names) - {g.name for g in family_spec.graphs})
    if unknown:
        raise SystemExit(f"--graphs: {unknown} are not graphs of family {family_spec.name!r}")
    results, graphs = [], {}
    for spec in (g for g in family_spec.graphs if g.name in names):
        t0 = time.time()
        path = export_graph(model, spec, out_dir, args.opset, config.beit3.vocab_size, recipe=source["recipe"])
        results += validate_graph(model, spec, path, args.atol, args.rtol, vocab_size=config.beit3.vocab_size,
                                  recipe=source["recipe"])
        graphs[spec.name] = {"file": spec.onnx_file, "sha256": file_digest(path), "seconds": round(time.time() - t0, 1)}
        print(f"exported {path} in {graphs[spec.name]['seconds']} s")
    manifest = {
        **source,
        "opset": args.opset,
        "torch": torch.__version__,
        "exporter_commit": provenance.git_commit(),
        "sam_scale": config.sam_scale,
        "mm_extractor_scale": config.mm_extractor_scale,
        "vocab_size": config.beit3.vocab_size,
        "graphs": graphs,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": file_digest(out_dir / TOKENIZER_FILE),
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    print("\nvalidation (fresh random inputs, batch and text length differ from the trace):")
    print(format_table(results))
    return manifest


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportValidationError as exc:
        print(f"validation failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
