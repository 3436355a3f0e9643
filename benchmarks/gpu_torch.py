"""EVF-SAM's PyTorch paths on a GPU: eager vs SDPA, CUDA graphs and torch.compile, per batch size,
and the SAM encoder's achieved TFLOP/s against a matmul measured in the same run.

    python -m benchmarks.gpu_torch --device cuda --size full        # make bench-gpu (H100 / H200)
    python -m benchmarks.gpu_torch --device cpu --size tiny         # smoke: every code path on CPU

Random weights (default init) at the published architecture (`full` = SAM ViT-H + BEiT-3 large);
inputs are the real preprocessed sample image and prompts.  The workload is one forward of the
three parts for a batch of B (image, prompt) pairs: image encoder, BEiT-3 fusion, mask decoder.

Variants (each in every --dtypes):
* eager            the model as upstream runs it (the reference `inference` path on GPU is fp16)
* sdpa             image-encoder attention on F.scaled_dot_product_attention (benchmarks.sam_sdpa)
* sdpa+cudagraphs  the sdpa model captured once per batch size in a CUDA graph and replayed
* sdpa+compile     torch.compile (inductor, default mode) of the sdpa model
* sdpa+compile+cudagraphs  torch.compile mode="reduce-overhead" (inductor + CUDA graphs)
Every variant's masks are compared with eager's in the same dtype.  Results go to
benchmarks/results/<device>-<date>-gpu-<size>/ (the smoke run: build/bench/gpu_torch_smoke/).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from evfsam.processing import beit3_view, decode_image, sam_view
from evfsam.tokenization import pad_batch

from . import machine
from .samples import PROMPTS, SAMPLE_IMAGE
from .sam_sdpa import use_sdpa
from .stats import LatencyStats

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("eager", "sdpa", "sdpa+cudagraphs", "sdpa+compile", "sdpa+compile+cudagraphs")
CUDA_ONLY = ("sdpa+cudagraphs", "sdpa+compile+cudagraphs")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
Inputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # images, images_evf, ids, mask


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke run)")
    parser.add_argument("--size", choices=("tiny", "vit-b", "full"), default="full")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp16 bf16 (cpu: fp32 bf16)")
    parser.add_argument("--batches", type=int, nargs="+", help="default: 1 2 4 8 (cpu: 1 2)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--iters", type=int, help="timed iterations per point (default 20, cpu 2)")
    parser.add_argument("--warmup", type=int, help="untimed iterations per point (default 5, cpu 1)")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", help="square matmul sizes for the ceiling "
                        "(default 4096 8192 16384, cpu 1024)")
    parser.add_argument("--out", type=Path, help="results folder")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.dtypes = args.dtypes or (["fp32", "bf16"] if cpu else ["fp16", "bf16"])
    args.batches = args.batches or ([1, 2] if cpu else [1, 2, 4, 8])
    args.iters = args.iters or (2 if cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    args.matmul_sizes = args.matmul_sizes or ([1024] if cpu else [4096, 8192, 16384])
    return args


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], iters: int, warmup: int, device: str) -> List[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def matmul_tflops(n: int, dtype: torch.dtype, device: str, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_calls(lambda: a @ b, max(iters, 3), 2, device)
    return 2 * n**3 / float(np.median(seconds)) / 1e12


def matmul_ceiling(dtype: torch.dtype, sizes: Sequence[int], device: str, iters: int) -> Dict[str, float]:
    """Best TFLOP/s of a square matmul (2 n^3 flops) over `sizes`: what this device sustains on dense math."""
    measured = {n: matmul_tflops(n, dtype, device, iters) for n in sizes}
    best = max(measured, key=measured.get)
    return {"tflops": measured[best], "n": best}


def build_model(size: str, device: str, dtype: torch.dtype):
    from evfsam.modeling.builder import EvfSamConfig, build_evf_sam
    from export.tiny_checkpoint import SIZES

    config = EvfSamConfig.from_dict({"model_type": "evf", "out_dim": 256, **SIZES[size]})
    torch.manual_seed(0)
    model = build_evf_sam(config).eval()
    with torch.no_grad():  # nonzero relative positions, so that SDPA's bias path is really exercised
        for block in model.visual_model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.02)
            block.attn.rel_pos_w.normal_(std=0.02)
    model = model.to(device=device, dtype=dtype)
    fp32_positional_encoding(model)
    return model, config


class Fp32Output(torch.nn.Module):
    """Runs `inner` in float32 and casts its output to `dtype`."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner.float(), dtype

    def forward(self, *args):
        return self.inner(*args).to(self.dtype)


def fp32_positional_encoding(model) -> None:
    """segment-anything's PositionEmbeddingRandom multiplies a float32 grid by its buffer, which fails
    once the buffer is half precision (upstream EVF-SAM patches its copy of segment-anything the same
    way): keep that tiny layer in float32 and hand its output over in the model's dtype."""
    encoder = model.visual_model.prompt_encoder
    dtype = encoder.pe_layer.positional_encoding_gaussian_matrix.dtype
    if dtype != torch.float32:
        encoder.pe_layer = Fp32Output(encoder.pe_layer, dtype)


def byte_tokens(prompt: str, vocab_size: int) -> List[int]:
    """<s> prompt-bytes </s> as ids inside the vocabulary (no tokenizer file is needed)."""
    return [0, *(4 + b % (vocab_size - 4) for b in prompt.encode("utf-8")), 2]


def real_inputs(batch: int, device: str, dtype: torch.dtype, vocab_size: int) -> Inputs:
    """The sample photo through the server's preprocessing, repeated; prompts as token ids (a fixed
    byte-level mapping into the vocabulary: the token values do not change the amount of work)."""
    rgb = decode_image(SAMPLE_IMAGE.read_bytes())
    images = torch.from_numpy(sam_view(rgb)[0])[None].repeat(batch, 1, 1, 1)
    evf = torch.from_numpy(beit3_view(rgb))[None].repeat(batch, 1, 1, 1)
    ids, mask = pad_batch([byte_tokens(PROMPTS[i % len(PROMPTS)], vocab_size) for i in range(batch)])
    return (images.to(device, dtype), evf.to(device, dtype), torch.from_numpy(ids).to(device),
            torch.from_numpy(mask).to(device))


def encoder_flops(model, inputs: Inputs) -> int:
    """FLOPs (2 per multiply-add) of the image encoder for the images in `inputs`, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(inputs[0])
    return counter.get_total_flops()


def forward(model, images, images_evf, input_ids, attention_mask):
    """The three parts for a batch of (image, prompt) pairs -> (low-res mask logits, IoU)."""
    return prompt_and_decode(model, model.encode_image(images), images_evf, input_ids, attention_mask)


def prompt_and_decode(model, embeddings, images_evf, input_ids, attention_mask):
    return model.decode_masks(embeddings, model.encode_prompt(images_evf, input_ids, attention_mask))


class GraphedCall:
    """`fn(*inputs)` captured once in a CUDA graph; calling it replays the graph on the same buffers."""

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor], warmup: int = 2):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (cuBLAS handles, autotuning) off the capture stream
            for _ in range(warmup):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*inputs)

    def __call__(self):
        self.graph.replay()
        return self.outputs


def runners(variant: str, model, inputs: Inputs) -> Tuple[Callable, Callable]:
    """(full forward, image encoder alone) as argument-free calls on `inputs`."""
    if variant in ("eager", "sdpa"):
        return (lambda: forward(model, *inputs)), (lambda: model.encode_image(inputs[0]))
    if variant == "sdpa+cudagraphs":
        return GraphedCall(lambda *x: forward(model, *x), inputs), GraphedCall(model.encode_image, inputs[:1])
    torch._dynamo.reset()  # one batch size at a time: drops earlier graphs and their memory
    mode = "reduce-overhead" if variant.endswith("cudagraphs") else "default"
    encoder = torch.compile(model.encode_image, mode=mode, dynamic=False)
    rest = torch.compile(lambda *x: prompt_and_decode(model, *x), mode=mode, dynamic=False)
    return (lambda: rest(encoder(inputs[0]), *inputs[1:])), (lambda: encoder(inputs[0]))


@dataclass
class Point:
    dtype: str
    variant: str
    batch: int
    setup_s: float  # first call: compilation / capture included
    full: Dict[str, float]  # LatencyStats of one forward of the batch; throughput in images/s
    encoder: Dict[str, float]
    encoder_tflops: float
    max_abs_diff_vs_eager: float
    mask_agreement_vs_eager: float


def measure_point(variant: str, model, inputs: Inputs, reference: torch.Tensor, flops_per_image: int, args,
                  dtype_name: str) -> Point:
    batch = inputs[0].shape[0]
    start = time.perf_counter()
    full, encoder = runners(variant, model, inputs)
    low_res = full()[0].float().clone()
    synchronize(args.device)
    setup = time.perf_counter() - start
    full_stats = LatencyStats.from_seconds(time_calls(full, args.iters, args.warmup, args.device), batch)
    encoder_stats = LatencyStats.from_seconds(time_calls(encoder, args.iters, args.warmup, args.device), batch)
    return Point(
        dtype=dtype_name, variant=variant, batch=batch, setup_s=setup,
        full=full_stats.to_dict(), encoder=encoder_stats.to_dict(),
        encoder_tflops=flops_per_image * batch / (encoder_stats.p50_ms / 1000) / 1e12,
        max_abs_diff_vs_eager=float((low_res - reference).abs().max()),
        mask_agreement_vs_eager=float(((low_res > 0) == (reference > 0)).float().mean()),
    )


def wanted(variants: Sequence[str], device: str) -> Tuple[List[str], List[str]]:
    """(variants to run, notes on those skipped)."""
    run, skipped = [], []
    for variant in variants:
        if variant in CUDA_ONLY and not device.startswith("cuda"):
            skipped.append(f"{variant}: skipped on {device} (CUDA graphs need a CUDA device)")
        else:
            run.append(variant)
    return run, skipped


def eager_masks(model, batches: Sequence[int], dtype: torch.dtype, vocab_size: int, device: str) -> Dict[int, torch.Tensor]:
    """The unmodified model's low-res mask logits per batch size: what every variant must reproduce."""
    return {b: forward(model, *real_inputs(b, device, dtype, vocab_size))[0].float().clone() for b in batches}


def measure_dtype(dtype_name: str, args, variants: Sequence[str]) -> Tuple[List[Point], int]:
    """Every variant at every batch size in one dtype (eager before the attention is swapped)."""
    dtype = DTYPES[dtype_name]
    model, config = build_model(args.size, args.device, dtype)
    vocab = config.beit3.vocab_size
    flops = encoder_flops(model, real_inputs(1, args.device, dtype, vocab))
    references = eager_masks(model, args.batches, dtype, vocab, args.device)
    points = []
    for variant in sorted(variants, key=VARIANTS.index):
        if variant.startswith("sdpa") and not any(p.variant.startswith("sdpa") for p in points):
            use_sdpa(model.visual_model.image_encoder)
        for batch in args.batches:
            inputs = real_inputs(batch, args.device, dtype, vocab)
            point = measure_point(variant, model, inputs, references[batch], flops, args, dtype_name)
            points.append(point)
            print(f"  {dtype_name} {variant:<24} batch {batch}: {point.full['throughput']:.2f} img/s, encoder "
                  f"{point.encoder_tflops:.3g} TFLOP/s, max |d| vs eager {point.max_abs_diff_vs_eager:.2e}", flush=True)
            release(args.device)
    return points, flops


def release(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def reference_pipeline(args, dtype_name: str) -> Dict[str, object]:
    """(a) on this device: `TorchPipeline` end to end (decode, torch pre/post on the host) at batch 1."""
    from evfsam.pipeline import TorchPipeline

    model, config = build_model(args.size, args.device, DTYPES[dtype_name])
    pipeline = TorchPipeline(model, lambda p: byte_tokens(p, config.beit3.vocab_size), args.device, DTYPES[dtype_name])
    data = SAMPLE_IMAGE.read_bytes()
    seconds = time_calls(lambda: pipeline(decode_image(data), PROMPTS[0]), args.iters, args.warmup, args.device)
    return {"dtype": dtype_name, "stats": LatencyStats.from_seconds(seconds).to_dict()}


def device_info(device: str) -> Dict[str, object]:
    info = {"device": device, "torch": torch.__version__, "machine": machine.machine_info()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=info["machine"]["cpu_model"])
    return info


def run(args) -> Dict[str, object]:
    variants, skipped = wanted(args.variants, args.device)
    results: Dict[str, object] = {
        "date": datetime.date.today().isoformat(), "size": args.size, "device": device_info(args.device),
        "command": "python -m benchmarks.gpu_torch " + " ".join(sys.argv[1:]), "skipped": skipped,
        "settings": {"iters": args.iters, "warmup": args.warmup, "batches": args.batches, "dtypes": args.dtypes},
    }
    print(f"device: {results['device']['name']}", flush=True)
    results["matmul_ceiling"] = {d: matmul_ceiling(DTYPES[d], args.matmul_sizes, args.device, args.iters)
                                 for d in sorted(set(args.dtypes) | {"bf16"})}
    print(f"  matmul ceiling: {results['matmul_ceiling']}", flush=True)
    with torch.no_grad():
        results["reference_pipeline"] = reference_pipeline(args, args.dtypes[0])
        release(args.device)
        points = []
        for dtype_name in args.dtypes:
            dtype_points, results["encoder_flops_per_image"] = measure_dtype(dtype_name, args, variants)
            points += dtype_points
    results["points"] = [p.__dict__ for p in points]
    return results


def default_out(results: Dict[str, object], device: str) -> Path:
    if not device.startswith("cuda"):
        return Path("build") / "bench" / "gpu_torch_smoke"
    return RESULTS_DIR / f"{machine.slug({'gpu': results['device']['name']})}-{results['date']}-gpu-{results['size']}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} sees no CUDA device; run on a GPU machine with a CUDA build of "
              "torch (e.g. an NGC PyTorch container: make bench-gpu GPU_PY=python), or --device cpu --size tiny "
              "for a smoke run", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run(args)
    results["wall_seconds"] = time.perf_counter() - started
    out = args.out or default_out(results, args.device)
    from .gpu_report import write_report

    write_report(results, out)
    print(f"wrote {out}/summary.md ({results['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
