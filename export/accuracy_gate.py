"""The accuracy gate of an engine build: an engine's outputs against ONNX Runtime FP32 on real inputs.

Inputs are made as the server makes them: every image shipped in `assets/` through the numpy
preprocessing of `evfsam/processing.py`, the sample prompts (`benchmarks/samples.py`) through the
exported `tokenizer.json` and `pad_batch`.  Each image is one case with all the prompts (a batch of
prompts of different lengths: right padding inside the batch) and one case with a single prompt padded
to the longest text the profiles allow (the padded-prompt case of the BEiT-3 graph).  The graphs are
fed generically from their `GraphSpec`s: an input is either a preprocessed tensor (by name), the
reference output of another graph of the set (by name: ONNX Runtime's, so each graph's engine is
judged on its own error), or, for a name neither provides, the spec's random sample (reported as
synthetic).  Rows are broadcast the way the pipeline pairs them: a one-row tensor (one image) is
repeated to the batch of the other inputs on the same axis (its prompts).

Checks per output (`check_engine`): finite where the reference is, max |engine - reference| relative
to max |reference| (the scale-free error of `export.precision`), and for mask logits the IoU of the
thresholded masks (logit > 0, upstream's threshold).  Tolerances (`TOLERANCES`) are FP16 expectations:

* FP16 stores 11 significant bits (unit roundoff 2^-11 = 4.9e-4).  With FP16 storage between layers
  emulated on ONNX Runtime, full-size random weights gave max relative errors of 1.3e-3 (SAM ViT-H
  encoder), 1.5e-3 (BEiT-3 large), 2.1e-3 / 1.0e-4 (decoder masks / IoU), docker/README.md.  Real FP16
  kernels also round inside fused layers, so the gate allows 1e-2: about 5x the emulated error, 20
  FP16 roundoffs.  The failures it exists for are orders of magnitude larger: the unprotected SAM
  neck overflow measured 0.93; a broken fused attention kernel gives O(1) (NVIDIA/TensorRT#4837).
  An FP32 engine stays near 1e-5.
* Mask IoU >= 0.98: a pixel flips only where |logit| is below the engine's error, a thin band on the
  mask boundary; with the 1e-2 relative bound on the logits that band is a small part of the
  boundary's pixels.  A wrong engine moves whole regions.
* `iou_predictions` is a score in [0, 1]: its relative error is an absolute one; same 1e-2.

The gate takes any "engine runner" (a callable from {input name: array} to {output name: array}):
the TensorRT runner of `export/trt_runner.py` in the NGC export image, `OnnxRuntimeRunner` here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np

from evfsam.processing import beit3_view, decode_image, sam_view
from evfsam.specs import MAX_TEXT_TOKENS, TEXT_BUCKET, TOKENIZER_FILE, GraphSpec
from evfsam.tokenization import PromptTokenizer, pad_batch

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_THRESHOLD = 0.0


class EngineRunner(Protocol):
    description: str

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]: ...


class AccuracyGateError(RuntimeError):
    """An engine's output is over tolerance; names the graph, the output, the case and by how much."""

    def __init__(self, report: "GateReport"):
        self.report = report
        failed = report.failures()
        worst = failed[0] if failed else None
        detail = worst.excess() if worst else "no check ran"
        super().__init__(f"{report.graph}: engine ({report.runner}) fails the accuracy gate against ONNX Runtime "
                         f"FP32: {detail}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))


@dataclass(frozen=True)
class Tolerance:
    max_rel: float  # max |engine - reference| / max |reference|
    min_mask_iou: Optional[float] = None  # IoU of (engine > 0) with (reference > 0), for mask logits


DEFAULT_TOLERANCE = Tolerance(max_rel=1e-2)
MASK_TOLERANCE = Tolerance(max_rel=1e-2, min_mask_iou=0.98)
TOLERANCES: Dict[str, Tolerance] = {"iou_predictions": DEFAULT_TOLERANCE}


def tolerance_for(output_name: str, dtype: str) -> Tolerance:
    """Mask logits (a float output whose name says mask) get the IoU check too."""
    if output_name in TOLERANCES:
        return TOLERANCES[output_name]
    return MASK_TOLERANCE if "mask" in output_name and dtype.startswith("float") else DEFAULT_TOLERANCE


# ---------------------------------------------------------------------------------------------------
# Real inputs


@dataclass(frozen=True)
class GateCase:
    name: str
    image: Path
    prompts: Tuple[str, ...]
    text_bucket: int = TEXT_BUCKET  # prompts are right-padded to a multiple of this


def sample_images(assets_dir: Path = ASSETS_DIR) -> List[Path]:
    images = sorted(p for p in assets_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no sample images ({', '.join(IMAGE_SUFFIXES)}) in {assets_dir}")
    return images


def default_cases(images: Sequence[Path], prompts: Sequence[str], max_text_tokens: int = MAX_TEXT_TOKENS) -> List[GateCase]:
    """Per image: every prompt in one batch, and the first prompt alone padded to `max_text_tokens`."""
    cases = []
    for image in images:
        cases.append(GateCase(f"{image.name}|{len(prompts)} prompts", image, tuple(prompts)))
        cases.append(GateCase(f"{image.name}|1 prompt padded to {max_text_tokens}", image, (prompts[0],),
                              text_bucket=max_text_tokens))
    return cases


def preprocessed(case: GateCase, tokenizer: PromptTokenizer) -> Dict[str, np.ndarray]:
    """The tensors the server's preprocessing makes for one image and its prompts, by name."""
    rgb = decode_image(case.image.read_bytes())
    ids, mask = pad_batch([tokenizer.encode(p) for p in case.prompts], bucket=case.text_bucket)
    return {"images": sam_view(rgb)[0][None], "images_evf": beit3_view(rgb)[None],
            "input_ids": ids, "attention_mask": mask}


def broadcast_rows(spec: GraphSpec, tensors: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The inputs of `spec` with one-row tensors repeated to the rows of the other inputs on the same
    leading axis (one image for N prompts); checked against the profile's range of every axis."""
    feeds = {name: tensors[name] for name in spec.input_names}
    rows_by_axis: Dict[str, int] = {}
    for tensor in spec.inputs:
        leading = tensor.shape[0] if tensor.shape else None
        if isinstance(leading, str):
            rows_by_axis[leading] = max(rows_by_axis.get(leading, 1), feeds[tensor.name].shape[0])
    for tensor in spec.inputs:
        leading = tensor.shape[0] if tensor.shape else None
        target = rows_by_axis.get(leading) if isinstance(leading, str) else leading
        array = feeds[tensor.name]
        if target is not None and array.shape[0] != target:
            if array.shape[0] != 1:
                raise ValueError(f"{spec.name}: input {tensor.name!r} has {array.shape[0]} rows, the batch is {target}")
            feeds[tensor.name] = np.repeat(array, target, axis=0)
    _check_profile(spec, feeds)
    return feeds


def _check_profile(spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> None:
    for tensor in spec.inputs:
        shape = feeds[tensor.name].shape
        if len(shape) != len(tensor.shape):
            raise ValueError(f"{spec.name}: input {tensor.name!r} is {shape}, the spec says {tensor.shape}")
        for size, dim in zip(shape, tensor.shape):
            if isinstance(dim, str) and not spec.axes[dim].min <= size <= spec.axes[dim].max:
                raise ValueError(f"{spec.name}: input {tensor.name!r} axis {dim!r} = {size} is outside the "
                                 f"profile's {spec.axes[dim].min}..{spec.axes[dim].max}")
            if isinstance(dim, int) and size != dim:
                raise ValueError(f"{spec.name}: input {tensor.name!r} is {shape}, the spec says {tensor.shape}")


class ReferenceFeeds:
    """Every graph's inputs and ONNX Runtime FP32 outputs per case, computed once and shared by every
    engine the gate checks (a graph's inputs may need other graphs' reference outputs first)."""

    def __init__(self, specs: Sequence[GraphSpec], reference_runner: Callable[[GraphSpec], EngineRunner],
                 cases: Sequence[GateCase], tokenizer: PromptTokenizer, vocab_size: int, seed: int = 0):
        self.specs = {s.name: s for s in specs}
        self.producers = {o.name: s.name for s in specs for o in s.outputs}
        self.reference_runner = reference_runner
        self.cases = list(cases)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.seed = seed
        self._runners: Dict[str, EngineRunner] = {}
        self._tensors: Dict[str, Dict[str, np.ndarray]] = {}  # case -> every tensor made so far
        self._done: Dict[str, set] = {}  # case -> graphs whose reference outputs are in _tensors
        self.synthetic: Dict[str, List[str]] = {}  # graph -> inputs fed with random samples

    def runner(self, spec: GraphSpec) -> EngineRunner:
        if spec.name not in self._runners:
            self._runners[spec.name] = self.reference_runner(spec)
        return self._runners[spec.name]

    def feeds(self, spec: GraphSpec, case: GateCase) -> Dict[str, np.ndarray]:
        tensors = self._case_tensors(case)
        missing = [name for name in spec.input_names if name not in tensors]
        for name in missing:
            producer = self.producers.get(name)
            if producer is not None and producer != spec.name:
                self.reference(self.specs[producer], case)
        missing = [name for name in spec.input_names if name not in tensors]
        if missing:
            self.synthetic[spec.name] = missing
            rng = np.random.default_rng(self.seed)  # one row per axis minimum: it broadcasts to any batch
            sample = spec.sample_inputs(rng, {axis: r.min for axis, r in spec.axes.items()}, self.vocab_size)
            tensors.update({name: sample[name] for name in missing})
        return broadcast_rows(spec, tensors)

    def reference(self, spec: GraphSpec, case: GateCase) -> Dict[str, np.ndarray]:
        tensors = self._case_tensors(case)
        done = self._done.setdefault(case.name, set())
        if spec.name not in done:
            outputs = self.runner(spec)(self.feeds(spec, case))
            tensors.update(outputs)
            done.add(spec.name)
        return {name: tensors[name] for name in spec.output_names}

    def _case_tensors(self, case: GateCase) -> Dict[str, np.ndarray]:
        if case.name not in self._tensors:
            self._tensors[case.name] = preprocessed(case, self.tokenizer)
        return self._tensors[case.name]


# ---------------------------------------------------------------------------------------------------
# Comparison


@dataclass
class OutputCheck:
    case: str
    output: str
    shape: Tuple[int, ...]
    max_abs: float
    max_rel: float
    finite: bool
    tolerance: Tolerance
    mask_iou: Optional[float] = None

    @property
    def passed(self) -> bool:
        iou_ok = self.tolerance.min_mask_iou is None or (self.mask_iou is not None
                                                         and self.mask_iou >= self.tolerance.min_mask_iou)
        return self.finite and self.max_rel <= self.tolerance.max_rel and iou_ok

    def excess(self) -> str:
        """What failed and by how much."""
        where = f"output {self.output!r} on case {self.case!r}"
        if not self.finite:
            return f"{where}: inf / NaN where the reference is finite"
        if self.max_rel > self.tolerance.max_rel:
            return (f"{where}: max relative error {self.max_rel:.3g} (max abs {self.max_abs:.3g}) > tolerance "
                    f"{self.tolerance.max_rel:.3g}, {self.max_rel / self.tolerance.max_rel:.1f}x over")
        return f"{where}: mask IoU {self.mask_iou:.4f} < {self.tolerance.min_mask_iou}"

    def to_dict(self) -> dict:
        result = asdict(self)
        result.update(shape=list(self.shape), passed=self.passed)
        return result


@dataclass
class GateReport:
    graph: str
    runner: str
    reference: str
    checks: List[OutputCheck] = field(default_factory=list)
    synthetic_inputs: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> List[OutputCheck]:
        """Failed checks, the worst first (non-finite, then by how far over the relative tolerance)."""
        failed = [c for c in self.checks if not c.passed]
        return sorted(failed, key=lambda c: (c.finite, -c.max_rel / c.tolerance.max_rel))

    def to_dict(self) -> dict:
        return {"graph": self.graph, "engine": self.runner, "reference": self.reference, "passed": self.passed,
                "synthetic_inputs": self.synthetic_inputs, "checks": [c.to_dict() for c in self.checks]}


def mask_iou(reference: np.ndarray, actual: np.ndarray, threshold: float = MASK_THRESHOLD) -> float:
    """IoU of the thresholded masks; 1.0 when both are empty."""
    ref, act = reference > threshold, actual > threshold
    union = np.logical_or(ref, act).sum()
    return float(np.logical_and(ref, act).sum() / union) if union else 1.0


def compare_output(case: str, name: str, reference: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> OutputCheck:
    if reference.shape != actual.shape:
        raise ValueError(f"output {name!r} on case {case!r}: engine shape {actual.shape}, reference {reference.shape}")
    ref = reference.astype(np.float64)
    act = actual.astype(np.float64)
    finite = bool(np.all(np.isfinite(act) | ~np.isfinite(ref)))
    both = np.isfinite(ref) & np.isfinite(act)
    max_abs = float(np.max(np.abs(act[both] - ref[both]))) if both.any() else 0.0
    scale = float(np.max(np.abs(ref[both]))) if both.any() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    iou = mask_iou(ref, act) if tolerance.min_mask_iou is not None else None
    return OutputCheck(case, name, tuple(reference.shape), max_abs, max_rel, finite, tolerance, iou)


def check_engine(spec: GraphSpec, engine: EngineRunner, feeds: ReferenceFeeds) -> GateReport:
    """Run `engine` on every case's inputs of `spec` and compare each output with the reference."""
    report = GateReport(spec.name, engine.description, feeds.runner(spec).description)
    for case in feeds.cases:
        reference = feeds.reference(spec, case)
        actual = engine(feeds.feeds(spec, case))
        for tensor in spec.outputs:
            if tensor.name not in actual:
                raise ValueError(f"{spec.name}: the engine returned no output {tensor.name!r}")
            report.checks.append(compare_output(case.name, tensor.name, reference[tensor.name],
                                                np.asarray(actual[tensor.name]), tolerance_for(tensor.name, tensor.dtype)))
    report.synthetic_inputs = feeds.synthetic.get(spec.name, [])
    return report


def require_pass(report: GateReport) -> GateReport:
    if not report.passed:
        raise AccuracyGateError(report)
    return report


def format_report(report: GateReport) -> str:
    lines = [f"{report.graph}: {report.runner} vs {report.reference}: {'PASS' if report.passed else 'FAIL'}"]
    for c in report.checks:
        iou = f" mask IoU {c.mask_iou:.4f}" if c.mask_iou is not None else ""
        lines.append(f"  {c.case:<44} {c.output:<18} max abs {c.max_abs:9.3g}  max rel {c.max_rel:9.3g} "
                     f"(<= {c.tolerance.max_rel:g}){iou}  {'ok' if c.passed else 'FAIL'}")
    if report.synthetic_inputs:
        lines.append(f"  random (no producer known) inputs: {', '.join(report.synthetic_inputs)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime


class OnnxRuntimeRunner:
    """An ONNX graph on ONNX Runtime: the FP32 reference (CPU) and, in tests, an engine stand-in."""

    def __init__(self, onnx_path: Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: Optional[int] = None, label: str = ""):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=list(providers))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.description = label or f"onnxruntime {ort.__version__} {'+'.join(self.session.get_providers())} " \
                                    f"{Path(onnx_path).name}"

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))


def reference_feeds(specs: Sequence[GraphSpec], onnx_dir: Path, assets_dir: Path = ASSETS_DIR,
                    prompts: Optional[Sequence[str]] = None, threads: Optional[int] = None,
                    vocab_size: Optional[int] = None) -> ReferenceFeeds:
    """The gate's inputs and ONNX Runtime FP32 references for the graphs of `onnx_dir`."""
    from benchmarks.samples import PROMPTS

    from .precision import manifest_vocab_size

    tokenizer_file = onnx_dir / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found: run `python -m export` first")
    tokenizer = PromptTokenizer(tokenizer_file)
    cases = default_cases(sample_images(assets_dir), tuple(prompts or PROMPTS), tokenizer.max_tokens)
    return ReferenceFeeds(specs, lambda spec: OnnxRuntimeRunner(onnx_dir / spec.onnx_file, threads=threads),
                          cases, tokenizer, vocab_size or manifest_vocab_size(onnx_dir))
