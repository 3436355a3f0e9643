"""Generate the Triton model repository from the graph specs.

    python -m serving.repository --flavor python-ort --onnx-dir build/onnx --output build/model_repository

Models: the three engines (`sam_image_encoder`, `beit3_fusion_encoder`, `prompt_mask_decoder`),
python-backend `preprocess` / `postprocess`, and the `evf_sam` ensemble.  The engine flavor is one
switch; the ensemble and the pre/post-processing are the same in all of them:

* `tensorrt`     platform tensorrt_plan, `model.plan` built by `python -m export.tensorrt_build`
* `onnxruntime`  platform onnxruntime_onnx (NGC tritonserver, GPU or CPU)
* `python-ort`   python-backend models running ONNX Runtime: what the pip-installable tritonserver
                 (python backend only) serves, and the default here.

Every tensor name, dtype and shape comes from `evfsam.specs`.
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from evfsam.specs import (
    BATCH,
    EVF_SAM,
    EVF_SAM_PROMPTS,
    GRAPHS,
    MAX_TEXT_TOKENS,
    ORIGINAL_SIZE,
    RESIZED_SIZE,
    TEXT_BUCKET,
    TOKENIZER_FILE,
    GraphSpec,
    TensorSpec,
)
from evfsam.specs import BEIT3_FUSION_ENCODER, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER
from evfsam.model_config import InputLimits
from evfsam.processing import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS

from .pbtxt import Enum, render

FLAVORS = ("python-ort", "onnxruntime", "tensorrt")
PREPROCESS = "preprocess"
POSTPROCESS = "postprocess"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "model_repository"
# Light, torch-free modules the python-backend models import; copied so the repository stands alone.
SERVING_MODULES = ("__init__.py", "specs.py", "processing.py", "tokenization.py", "embedding_cache.py",
                   "model_config.py")
EVFSAM_DIR = Path(__file__).resolve().parent.parent / "evfsam"

PREPROCESS_OUTPUTS = tuple(t for g in (SAM_IMAGE_ENCODER, BEIT3_FUSION_ENCODER) for t in g.inputs) + (
    ORIGINAL_SIZE,
    RESIZED_SIZE,
)
POSTPROCESS_INPUTS = PROMPT_MASK_DECODER.outputs + (ORIGINAL_SIZE, RESIZED_SIZE)


@dataclass(frozen=True)
class RepositoryOptions:
    flavor: str = "python-ort"
    device: str = "cpu"  # instance kind of the engines for the onnxruntime flavor
    engine_instances: int = 1
    python_instances: int = 2  # pre/post-processing instances (decode and resize run in parallel)
    ort_threads: int = 0  # python-ort intra-op threads; 0 = ONNX Runtime's default
    max_queue_size: int = 64
    queue_timeout_us: int = 60_000_000
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_text_tokens: int = MAX_TEXT_TOKENS
    cache_bytes: int = 512 * 1024**2  # evf_sam_prompts' image-embedding cache (~4.6 MB per image)
    warmup: bool = True


def io_entry(tensor: TensorSpec) -> Dict:
    entry = {"name": tensor.name, "data_type": Enum(tensor.triton_dtype), "dims": list(tensor.triton_dims())}
    if tensor.optional:
        entry["optional"] = True
    return entry


def parameters(values: Mapping[str, object]) -> List[Dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def queue_policy(opts: RepositoryOptions) -> Dict:
    return {
        "max_queue_size": opts.max_queue_size,
        "timeout_action": Enum("REJECT"),
        "default_timeout_microseconds": opts.queue_timeout_us,
    }


def warmup_entry(spec: GraphSpec) -> Dict:
    point = {axis: TEXT_BUCKET if axis != BATCH else 1 for axis in spec.axes}
    inputs = []
    for tensor in spec.inputs:
        dims = list(tensor.concrete_shape(point)[1:])
        # zeros are valid everywhere: token id 0 is <s>, an all-zero mask pads only text
        inputs.append({"key": tensor.name, "value": {"data_type": Enum(tensor.triton_dtype), "dims": dims, "zero_data": True}})
    return {"name": f"{spec.name}_warmup", "batch_size": 1, "inputs": inputs}


def engine_config(spec: GraphSpec, opts: RepositoryOptions) -> Dict:
    config: Dict = {"name": spec.name}
    if opts.flavor == "tensorrt":
        config.update(platform="tensorrt_plan", default_model_filename="model.plan")
        kind = "KIND_GPU"
    elif opts.flavor == "onnxruntime":
        config.update(platform="onnxruntime_onnx", default_model_filename="model.onnx")
        kind = "KIND_GPU" if opts.device == "gpu" else "KIND_CPU"
    else:
        config.update(backend="python")
        kind = "KIND_CPU"
    config.update(
        max_batch_size=spec.max_batch_size,
        input=[io_entry(t) for t in spec.inputs],
        output=[io_entry(t) for t in spec.outputs],
        instance_group=[{"count": opts.engine_instances, "kind": Enum(kind)}],
        dynamic_batching={
            "preferred_batch_size": list(spec.preferred_batch_sizes),
            "max_queue_delay_microseconds": spec.max_queue_delay_us,
            "default_queue_policy": queue_policy(opts),
        },
    )
    if opts.flavor == "python-ort":
        config["parameters"] = parameters({"onnx_file": spec.onnx_file, "intra_op_threads": opts.ort_threads})
    if opts.warmup:
        config["model_warmup"] = [warmup_entry(spec)]
    return config


def python_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], opts: RepositoryOptions,
                  params: Optional[Mapping[str, object]] = None) -> Dict:
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": EVF_SAM.max_batch_size * 8,
        "input": [io_entry(t) for t in inputs],
        "output": [io_entry(t) for t in outputs],
        "instance_group": [{"count": opts.python_instances, "kind": Enum("KIND_CPU")}],
        "dynamic_batching": {"max_queue_delay_microseconds": 0, "default_queue_policy": queue_policy(opts)},
    }
    if params:
        config["parameters"] = parameters(params)
    return config


def ensemble_config() -> Dict:
    steps = [
        _step(PREPROCESS, EVF_SAM.inputs, PREPROCESS_OUTPUTS),
        _step(SAM_IMAGE_ENCODER.name, SAM_IMAGE_ENCODER.inputs, SAM_IMAGE_ENCODER.outputs),
        _step(BEIT3_FUSION_ENCODER.name, BEIT3_FUSION_ENCODER.inputs, BEIT3_FUSION_ENCODER.outputs),
        _step(PROMPT_MASK_DECODER.name, PROMPT_MASK_DECODER.inputs, PROMPT_MASK_DECODER.outputs),
        _step(POSTPROCESS, POSTPROCESS_INPUTS, EVF_SAM.outputs),
    ]
    return {
        "name": EVF_SAM.name,
        "platform": "ensemble",
        "max_batch_size": EVF_SAM.max_batch_size,
        "input": [io_entry(t) for t in EVF_SAM.inputs],
        "output": [io_entry(t) for t in EVF_SAM.outputs],
        "ensemble_scheduling": {"step": steps},
    }


def _step(model: str, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> Dict:
    return {
        "model_name": model,
        "model_version": -1,
        "input_map": [{"key": t.name, "value": t.name} for t in inputs],
        "output_map": [{"key": t.name, "value": t.name} for t in outputs],
    }


def write_model(repo: Path, config: Dict) -> Path:
    version_dir = repo / config["name"] / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (repo / config["name"] / "config.pbtxt").write_text(render(config) + "\n")
    return version_dir


def install_python_model(version_dir: Path, source: str) -> None:
    shutil.copyfile(SOURCE_DIR / source, version_dir / "model.py")
    package = version_dir / "evfsam"
    package.mkdir(exist_ok=True)
    for module in SERVING_MODULES:
        shutil.copyfile(EVFSAM_DIR / module, package / module)


def link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def install_onnx(onnx_dir: Path, spec: GraphSpec, version_dir: Path, target_name: str) -> None:
    source = onnx_dir / spec.onnx_file
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run `make export` first")
    link_or_copy(source, version_dir / target_name)
    data = source.with_name(source.name + ".data")
    if data.is_file():  # external data is referenced by its file name, relative to the graph
        link_or_copy(data, version_dir / data.name)


def write_repository(output: Path, onnx_dir: Path, opts: RepositoryOptions = RepositoryOptions()) -> Path:
    if opts.flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {opts.flavor!r}; choose one of {FLAVORS}")
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    for spec in GRAPHS:
        version_dir = write_model(output, engine_config(spec, opts))
        if opts.flavor == "python-ort":
            install_python_model(version_dir, "ort_engine.py")
            install_onnx(onnx_dir, spec, version_dir, spec.onnx_file)
        elif opts.flavor == "onnxruntime":
            install_onnx(onnx_dir, spec, version_dir, "model.onnx")
        # tensorrt: model.plan is written into version_dir by `python -m export.tensorrt_build`
    pre_dir = write_model(output, python_config(PREPROCESS, EVF_SAM.inputs, PREPROCESS_OUTPUTS, opts,
                                                preprocess_parameters(opts)))
    install_python_model(pre_dir, "preprocess.py")
    shutil.copyfile(onnx_dir / TOKENIZER_FILE, pre_dir / TOKENIZER_FILE)
    post_dir = write_model(output, python_config(POSTPROCESS, POSTPROCESS_INPUTS, EVF_SAM.outputs, opts))
    install_python_model(post_dir, "postprocess.py")
    write_model(output, ensemble_config())
    prompts_dir = write_model(output, prompts_config(opts))
    install_python_model(prompts_dir, "prompts.py")
    shutil.copyfile(onnx_dir / TOKENIZER_FILE, prompts_dir / TOKENIZER_FILE)
    return output


def preprocess_parameters(opts: RepositoryOptions) -> Dict[str, object]:
    return InputLimits(TOKENIZER_FILE, opts.max_text_tokens, opts.max_image_bytes, opts.max_image_pixels).to_parameters()


def prompts_config(opts: RepositoryOptions) -> Dict:
    """`evf_sam_prompts`: one instance, so one cache serves every request (requests run in turn)."""
    return {
        "name": EVF_SAM_PROMPTS.name,
        "backend": "python",
        "max_batch_size": EVF_SAM_PROMPTS.max_batch_size,
        "input": [io_entry(t) for t in EVF_SAM_PROMPTS.inputs],
        "output": [io_entry(t) for t in EVF_SAM_PROMPTS.outputs],
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": parameters({**preprocess_parameters(opts), "cache_bytes": opts.cache_bytes}),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.repository", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", choices=FLAVORS, default="python-ort")
    parser.add_argument("--onnx-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--output", type=Path, default=Path("build/model_repository"))
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--engine-instances", type=int, default=1)
    parser.add_argument("--python-instances", type=int, default=2)
    parser.add_argument("--ort-threads", type=int, default=0)
    parser.add_argument("--max-queue-size", type=int, default=64)
    parser.add_argument("--cache-mib", type=int, default=512, help="evf_sam_prompts image-embedding cache budget")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    opts = RepositoryOptions(flavor=args.flavor, device=args.device, engine_instances=args.engine_instances,
                             python_instances=args.python_instances, ort_threads=args.ort_threads,
                             max_queue_size=args.max_queue_size, cache_bytes=args.cache_mib * 1024**2,
                             warmup=not args.no_warmup)
    path = write_repository(args.output, args.onnx_dir, opts)
    print(f"wrote {opts.flavor} model repository to {path}")


if __name__ == "__main__":
    main()
