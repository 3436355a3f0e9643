"""`make gpu-check`: EVF-SAM's GPU paths in at most ten minutes on one H100 / H200.

    python -m benchmarks.gpu_check                                  # CUDA, full size (SAM ViT-H + BEiT-3 large)
    python -m benchmarks.gpu_check --device cpu --size tiny         # smoke run of every code path (tests)

Needs torch with CUDA, onnx and onnxruntime; no Docker, TensorRT, onnxruntime-gpu or network.  What
it runs, in this order, each step only while the time budget allows it (`--budget-s`, default 520 s;
an alarm HARD_MARGIN_S = 45 s later writes whatever was measured and stops, so that with the imports
the check stays under ten minutes):

1. ceilings measured in this run: square bf16 and fp16 matmuls on random data, a device-to-device copy;
2. per model family (benchmarks/model_families.py: EVF-SAM, and EVF-SAM2 when the checkout has it,
   skipped with the reason otherwise), random weights at the size preset:
   * the image encoder's FLOPs per image (torch.utils.flop_counter, on the eager model);
   * FP32 reference mask logits (TF32 off) for `--reference-batch` (image, prompt) pairs;
   * per dtype (bf16, fp16) and variant (benchmarks/gpu_torch.py: upstream-style eager, SDPA, SDPA +
     CUDA graphs; then SDPA + torch.compile in the first dtype, last because each compilation takes
     minutes), a batch sweep: full forward and image encoder medians (CUDA events), the encoder's
     TFLOP/s against the bf16 matmul, mask IoU and logit error against FP32; a sweep stops at the
     first batch size whose predicted time does not fit in the budget;
   * which SDPA kernel each attention site ran (profiler), and a one-block attention comparison of
     segment-anything's attention, SDPA with a dense bias and SDPA with the position term folded in;
3. the ONNX graphs on onnxruntime's CUDA / TensorRT execution providers, where onnxruntime has them
   (skipped with the reason otherwise).

Writes benchmarks/results/<gpu>-<date>-gpu-check/ (summary.md with device, date, git commit and
versions; results.json; plots/).  The CPU smoke run writes build/bench/gpu_check_smoke/ unless --out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.metadata
import importlib.util
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import gpu_torch as gt
from . import machine
from .beit3_sdpa import set_key_padding
from .model_families import FAMILIES, FAMILIES_BY_NAME, ModelFamily, forward, image_outputs
from .sam_sdpa import BiasSdpaAttention, SdpaAttention, attention_grid
from .samples import PROMPTS, SAMPLE_IMAGE

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
SMOKE_DIR = REPO_ROOT / "build" / "bench" / "gpu_check_smoke"
DEFAULT_BUDGET_S = {"cuda": 520.0, "cpu": 50.0}
HARD_MARGIN_S = 45  # the alarm goes off this long after the budget: 565 s, with imports < 600 s by default
REPORT_RESERVE_S = 5.0  # kept back for writing the report (plots: ~2 s)
COMPILE_ESTIMATE_S = {"full": 120.0, "vit-b": 60.0, "tiny": 30.0}  # first compile; later ones are measured
ORT_EXPORT_ESTIMATE_S = {"full": 300.0, "vit-b": 60.0, "tiny": 5.0}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
VERSION_PACKAGES = ("torch", "triton", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "segment-anything")


class OutOfTime(Exception):
    """The hard time limit went off."""


@dataclass
class Budget:
    seconds: float
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return self.remaining() - REPORT_RESERVE_S >= estimate_s


class Log:
    def __init__(self, budget: Budget):
        self.budget = budget

    def __call__(self, message: str) -> None:
        print(f"[{self.budget.elapsed():6.1f} s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (smoke run)")
    parser.add_argument("--size", choices=("tiny", "vit-b", "full"), help="default: full (cpu: tiny)")
    parser.add_argument("--families", nargs="+", choices=[f.name for f in FAMILIES], default=[f.name for f in FAMILIES])
    parser.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16"), help="default: bf16 fp16 (cpu: bf16)")
    parser.add_argument("--variants", nargs="+", choices=gt.VARIANTS, help="default: all (cpu: eager sdpa)")
    parser.add_argument("--batches", type=int, nargs="+", help="sweep, ascending (default 1 2 4 8 16; cpu 1 2)")
    parser.add_argument("--compile-batches", type=int, nargs="*", help="batch sizes torch.compile is measured "
                        "at, each a compilation (default 1 8)")
    parser.add_argument("--compile-dtypes", nargs="*", choices=("bf16", "fp16"),
                        help="dtypes torch.compile is measured in, after every other variant (default: the first dtype)")
    parser.add_argument("--reference-batch", type=int, help="pairs compared with FP32 (default 4; cpu 2)")
    parser.add_argument("--iters", type=int, help="timed calls per point (default 10; cpu 2)")
    parser.add_argument("--warmup", type=int, help="untimed calls per point (default 3; cpu 1)")
    parser.add_argument("--matmul-n", type=int, help="square matmul size of the ceiling (default 8192; cpu 256)")
    parser.add_argument("--copy-mib", type=int, help="device-to-device copy size (default 2048; cpu 64)")
    parser.add_argument("--ort-providers", nargs="*", default=list(GPU_PROVIDERS),
                        help="onnxruntime execution providers to time the ONNX graphs on (when available)")
    parser.add_argument("--budget-s", type=float, help="seconds of work (default 520; cpu 50); an alarm "
                        f"{HARD_MARGIN_S} s later stops whatever runs and writes the report")
    parser.add_argument("--git-commit", help="the commit measured, where the checkout has no .git")
    parser.add_argument("--out", type=Path, help="results folder")
    args = parser.parse_args(argv)
    cpu = not gt.is_cuda(args.device)
    args.size = args.size or ("tiny" if cpu else "full")
    args.dtypes = args.dtypes or (["bf16"] if cpu else ["bf16", "fp16"])
    args.variants = args.variants or (["eager", "sdpa"] if cpu else list(gt.VARIANTS))
    args.batches = sorted(args.batches or ([1, 2] if cpu else [1, 2, 4, 8, 16]))
    args.compile_batches = args.compile_batches if args.compile_batches is not None else [1, 8]
    args.compile_dtypes = args.compile_dtypes if args.compile_dtypes is not None else args.dtypes[:1]
    args.reference_batch = args.reference_batch or (2 if cpu else 4)
    args.iters = args.iters or (2 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    args.matmul_n = args.matmul_n or (256 if cpu else 8192)
    args.copy_mib = args.copy_mib or (64 if cpu else 2048)
    args.budget_s = args.budget_s or DEFAULT_BUDGET_S["cpu" if cpu else "cuda"]
    return args


# ---------------------------------------------------------------------------------------------------
# what the numbers were measured on


def git_commit(given: Optional[str]) -> str:
    if given:
        return given
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    if head.returncode != 0:
        return "unknown (no .git here: pass --git-commit)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        found.update(cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()))
    driver = nvidia_smi(["driver_version"])
    if driver:
        found["nvidia_driver"] = driver["driver_version"]
    return found


def nvidia_smi(fields: Sequence[str]) -> Optional[Dict[str, str]]:
    """Read-only query of GPU 0 (never a setting)."""
    if not shutil.which("nvidia-smi"):
        return None
    result = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader", "--id=0"],
                            capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        return None
    return dict(zip(fields, (v.strip() for v in result.stdout.strip().split(","))))


def clocks() -> Optional[Dict[str, str]]:
    return nvidia_smi(["clocks.sm", "clocks.mem", "clocks.max.sm", "temperature.gpu", "power.draw", "pstate"])


# ---------------------------------------------------------------------------------------------------
# measurements


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        self.budget = Budget(args.budget_s)
        self.log = Log(self.budget)
        self.image = SAMPLE_IMAGE.read_bytes()
        self.references: Dict[str, torch.Tensor] = {}  # family -> FP32 mask logits of the reference batch
        self.results: Dict[str, object] = {
            "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
            "git_commit": git_commit(args.git_commit),
            "versions": versions(),
            "device": gt.device_description(self.device),
            "host": machine.machine_info(),
            "clocks_before": clocks(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "skipped": [],
            "families": {},
            "stopped_early": None,
        }

    def skip(self, what: str, reason: str) -> None:
        self.results["skipped"].append(f"{what}: {reason}")
        self.log(f"skipped {what}: {reason}")

    def run(self) -> Dict[str, object]:
        args = self.args
        self.log(f"device {self.results['device'].get('name', self.device)}, budget {args.budget_s:.0f} s")
        try:
            with torch.no_grad():
                self.results["ceilings"] = self.ceilings()
                compile_later = [job for name in args.families for job in self.family(FAMILIES_BY_NAME[name])]
                # torch.compile last: a compilation costs minutes at full size, every other point seconds
                for family, model, dtype_name, vocab in compile_later:
                    record = self.results["families"][family.name]
                    self.variant(family, model, "sdpa+compile", dtype_name, vocab, record, record["dtypes"][dtype_name])
                compile_later.clear()
                gt.release(self.device)
                self.onnx_runtime()
        except OutOfTime:
            self.results["stopped_early"] = f"hard time limit of {hard_limit(self.args.budget_s)} s reached"
            self.log(self.results["stopped_early"])
        self.results["clocks_after"] = clocks()
        self.results["wall_seconds"] = round(self.budget.elapsed(), 1)
        return self.results

    def ceilings(self) -> Dict[str, object]:
        args = self.args
        found = {f"{name}_matmul": gt.matmul_tflops(args.matmul_n, gt.DTYPES[name], self.device)
                 for name in ("bf16", "fp16")}
        found["copy"] = gt.copy_bandwidth(args.copy_mib * 2**20, self.device)
        self.log(f"ceilings: bf16 matmul {found['bf16_matmul']['tflops']:.1f} TFLOP/s, fp16 "
                 f"{found['fp16_matmul']['tflops']:.1f}, copy {found['copy']['gb_per_s']:.0f} GB/s")
        return found

    # --- one family ---------------------------------------------------------------------------------

    def family(self, family: ModelFamily) -> List[tuple]:
        """Measure every variant but torch.compile; returns the (family, model, dtype, vocab) jobs
        torch.compile is measured with at the end."""
        reason = family.unavailable()
        if reason:
            self.skip(family.name, reason)
            return []
        record: Dict[str, object] = {"size": self.args.size, "dtypes": {}, "errors": []}
        self.results["families"][family.name] = record
        try:
            return self.measure_family(family, record)
        except OutOfTime:
            raise
        except Exception as exc:  # a family that fails must not cost the others their turn
            self.failed(record, family.name, exc)
            return []

    def failed(self, record: Dict, what: str, exc: Exception) -> None:
        message = f"{what}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:400]}"
        record["errors"].append(message)
        traceback.print_exc()
        self.log(f"FAILED {message}")
        gt.release(self.device)

    def measure_family(self, family: ModelFamily, record: Dict) -> List[tuple]:
        started = time.perf_counter()
        model32, vocab = family.build(self.args.size, self.device)
        record["build_seconds"] = round(time.perf_counter() - started, 1)
        record["parameters"] = sum(p.numel() for p in model32.parameters())
        batch1 = self.inputs(1, torch.float32, vocab)
        record["encoder_flops_per_image"] = gt.encoder_flops(model32, batch1.tensors[0])
        reference = self.inputs(self.args.reference_batch, torch.float32, vocab)
        with tf32(False):
            self.references[family.name] = gt.first_output(forward(model32, *reference.tensors))
        self.log(f"{family.name} {self.args.size}: {record['parameters'] / 1e6:.0f} M parameters, built in "
                 f"{record['build_seconds']} s; encoder {record['encoder_flops_per_image'] / 1e12:.3f} TFLOP per image")
        compile_later = []
        for dtype_name in self.args.dtypes:
            if not self.budget.allows(record["build_seconds"] / 4):
                self.skip(f"{family.name} {dtype_name}", "time budget spent")
                continue
            record["dtypes"][dtype_name], model = self.dtype(family, model32, dtype_name, vocab, record)
            if "sdpa+compile" not in self.args.variants:
                continue
            if dtype_name in self.args.compile_dtypes:
                compile_later.append((family, model, dtype_name, vocab))
            else:
                self.skip(f"{family.name} {dtype_name} sdpa+compile", f"compiled in {self.args.compile_dtypes} only "
                          "(--compile-dtypes): each compilation takes minutes")
        del model32
        gt.release(self.device)
        return compile_later

    def dtype(self, family: ModelFamily, model32, dtype_name: str, vocab: int, record: Dict):
        """Every variant but torch.compile in one dtype; returns (results, the fast-path model)."""
        dtype = gt.DTYPES[dtype_name]
        model = gt.cast_model(copy.deepcopy(model32), dtype)
        out: Dict[str, object] = {"points": [], "kernels": {}, "attention_blocks": None, "fast_attention": []}
        for variant in [v for v in gt.VARIANTS if v in self.args.variants and v != "sdpa+compile"]:
            self.variant(family, model, variant, dtype_name, vocab, record, out, model32)
        if not out["fast_attention"]:
            out["fast_attention"] = family.fast_attention(model)
        return out, model

    def variant(self, family: ModelFamily, model, variant: str, dtype_name: str, vocab: int, record: Dict,
                out: Dict, model32=None) -> None:
        dtype = gt.DTYPES[dtype_name]
        if variant in gt.CUDA_ONLY + ("sdpa+compile",) and not gt.is_cuda(self.device):
            self.skip(f"{family.name} {dtype_name} {variant}", f"measured on CUDA only, not on {self.device}")
            return
        try:
            if variant == "eager":
                out["kernels"]["eager"] = self.kernels(model, dtype, vocab, autocast=True)
            elif not out["fast_attention"]:
                out["attention_blocks"] = self.attention_blocks(model, model32, dtype)
                out["fast_attention"] = family.fast_attention(model)
                out["kernels"]["fast"] = self.kernels(model, dtype, vocab, autocast=family.fast_autocast)
            self.sweep(family, model, variant, dtype_name, vocab, record, out)
        except OutOfTime:
            raise
        except Exception as exc:  # the next variant still runs
            self.failed(record, f"{family.name} {dtype_name} {variant}", exc)

    def sweep(self, family: ModelFamily, model, variant: str, dtype_name: str, vocab: int, record: Dict,
              out: Dict) -> None:
        dtype = gt.DTYPES[dtype_name]
        batches = self.args.compile_batches if variant == "sdpa+compile" else self.args.batches
        previous = None
        for batch in batches:
            estimate = self.estimate(variant, batch, previous)
            if not self.budget.allows(estimate):
                self.skip(f"{family.name} {dtype_name} {variant} batch {batch}+",
                          f"predicted {estimate:.0f} s, {self.budget.remaining():.0f} s of budget left")
                return
            inputs = self.inputs(batch, dtype, vocab)
            set_key_padding(model, inputs.padded)
            point = self.point(model, variant, inputs, dtype, record["encoder_flops_per_image"], family.fast_autocast,
                               self.references[family.name])
            out["points"].append(point)
            previous = point
            agreement = point.get("vs_fp32")
            self.log(f"{family.name} {dtype_name} {variant:<16} batch {batch:>2}: {point['full']['per_second']:8.2f} "
                     f"pairs/s, encoder {point['encoder_tflops']:.3g} TFLOP/s"
                     + (f", mask IoU vs fp32 min {agreement['iou_min']:.4f}" if agreement else "")
                     + f" (setup {point['setup_s']:.1f} s)")
            gt.release(self.device)

    def estimate(self, variant: str, batch: int, previous: Optional[Dict]) -> float:
        """Seconds the next point should take: the last point's timing calls scaled by batch, plus
        the setup (a compilation costs what the last one did, or COMPILE_ESTIMATE_S at first)."""
        calls = 2 * (self.args.iters + self.args.warmup) + 2
        if previous is None:
            setup = COMPILE_ESTIMATE_S[self.args.size] if variant == "sdpa+compile" else 5.0
            return setup
        per_call = previous["full"]["p50_ms"] / 1000 * batch / previous["batch"]
        setup = previous["setup_s"] * (1.0 if variant == "sdpa+compile" else batch / previous["batch"])
        return setup + calls * per_call

    def point(self, model, variant: str, inputs: gt.Batch, dtype: torch.dtype, flops_per_image: int,
              fast_autocast: bool, reference: torch.Tensor) -> Dict:
        batch = inputs.tensors[0].shape[0]
        gt.reset_peak_memory(self.device)
        started = time.perf_counter()
        full, encoder = gt.runners(variant, model, inputs, dtype, self.device, fast_autocast)
        logits = gt.first_output(full())
        gt.synchronize(self.device)
        setup = time.perf_counter() - started
        full_stats = gt.summarize(gt.time_calls(full, self.args.iters, self.args.warmup, self.device), batch)
        encoder_stats = gt.summarize(gt.time_calls(encoder, self.args.iters, self.args.warmup, self.device), batch)
        point = {"variant": variant, "batch": batch, "setup_s": round(setup, 2), "full": full_stats,
                 "encoder": encoder_stats, "padded_prompts": inputs.padded,
                 "encoder_tflops": flops_per_image * batch / (encoder_stats["p50_ms"] / 1000) / 1e12,
                 "peak_memory_gib": gt.peak_memory_gib(self.device)}
        if batch == self.args.reference_batch:
            point["vs_fp32"] = gt.mask_agreement(logits, reference)
        return point

    def kernels(self, model, dtype: torch.dtype, vocab: int, autocast: bool = False) -> Dict[str, List[str]]:
        """The SDPA kernels each attention site runs ([] = no SDPA call: explicit matmul + softmax)."""
        padded = self.inputs(2, dtype, vocab)
        unpadded = self.unpadded_inputs(2, dtype, vocab)
        context_dtype = dtype if autocast else torch.float32  # float32: no autocast

        def run(fn):
            def call():
                with gt.autocast(self.device, context_dtype):
                    return fn()
            return gt.sdpa_kernels(call)

        set_key_padding(model, True)
        sites = {"image encoder": run(lambda: image_outputs(model, padded.tensors[0])),
                 "BEiT-3, padded prompts": run(lambda: model.encode_prompt(*padded.tensors[1:]))}
        set_key_padding(model, False)
        sites["BEiT-3, no padding"] = run(lambda: model.encode_prompt(*unpadded.tensors[1:]))
        return sites

    def attention_blocks(self, model, model32, dtype: torch.dtype) -> Optional[List[Dict]]:
        """One global and one windowed attention block of a SAM ViT encoder, batch 1: segment-anything's
        module (under autocast, as upstream), SDPA with a dense bias, SDPA with the position term
        folded into q.k; each against the FP32 module on the same input."""
        encoder = getattr(model.visual_model, "image_encoder", None)
        if encoder is None or not hasattr(encoder, "blocks") or not hasattr(encoder.blocks[0].attn, "rel_pos_h"):
            return None
        tokens_per_side = encoder.img_size // encoder.patch_embed.proj.stride[0]
        rows = []
        for kind in ("global", "window"):
            index = next((i for i, b in enumerate(encoder.blocks) if (b.window_size == 0) == (kind == "global")), None)
            if index is None or not self.budget.allows(10):
                continue
            block, block32 = encoder.blocks[index], model32.visual_model.image_encoder.blocks[index]
            grid = attention_grid(encoder, block)
            windows = 1 if kind == "global" else (-(-tokens_per_side // grid[0])) ** 2
            x = torch.randn(windows, *grid, block.attn.qkv.in_features, device=self.device)
            with tf32(False):
                reference = block32.attn(x)
            implementations = (("segment-anything", block.attn, dtype),
                               ("sdpa, dense bias", BiasSdpaAttention(block.attn, grid), torch.float32),
                               ("sdpa, folded", SdpaAttention(block.attn, grid), torch.float32))
            for name, module, context_dtype in implementations:
                def call(module=module, context_dtype=context_dtype):
                    with gt.autocast(self.device, context_dtype):
                        return module(x.to(dtype))
                out = call()
                stats = gt.summarize(gt.time_calls(call, self.args.iters, self.args.warmup, self.device))
                rows.append({"block": kind, "grid": list(grid), "windows": windows, "implementation": name,
                             "p50_ms": stats["p50_ms"], "kernels": gt.sdpa_kernels(call),
                             "max_rel_error_vs_fp32": float((out.float() - reference).abs().max() / reference.abs().max())})
        return rows

    # --- ONNX Runtime on GPU execution providers ---------------------------------------------------

    def onnx_runtime(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            self.skip("ONNX graphs on onnxruntime", "onnxruntime is not importable")
            return
        available = ort.get_available_providers()
        wanted = [p for p in self.args.ort_providers if p in available]
        for provider in self.args.ort_providers:
            if provider not in available:
                self.skip(f"ONNX graphs on {provider}", f"onnxruntime {ort.__version__} here offers {available} "
                          "(the GPU providers come with onnxruntime-gpu)")
        if "TensorrtExecutionProvider" not in available and importlib.util.find_spec("tensorrt") is not None:
            self.skip("TensorRT engines", "tensorrt is importable but onnxruntime has no TensorRT provider; "
                      "engines are built and accuracy-gated by python -m export.tensorrt_build (minutes per "
                      "graph at full size: outside this check)")
        if not wanted:
            return
        if "evf-sam" not in self.results["families"]:
            self.skip("ONNX graphs", "the evf-sam family did not run (its graphs are the ones evfsam/specs.py exports)")
            return
        if not self.budget.allows(ORT_EXPORT_ESTIMATE_S[self.args.size]):
            self.skip("ONNX graphs", f"export needs ~{ORT_EXPORT_ESTIMATE_S[self.args.size]:.0f} s, "
                      f"{self.budget.remaining():.0f} s left")
            return
        self.results["onnx_runtime"] = self.onnx_graphs(ort, wanted)

    def onnx_graphs(self, ort, providers: List[str]) -> Dict[str, object]:
        from evfsam.recipes import default_recipe
        from evfsam.specs import BATCH, family as family_spec
        from export.onnx_export import export_graph

        family = FAMILIES_BY_NAME["evf-sam"]
        graphs = family_spec(family.family).graphs
        model, vocab = family.build(self.args.size, "cpu")
        rows: List[Dict] = []
        with tempfile.TemporaryDirectory() as tmp:
            recipe = default_recipe(family.family, multitask=False)
            paths = {spec.name: export_graph(model, spec, Path(tmp), vocab_size=vocab, recipe=recipe) for spec in graphs}
            del model
            self.log(f"exported {len(paths)} ONNX graphs")
            for spec in graphs:
                feeds = spec.sample_inputs(np.random.default_rng(0), {BATCH: 1}, vocab)
                reference = None
                for provider in providers:
                    if not self.budget.allows(20):
                        self.skip(f"ONNX {spec.name} on {provider}", "time budget spent")
                        continue
                    options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                               "trt_engine_cache_path": tmp} if provider == "TensorrtExecutionProvider" else {}
                    session = ort.InferenceSession(str(paths[spec.name]), providers=[(provider, options)])
                    started = time.perf_counter()
                    outputs = session.run(None, feeds)
                    setup = time.perf_counter() - started
                    seconds = []
                    for _ in range(self.args.iters):
                        started = time.perf_counter()
                        session.run(None, feeds)
                        seconds.append(time.perf_counter() - started)
                    reference = reference if reference is not None else outputs[0]
                    error = float(np.abs(outputs[0] - reference).max() / max(np.abs(reference).max(), 1e-12))
                    rows.append({"graph": spec.name, "provider": provider, "first_run_s": round(setup, 2),
                                 **gt.summarize(seconds), "max_rel_vs_first_provider": error})
                    self.log(f"ONNX {spec.name} on {provider}: p50 {rows[-1]['p50_ms']:.2f} ms")
        return {"batch": 1, "rows": rows, "note": "host-to-host latency of session.run (inputs and outputs in "
                "host memory); the first provider's output is the reference of the others"}

    # --- inputs -------------------------------------------------------------------------------------

    def inputs(self, batch: int, dtype: torch.dtype, vocab: int) -> gt.Batch:
        return gt.real_inputs(self.image, PROMPTS, batch, self.device, dtype, vocab)

    def unpadded_inputs(self, batch: int, dtype: torch.dtype, vocab: int) -> gt.Batch:
        """Every prompt exactly one text bucket long: no padding anywhere."""
        from evfsam.specs import TEXT_BUCKET

        tokens = gt.byte_tokens(PROMPTS[0] * TEXT_BUCKET, vocab)[: TEXT_BUCKET - 1] + [2]
        padded = self.inputs(batch, dtype, vocab).tensors
        ids = torch.tensor([tokens] * batch, device=padded[2].device)
        return gt.Batch((padded[0], padded[1], ids, torch.ones_like(ids)), padded=False)


class tf32:
    """TF32 matmuls and convolutions on or off inside the block (the FP32 reference is plain FP32)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# ---------------------------------------------------------------------------------------------------


def default_out(results: Dict[str, object], device: str) -> Path:
    if not gt.is_cuda(device):
        return SMOKE_DIR
    return RESULTS_DIR / f"{machine.slug({'gpu': results['device']['name']})}-{results['date']}-gpu-check"


def hard_limit(budget_s: float) -> int:
    return int(budget_s + HARD_MARGIN_S)


def _alarm(signum, frame):
    raise OutOfTime()


def main(argv=None) -> int:
    args = parse_args(argv)
    if gt.is_cuda(args.device) and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} sees no CUDA device; run on a GPU machine with a CUDA build of "
              "torch, or --device cpu for the smoke run", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(hard_limit(args.budget_s))
    try:
        check = Check(args)
        results = check.run()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = args.out or default_out(results, args.device)
    from .gpu_report import write_report

    write_report(results, out)
    check.log(f"wrote {out}/summary.md ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
