"""python -m export --checkpoint DIR|HUB_ID [--output-dir build/onnx]

Loads EVF-SAM, writes the three ONNX graphs + tokenizer.json + manifest.json, validates every graph
against PyTorch on ONNX Runtime and prints the table.  Exits 1 on a validation failure, 2 on a
checkpoint problem.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from evfsam.checkpoint import CheckpointError, load_evf_sam
from evfsam.specs import GRAPHS, GRAPHS_BY_NAME, TOKENIZER_FILE
from evfsam.tokenization import write_tokenizer_json

from .onnx_export import DEFAULT_OPSET, ExportValidationError, export_graph, file_digest, format_table, validate_graph

MANIFEST_FILE = "manifest.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or Hugging Face hub id")
    parser.add_argument("--output-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--graphs", nargs="+", choices=sorted(GRAPHS_BY_NAME), default=[g.name for g in GRAPHS])
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
    print(f"loaded {args.checkpoint}: SAM {config.sam_scale} (embed {config.sam.embed_dim}, depth {config.sam.depth}), "
          f"BEiT-3 {config.mm_extractor_scale} (embed {config.beit3.embed_dim}, layers {config.beit3.layers})")
    out_dir: Path = args.output_dir
    write_tokenizer_json(directory, out_dir / TOKENIZER_FILE)
    results, graphs = [], {}
    for name in args.graphs:
        spec = GRAPHS_BY_NAME[name]
        t0 = time.time()
        path = export_graph(model, spec, out_dir, args.opset, config.beit3.vocab_size)
        results += validate_graph(model, spec, path, args.atol, args.rtol, vocab_size=config.beit3.vocab_size)
        graphs[name] = {"file": spec.onnx_file, "sha256": file_digest(path), "seconds": round(time.time() - t0, 1)}
        print(f"exported {path} in {graphs[name]['seconds']} s")
    manifest = {
        "checkpoint": str(args.checkpoint),
        "opset": args.opset,
        "torch": torch.__version__,
        "sam_scale": config.sam_scale,
        "mm_extractor_scale": config.mm_extractor_scale,
        "vocab_size": config.beit3.vocab_size,
        "graphs": graphs,
        "tokenizer": TOKENIZER_FILE,
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
