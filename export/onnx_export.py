"""Export each graph to ONNX and validate it against PyTorch on ONNX Runtime."""
from __future__ import annotations

import hashlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np
import onnx
import torch

from evfsam.specs import BATCH, BEIT3_FUSION_ENCODER, IMAGES, TEXT_LEN, GraphSpec

from .wrappers import graph_wrapper

DEFAULT_OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # stay clear of protobuf's hard 2 GiB ceiling
TRACE_TEXT_LEN = 8
# Validation runs at shapes the graph was not traced with.
VALIDATION_TEXT_LEN = 13


def trace_axes(spec: GraphSpec) -> Dict[str, int]:
    return {BATCH: spec.export_batches[0], TEXT_LEN: TRACE_TEXT_LEN}


def validation_axes(spec: GraphSpec) -> Dict[str, int]:
    return {BATCH: spec.export_batches[1], TEXT_LEN: VALIDATION_TEXT_LEN}


class ExportValidationError(RuntimeError):
    """An exported graph disagrees with PyTorch beyond tolerance."""

    def __init__(self, graph: str, output: str, max_abs: float, max_rel: float, tolerance: float):
        self.graph, self.output, self.max_abs, self.max_rel, self.tolerance = graph, output, max_abs, max_rel, tolerance
        super().__init__(
            f"{graph}: output {output!r} differs from PyTorch by max abs {max_abs:.3g} "
            f"(relative {max_rel:.3g}); tolerance {tolerance:.3g}"
        )


@dataclass
class Comparison:
    graph: str
    output: str
    shape: tuple
    max_abs: float
    max_rel: float
    tolerance: float
    check: str = "onnxruntime vs pytorch"

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


def export_graph(model: torch.nn.Module, spec: GraphSpec, out_dir: Path, opset: int = DEFAULT_OPSET,
                 vocab_size: int = 1000, recipe: str = "ori") -> Path:
    """Trace `spec`'s wrapper around `model` and write `out_dir/<spec.onnx_file>` (external data if large)."""
    wrapper = graph_wrapper(spec, model, recipe)
    sample = spec.sample_inputs(np.random.default_rng(0), trace_axes(spec), vocab_size)
    args = tuple(torch.from_numpy(sample[name]) for name in spec.input_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / spec.onnx_file
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / spec.onnx_file
        with torch.inference_mode(), warnings.catch_warnings():
            # Shape arithmetic in SAM's windowing is constant at 1024x1024; the tracer warns anyway.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper,
                args,
                str(raw),
                dynamo=False,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
            )
        _save(onnx.load(str(raw)), target)
    return target


def _save(proto: onnx.ModelProto, target: Path) -> None:
    data_file = target.with_name(target.name + ".data")
    for stale in (target, data_file):
        stale.unlink(missing_ok=True)
    if proto.ByteSize() > PROTOBUF_LIMIT:
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(target))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for part in (path, path.with_name(path.name + ".data")):
        if part.exists():
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def ort_session(path: Path, threads: Optional[int] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(graph: str, name: str, reference: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> Comparison:
    if reference.shape != actual.shape:
        raise ExportValidationError(graph, name, float("inf"), float("inf"), 0.0)
    max_abs = float(np.max(np.abs(reference - actual))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    return Comparison(graph, name, reference.shape, max_abs, max_rel, atol + rtol * scale)


def validate_graph(
    model: torch.nn.Module,
    spec: GraphSpec,
    onnx_path: Path,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 1,
    vocab_size: int = 1000,
    axes: Optional[Mapping[str, int]] = None,
    recipe: str = "ori",
) -> List[Comparison]:
    """ONNX Runtime vs PyTorch on fresh random inputs at non-trace shapes; raises on the first failure."""
    wrapper = graph_wrapper(spec, model, recipe)
    inputs = spec.sample_inputs(np.random.default_rng(seed), axes or validation_axes(spec), vocab_size)
    with torch.inference_mode():
        reference = wrapper(*(torch.from_numpy(inputs[n]) for n in spec.input_names))
    reference = reference if isinstance(reference, (tuple, list)) else (reference,)
    session = ort_session(onnx_path)
    actual = session.run(list(spec.output_names), inputs)
    results = [
        compare(spec.name, name, ref.numpy(), out, atol, rtol)
        for name, ref, out in zip(spec.output_names, reference, actual)
    ]
    if spec.name == BEIT3_FUSION_ENCODER.name:
        results.append(_padding_equivalence(session, inputs, actual[0], atol, rtol))
    if IMAGES in spec.axes and all(inputs[t.name].shape[0] == 1 for t in spec.inputs if t.shape[0] == IMAGES):
        results += _broadcast_equivalence(spec, session, inputs, actual, atol, rtol)
    for result in results:
        if not result.ok:
            raise ExportValidationError(result.graph, result.output, result.max_abs, result.max_rel, result.tolerance)
    return results


def _padding_equivalence(session, inputs: Dict[str, np.ndarray], batched: np.ndarray, atol: float, rtol: float) -> Comparison:
    """Each right-padded row must match the same prompt run alone without padding."""
    worst = None
    for row in range(batched.shape[0]):
        length = int(inputs["attention_mask"][row].sum())
        single = {
            "images_evf": inputs["images_evf"][row : row + 1],
            "input_ids": inputs["input_ids"][row : row + 1, :length],
            "attention_mask": inputs["attention_mask"][row : row + 1, :length],
        }
        (alone,) = session.run(["text_embeds"], single)
        result = compare(BEIT3_FUSION_ENCODER.name, "text_embeds", alone, batched[row : row + 1], atol, rtol)
        if worst is None or result.max_abs > worst.max_abs:
            worst = result
    worst.check = "padded batch vs unpadded rows"
    return worst


def _broadcast_equivalence(spec: GraphSpec, session, inputs: Dict[str, np.ndarray], broadcast: List[np.ndarray],
                           atol: float, rtol: float) -> List[Comparison]:
    """One image's features broadcast over N prompts must equal the same image repeated N times."""
    rows = next(inputs[t.name].shape[0] for t in spec.inputs if t.shape[0] == BATCH)
    paired_inputs = {t.name: np.repeat(inputs[t.name], rows, axis=0) if t.shape[0] == IMAGES else inputs[t.name]
                     for t in spec.inputs}
    paired = session.run(list(spec.output_names), paired_inputs)
    results = [compare(spec.name, name, p, b, atol, rtol) for name, p, b in zip(spec.output_names, paired, broadcast)]
    for result in results:
        result.check = "1 image broadcast vs paired"
    return results


def format_table(results: List[Comparison]) -> str:
    header = f"{'graph':<24} {'output':<16} {'check':<31} {'shape':<22} {'max abs':>10} {'max rel':>10}  ok"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.graph:<24} {r.output:<16} {r.check:<31} {str(list(r.shape)):<22} "
            f"{r.max_abs:>10.2e} {r.max_rel:>10.2e}  {'yes' if r.ok else 'NO'}"
        )
    return "\n".join(lines)
