"""EVF-SAM's PyTorch paths on a device: the pieces `benchmarks.gpu_check` times and checks.

Timing follows the method of a lent GPU: warm-up calls first (module load, cuBLAS handles, autotuning
and compilation stay out), then each call timed with CUDA events recorded on the stream around it
(`perf_counter` on CPU), median and spread of many calls.  Ceilings are measured in the same run: a
square bf16 / fp16 matmul on random data (never zeros, which run faster) and a device-to-device copy.

Variants of one model in one dtype (`runners`):
* `eager`       upstream's way: the model cast to the dtype, run under autocast of that dtype
                (upstream's inference.py enters fp16 autocast for the whole run; it also does so for
                bf16, which would compute matmuls in fp16: here bf16 runs under bf16 autocast)
* `sdpa`        the fast attention of the family (benchmarks/sam_sdpa.py, benchmarks/beit3_sdpa.py),
                no autocast (the weights are already in the dtype) unless the family needs it
* `sdpa+cudagraphs`  the sdpa model captured once per batch size in a CUDA graph and replayed
* `sdpa+compile`     torch.compile (inductor, default mode) of the sdpa model, per batch size
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from evfsam.processing import beit3_view, decode_image, sam_view
from evfsam.tokenization import pad_batch

from .model_families import decode, forward, image_outputs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("eager", "sdpa", "sdpa+cudagraphs", "sdpa+compile")
CUDA_ONLY = ("sdpa+cudagraphs",)
Inputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # images, images_evf, ids, mask
SDPA_BACKENDS = (  # aten op name fragment -> kernel family, most specific first
    ("cudnn_attention", "cudnn"),
    ("efficient_attention", "mem-efficient"),
    ("flash_attention_for_cpu", "flash (CPU)"),
    ("flash_attention", "flash"),
    ("attention_math", "math"),
)


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def synchronize(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], iters: int, warmup: int, device: str) -> List[float]:
    """Seconds per call of `iters` calls after `warmup` untimed ones: CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if not is_cuda(device):
        seconds = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return seconds
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1000 for start, end in events]


def summarize(seconds: Sequence[float], items: int = 1) -> Dict[str, float]:
    """Median, spread (p10..p90) and items per second of the median."""
    ms = np.asarray(seconds) * 1000
    p10, p50, p90 = np.percentile(ms, (10, 50, 90))
    return {"count": len(ms), "p50_ms": float(p50), "p10_ms": float(p10), "p90_ms": float(p90),
            "min_ms": float(ms.min()), "per_second": float(items * 1000 / p50)}


def matmul_tflops(n: int, dtype: torch.dtype, device: str, iters: int = 10) -> Dict[str, float]:
    """A square matmul (2 n^3 flops) on random data, median over `iters` after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = summarize(time_calls(lambda: a @ b, iters, 3, device))
    return {"n": n, "tflops": 2 * n**3 / (stats["p50_ms"] / 1000) / 1e12, "p50_ms": stats["p50_ms"]}


def copy_bandwidth(nbytes: int, device: str, iters: int = 10) -> Dict[str, float]:
    """Device-to-device copy, counting bytes read plus bytes written."""
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    stats = summarize(time_calls(lambda: target.copy_(source), iters, 3, device))
    return {"bytes": nbytes, "gb_per_s": 2 * nbytes / (stats["p50_ms"] / 1000) / 1e9, "p50_ms": stats["p50_ms"]}


class Fp32Output(nn.Module):
    """Runs `inner` in float32 and casts its output to `dtype`."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner.float(), dtype

    def forward(self, *args):
        return self.inner(*args).to(self.dtype)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` in `dtype`, its random-Fourier positional encodings kept float32: segment-anything's
    multiplies a float32 grid by its buffer, which fails once the buffer is half (upstream EVF-SAM
    patches its copy of segment-anything the same way)."""
    model = model.to(dtype)
    if dtype == torch.float32:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "PositionEmbeddingRandom":
                setattr(parent, name, Fp32Output(child, dtype))
    return model


def byte_tokens(prompt: str, vocab_size: int) -> List[int]:
    """<s> prompt-bytes </s> as ids inside the vocabulary (no tokenizer file is needed; the token
    values do not change the amount of work)."""
    return [0, *(4 + b % (vocab_size - 4) for b in prompt.encode("utf-8")), 2]


@dataclass
class Batch:
    tensors: Inputs
    padded: bool  # some prompt of the batch is padded: known on the host, from the token ids


def real_inputs(image: bytes, prompts: Sequence[str], batch: int, device: str, dtype: torch.dtype,
                vocab_size: int) -> Batch:
    """`batch` (image, prompt) pairs: the image through the server's preprocessing, repeated, and the
    prompts cycled, right-padded as the server pads them."""
    rgb = decode_image(image)
    images = torch.from_numpy(sam_view(rgb)[0])[None].repeat(batch, 1, 1, 1)
    evf = torch.from_numpy(beit3_view(rgb))[None].repeat(batch, 1, 1, 1)
    ids, mask = pad_batch([byte_tokens(prompts[i % len(prompts)], vocab_size) for i in range(batch)])
    tensors = (images.to(device, dtype), evf.to(device, dtype), torch.from_numpy(ids).to(device),
               torch.from_numpy(mask).to(device))
    return Batch(tensors, bool((mask == 0).any()))


def encoder_flops(model: nn.Module, images: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of the image encoder, counted by torch.utils.flop_counter on the
    model as given (count it on the eager model: the fast attention does padded, wider matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        image_outputs(model, images)
    return counter.get_total_flops()


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


def autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if is_cuda(device) else "cpu", dtype=dtype)


def runners(variant: str, model: nn.Module, batch: Batch, dtype: torch.dtype, device: str,
            fast_autocast: bool = False) -> Tuple[Callable, Callable]:
    """(full forward, image encoder alone) as argument-free calls on `batch`; the fast variants run
    under autocast only with `fast_autocast`."""
    inputs = batch.tensors
    full_forward, encode, rest = (lambda *x: forward(model, *x)), (lambda x: image_outputs(model, x)), \
        (lambda encoded, *x: decode(model, encoded, *x))
    if variant == "eager" or fast_autocast:  # plain functions otherwise: nothing for capture or dynamo to trace
        full_forward, encode, rest = (under_autocast(fn, device, dtype) for fn in (full_forward, encode, rest))
    if variant in ("eager", "sdpa"):
        return (lambda: full_forward(*inputs)), (lambda: encode(inputs[0]))
    if variant == "sdpa+cudagraphs":
        return GraphedCall(full_forward, inputs), GraphedCall(encode, inputs[:1])
    if variant == "sdpa+compile":
        torch._dynamo.reset()  # one batch size at a time: drops earlier graphs and their memory
        compiled_encode = torch.compile(encode, dynamic=False)
        compiled_rest = torch.compile(rest, dynamic=False)
        return (lambda: compiled_rest(compiled_encode(inputs[0]), *inputs[1:])), (lambda: compiled_encode(inputs[0]))
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


def under_autocast(fn: Callable, device: str, dtype: torch.dtype) -> Callable:
    def wrapped(*args):
        with autocast(device, dtype):
            return fn(*args)
    return wrapped


def sdpa_kernels(fn: Callable[[], object]) -> List[str]:
    """The SDPA kernels one call of `fn` ran, read from the profiler's aten op names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {event.name for event in prof.events()}
    found = []
    for name in sorted(names):
        for fragment, backend in SDPA_BACKENDS:
            if fragment in name:
                found.append(backend)
                break
    return sorted(set(found))


def mask_agreement(logits: torch.Tensor, reference: torch.Tensor) -> Dict[str, float]:
    """Per-pair IoU of the thresholded low-res masks (min and mean over the batch) and the max
    |logit difference| relative to max |reference logit|."""
    ours, ref = logits.float() > 0, reference.float() > 0
    dims = tuple(range(1, ours.dim()))
    union = (ours | ref).sum(dim=dims).float()
    iou = torch.where(union > 0, (ours & ref).sum(dim=dims).float() / union.clamp(min=1), torch.ones_like(union))
    scale = reference.float().abs().max().clamp(min=1e-12)
    return {"iou_min": float(iou.min()), "iou_mean": float(iou.mean()),
            "max_rel_logit_error": float((logits.float() - reference.float()).abs().max() / scale),
            "finite": bool(torch.isfinite(logits).all())}


def first_output(result) -> torch.Tensor:
    """The low-res mask logits of a forward's (logits, IoU) result, copied out of graph buffers."""
    return result[0].detach().float().clone()


def release(device: str) -> None:
    if is_cuda(device):
        torch.cuda.empty_cache()


def device_description(device: str) -> Dict[str, object]:
    info: Dict[str, object] = {"device": device, "torch": torch.__version__}
    if is_cuda(device):
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count)
    return info


def reset_peak_memory(device: str) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> Optional[float]:
    """Peak memory allocated by torch since the last `reset_peak_memory`."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if is_cuda(device) else None
