"""Co-batching: one bad request and good ones executed in ONE batch at every model Triton batches (the SAM
image encoder and BEiT-3; the mask decoder and the python front models are not batched by Triton), the
good ones answered correctly.

The repository's engines hold their batches (`models.hold_batches`: a long max_queue_delay), so the
requests sent together are executed together; Triton's statistics prove it (one more execution, as many
more inferences as requests, and a batch of that size in batch_stats).  The engine models are called
directly through tritonclient:
* BEiT-3: the bad request's token ids are out of the vocabulary, so ONNX Runtime fails on the batch;
  the python-ort engine runs the batch again request by request (model_repository/ort_engine.py);
* SAM image encoder: every input of valid shape runs (its dims are fixed, Triton checks them), so the
  bad request is all NaN: the others must come back exactly as they do alone.
Good outputs are compared with ONNX Runtime run in this process on the same graph file, one request
at a time.
"""
from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from evfsam.specs import BATCH, BEIT3_FUSION_ENCODER, SAM_IMAGE_ENCODER, TEXT_BUCKET, TEXT_LEN, TOKENIZER_FILE, GraphSpec

from . import probes

BATCHED_ENGINES = (SAM_IMAGE_ENCODER, BEIT3_FUSION_ENCODER)
GROUP_SIZE = 4  # one preferred batch size of both engines: the batch goes as soon as it is complete
HOLD_DELAY_US = 3_000_000
OUT_OF_VOCABULARY = 10**9
TOLERANCE = 1e-4


def good_feeds(spec: GraphSpec, count: int, seed: int, vocab_size: int) -> List[Dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [spec.sample_inputs(rng, {BATCH: 1, TEXT_LEN: TEXT_BUCKET}, vocab_size) for _ in range(count)]


def vocabulary_size(onnx_dir: Path) -> int:
    """Token ids below this are what the served tokenizer produces (the export's tokenizer.json)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(onnx_dir / TOKENIZER_FILE)).get_vocab_size()


def bad_feed(spec: GraphSpec, seed: int, vocab_size: int) -> Dict[str, np.ndarray]:
    (feed,) = good_feeds(spec, 1, seed + 1, vocab_size)
    if spec is BEIT3_FUSION_ENCODER:
        feed["input_ids"][0, 3] = OUT_OF_VOCABULARY
    else:
        feed["images"][:] = np.nan
    return feed


def _send_together(client, spec: GraphSpec, feeds: List[Mapping[str, np.ndarray]]) -> List[Future]:
    futures = []
    for feed in feeds:
        inputs = []
        for tensor in spec.inputs:
            value = np.ascontiguousarray(feed[tensor.name], dtype=tensor.np_dtype)
            triton_input = grpcclient.InferInput(tensor.name, list(value.shape), np_to_triton_dtype(value.dtype))
            triton_input.set_data_from_numpy(value)
            inputs.append(triton_input)
        future: Future = Future()
        client.async_infer(spec.name, inputs, lambda result, error, f=future: f.set_exception(error) if error
                           else f.set_result(result))
        futures.append(future)
    return futures


def check_engine(http_url: str, grpc_url: str, onnx_dir: Path, spec: GraphSpec, seed: int = 11) -> Dict[str, object]:
    vocab_size = vocabulary_size(onnx_dir)
    goods = good_feeds(spec, GROUP_SIZE - 1, seed, vocab_size)
    bad = bad_feed(spec, seed, vocab_size)
    feeds = goods[:1] + [bad] + goods[1:]  # the bad one in the middle of the batch
    client = grpcclient.InferenceServerClient(grpc_url)
    before = probes.model_counts(http_url, spec.name)
    results = [_outcome(f) for f in _send_together(client, spec, feeds)]
    counts = probes.model_counts(http_url, spec.name).minus(before)
    session = ort.InferenceSession(str(onnx_dir / spec.onnx_file), providers=["CPUExecutionProvider"])
    good_errors: List[Optional[float]] = []
    for feed, (result, _) in zip(feeds, results):
        if feed is bad:
            continue
        expected = session.run(list(spec.output_names), feed)
        good_errors.append(None if result is None else max(
            float(np.max(np.abs(result.as_numpy(name) - value))) for name, value in zip(spec.output_names, expected)))
    bad_result, bad_error = results[1]
    bad_outcome = {"error": bad_error} if bad_error else {
        "answered": True, "all_nan": all(bool(np.isnan(bad_result.as_numpy(n)).all()) for n in spec.output_names)}
    one_batch = counts.execution_count == 1 and counts.inference_count == GROUP_SIZE and counts.batch_sizes == {GROUP_SIZE: 1}
    goods_ok = all(e is not None and e <= TOLERANCE for e in good_errors)
    return {"requests": GROUP_SIZE, "bad_position": 1, "counts": counts.to_dict(), "one_batch": one_batch,
            "good_max_abs_error": good_errors, "goods_correct": goods_ok, "bad": bad_outcome,
            "bad_kind": "out-of-vocabulary token id" if spec is BEIT3_FUSION_ENCODER else "all-NaN image"}


def _outcome(future: Future):
    try:
        return future.result(timeout=120), None
    except InferenceServerException as exc:
        return None, f"{exc.status()}: {exc.message()}"


def run(http_url: str, grpc_url: str, onnx_dir: Path) -> Dict[str, object]:
    return {spec.name: check_engine(http_url, grpc_url, onnx_dir, spec) for spec in BATCHED_ENGINES}
