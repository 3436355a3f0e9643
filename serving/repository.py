"""Generate the Triton model repository from the graph specs and the export's manifest.

    python -m serving.repository --flavor python-ort --device cpu --onnx-dir build/onnx --output build/model_repository

Models (names and tensors from `evfsam.specs`; the family — EVF-SAM or EVF-SAM2 — and the recipe come
from `build/onnx/manifest.json`):

* `evf_sam`, `evf_sam_prompts`   the served contracts: one python source (model_repository/segment.py)
                                 running one pipeline through BLS calls
* `image_feature_cache`          the one image-feature cache both call (decoupled python, one instance)
* the family's three engines     image encoder, `beit3_fusion_encoder`, mask decoder

The engine flavor is one switch, the device another; the served models are the same in all of them:

* `tensorrt`     platform tensorrt_plan (GPU), `model.plan` built by `python -m export.tensorrt_build`
* `onnxruntime`  platform onnxruntime_onnx (NGC tritonserver): CPU, or GPU with the TensorRT execution
                 provider (FP16, the specs' profiles, engine + timing caches) and CUDA as the fallback
* `python-ort`   python-backend models running ONNX Runtime: what the pip-installable tritonserver
                 (python backend only) serves, and the default here; on GPU, onnxruntime-gpu's CUDA provider.

Every model has a bounded queue that rejects what does not fit, and a queue timeout.  The repository
records what it was built from (`provenance.json` at its root; the served models' config parameters),
so `serving.prepare` can tell a stale repository and clients can ask what is served.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from evfsam import provenance
from evfsam.model_config import (DEFAULT_BLS_TIMEOUT_S, DEFAULT_MAX_ENCODED_OUTPUT_PIXELS, DEFAULT_MAX_OUTPUT_PIXELS,
                                 CacheSettings, InputLimits, PipelineSettings)
from evfsam.processing import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from evfsam.specs import (BATCH, EVF_SAM, EVF_SAM_PROMPTS, FAMILIES, IMAGES, MAX_TEXT_TOKENS, TEXT_BUCKET, TEXT_LEN,
                          TOKENIZER_FILE, FamilySpec,
                          GraphSpec, ServedModelSpec, TensorSpec, family, image_cache_spec)

from .pbtxt import Enum, render

FLAVORS = ("python-ort", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "gpu")
PROVENANCE_FILE = "provenance.json"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "model_repository"
# Light, torch-free modules the python-backend models import; copied so the repository stands alone.
SERVING_MODULES = ("__init__.py", "specs.py", "processing.py", "tokenization.py", "embedding_cache.py",
                   "model_config.py", "recipes.py", "mask_codecs.py")
EVFSAM_DIR = Path(__file__).resolve().parent.parent / "evfsam"
# Image features per cached image: 4 MiB (EVF-SAM) or 16 MiB (EVF-SAM2), + the BEiT-3 view: the
# default budgets hold ~110 images of either family.
DEFAULT_CACHE_MIB = {"ori": 512, "sam2": 1824}
# python-ort on CPU runs the image encoders one image at a time (see model_repository/ort_engine.py):
# mixed batch sizes grow ONNX Runtime's memory arena, and a CPU gains little from batching a real-size
# encoder (SAM ViT-B here: 13 s for one image, 69 s for four, on a shared machine).
CPU_ONE_ROW_PER_RUN = {f.image_encoder.name for f in FAMILIES.values()}


@dataclass(frozen=True)
class RepositoryOptions:
    flavor: str = "python-ort"
    device: str = "cpu"
    engine_instances: int = 1
    front_instances: int = 4  # requests in flight per served model (each instance serves one at a time)
    ort_threads: int = 0  # python-ort intra-op threads; 0 = ONNX Runtime's default
    max_queue_size: int = 64
    queue_timeout_us: int = 60_000_000
    # How long a request may wait in `evf_sam`'s / `evf_sam_prompts`' queue (None: queue_timeout_us).  Clients
    # with short deadlines are served better by a short one (docs: Reliability), others get more rejections.
    served_queue_timeout_us: Optional[int] = None
    # Images encoded at once (the feature cache's claims); more wait in the served model, where a request
    # whose client has gone is dropped before the encoder runs.  None: what the encoder instances take at
    # once (`encoder_capacity`).  0: unbounded (every request goes straight to the encoder's queue).
    encodes_in_flight: Optional[int] = None
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_text_tokens: int = MAX_TEXT_TOKENS
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS
    max_encoded_output_pixels: int = DEFAULT_MAX_ENCODED_OUTPUT_PIXELS
    cache_bytes: Optional[int] = None  # None: DEFAULT_CACHE_MIB of the family
    bls_timeout_s: float = DEFAULT_BLS_TIMEOUT_S
    trt_cache_dir: str = "/tmp/evf_sam_trt_cache"  # onnxruntime flavor on GPU: TensorRT EP engine cache
    warmup: bool = True

    def encoder_capacity(self, family_spec: FamilySpec) -> int:
        """Images the image-encoder instances run at once: one per instance on a CPU (one row per
        run), a full batch per instance on a GPU."""
        if self.encodes_in_flight is not None:
            return self.encodes_in_flight
        per_instance = 1 if self.device == "cpu" and family_spec.image_encoder.name in CPU_ONE_ROW_PER_RUN \
            else family_spec.image_encoder.max_batch_size
        return self.engine_instances * max(1, per_instance)

    def cache_budget(self, family_name: str) -> int:
        return self.cache_bytes if self.cache_bytes is not None else DEFAULT_CACHE_MIB[family_name] * 1024**2

    def check(self) -> "RepositoryOptions":
        if self.flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {self.flavor!r}; choose one of {FLAVORS}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {DEVICES}")
        if self.flavor == "tensorrt" and self.device != "gpu":
            raise ValueError("the tensorrt flavor runs on GPUs only: use --device gpu")
        return self


def io_entry(tensor: TensorSpec, batched: bool = True) -> Dict:
    entry = {"name": tensor.name, "data_type": Enum(tensor.triton_dtype), "dims": list(tensor.triton_dims(batched))}
    if tensor.optional:
        entry["optional"] = True
    return entry


def parameters(values: Mapping[str, object]) -> List[Dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def queue_policy(opts: RepositoryOptions, timeout_us: Optional[int] = None) -> Dict:
    return {
        "max_queue_size": opts.max_queue_size,
        "timeout_action": Enum("REJECT"),
        "default_timeout_microseconds": opts.queue_timeout_us if timeout_us is None else timeout_us,
        # A client's (or a BLS call's) own timeout applies if it is shorter: Triton 2.51 never lets a
        # request wait longer than the default (measured), hence `internal_queue_timeout_us`.
        "allow_timeout_override": True,
    }


def internal_queue_timeout_us(opts: RepositoryOptions) -> int:
    """The queue timeout of the models the pipeline calls: at least the BLS timeout, which cannot raise it."""
    return max(opts.queue_timeout_us, int(opts.bls_timeout_s * 1e6))


def warmup_entry(spec: GraphSpec) -> Dict:
    point = {BATCH: 1, IMAGES: 1, TEXT_LEN: TEXT_BUCKET}
    inputs = []
    for tensor in spec.inputs:
        shape = tensor.concrete_shape(point)
        dims = list(shape[1:] if spec.triton_batching else shape)
        # zeros are valid everywhere: token id 0 is <s>, an all-zero mask pads only text
        inputs.append({"key": tensor.name, "value": {"data_type": Enum(tensor.triton_dtype), "dims": dims, "zero_data": True}})
    return {"name": f"{spec.name}_warmup", "batch_size": 1, "inputs": inputs}


def _shapes(spec: GraphSpec, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in spec.profile_shapes(which).items())


def ort_gpu_accelerators(spec: GraphSpec, opts: RepositoryOptions) -> Dict:
    """onnxruntime flavor on GPU: TensorRT EP (FP16, LayerNorm kept FP32, the spec's profile, engine and
    timing caches), CUDA EP for what TensorRT does not take."""
    trt = {
        "precision_mode": "FP16",
        "trt_layer_norm_fp32_fallback": "1",
        "max_workspace_size_bytes": str(8 * 1024**3),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"{opts.trt_cache_dir}/{spec.name}",
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": opts.trt_cache_dir,
        "trt_profile_min_shapes": _shapes(spec, "min"),
        "trt_profile_opt_shapes": _shapes(spec, "opt"),
        "trt_profile_max_shapes": _shapes(spec, "max"),
    }
    return {"execution_accelerators": {"gpu_execution_accelerator": [
        {"name": "tensorrt", "parameters": [{"key": k, "value": v} for k, v in trt.items()]},
        {"name": "cuda", "parameters": [{"key": "use_ep_level_unified_stream", "value": "1"}]},
    ]}}


def engine_config(spec: GraphSpec, opts: RepositoryOptions) -> Dict:
    config: Dict = {"name": spec.name}
    gpu = opts.device == "gpu"
    if opts.flavor == "tensorrt":
        config.update(platform="tensorrt_plan", default_model_filename="model.plan")
    elif opts.flavor == "onnxruntime":
        config.update(platform="onnxruntime_onnx", default_model_filename="model.onnx")
    else:
        config.update(backend="python")
    config.update(
        max_batch_size=spec.max_batch_size,
        input=[io_entry(t, spec.triton_batching) for t in spec.inputs],
        output=[io_entry(t, spec.triton_batching) for t in spec.outputs],
        instance_group=[{"count": opts.engine_instances, "kind": Enum("KIND_GPU" if gpu else "KIND_CPU")}],
        dynamic_batching=_engine_batching(spec, opts),
    )
    if opts.flavor == "onnxruntime" and gpu:
        config["optimization"] = ort_gpu_accelerators(spec, opts)
    if opts.flavor == "python-ort":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        rows_per_run = 1 if not gpu and spec.name in CPU_ONE_ROW_PER_RUN else 0
        config["parameters"] = parameters({"onnx_file": spec.onnx_file, "intra_op_threads": opts.ort_threads,
                                           "execution_providers": json.dumps(providers),
                                           "max_rows_per_run": rows_per_run})
    if opts.warmup:
        config["model_warmup"] = [warmup_entry(spec)]
    return config


def _engine_batching(spec: GraphSpec, opts: RepositoryOptions) -> Dict:
    batching: Dict = {"default_queue_policy": queue_policy(opts, internal_queue_timeout_us(opts))}
    if spec.triton_batching:
        batching.update(preferred_batch_size=list(spec.preferred_batch_sizes),
                        max_queue_delay_microseconds=spec.max_queue_delay_us)
    return batching


def served_config(spec: ServedModelSpec, opts: RepositoryOptions, params: Mapping[str, object]) -> Dict:
    """`evf_sam` / `evf_sam_prompts`: python, CPU instances (they wait on BLS calls most of the time)."""
    return {
        "name": spec.name,
        "backend": "python",
        "max_batch_size": spec.max_batch_size,
        "input": [io_entry(t, spec.max_batch_size > 0) for t in spec.inputs],
        "output": [io_entry(t, spec.max_batch_size > 0) for t in spec.outputs],
        "instance_group": [{"count": opts.front_instances, "kind": Enum("KIND_CPU")}],
        "dynamic_batching": {"default_queue_policy": queue_policy(opts, opts.served_queue_timeout_us)},
        "parameters": parameters(params),
    }


def cache_config(family_spec: FamilySpec, opts: RepositoryOptions) -> Dict:
    """One decoupled instance: one cache, and requests answered concurrently on its event loop."""
    spec = image_cache_spec(family_spec)
    settings = CacheSettings(family_spec.name, opts.cache_budget(family_spec.name), opts.bls_timeout_s,
                             opts.encoder_capacity(family_spec))
    # Bounded by the served models' instances (each has at most a few cache calls in flight).
    return {
        "name": spec.name,
        "backend": "python",
        "max_batch_size": 0,
        "input": [io_entry(t, False) for t in spec.inputs],
        "output": [io_entry(t, False) for t in spec.outputs],
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "model_transaction_policy": {"decoupled": True},
        "dynamic_batching": {"default_queue_policy": queue_policy(replace(opts, max_queue_size=max(
            opts.max_queue_size, 8 * opts.front_instances)), internal_queue_timeout_us(opts))},
        "parameters": parameters(settings.to_parameters()),
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
        if (EVFSAM_DIR / module).is_file():
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


def read_export_manifest(onnx_dir: Path) -> Dict:
    manifest = provenance.read_manifest(onnx_dir)
    if manifest is None:
        raise FileNotFoundError(f"{onnx_dir / provenance.MANIFEST_FILE} not found: run `make export` first")
    if "family" not in manifest or "recipe" not in manifest:
        raise FileNotFoundError(f"{onnx_dir / provenance.MANIFEST_FILE} predates families and recipes: run `make export` again")
    return manifest


def served_parameters(spec: ServedModelSpec, manifest: Mapping, opts: RepositoryOptions) -> Dict[str, object]:
    limits = InputLimits(TOKENIZER_FILE, opts.max_text_tokens, opts.max_image_bytes, opts.max_image_pixels,
                         opts.max_output_pixels, opts.max_encoded_output_pixels)
    settings = PipelineSettings(spec.name, manifest["family"], manifest["recipe"], opts.bls_timeout_s)
    served = {"checkpoint": manifest["checkpoint"], "checkpoint_sha256": manifest["checkpoint_sha256"],
              "multitask": manifest.get("multitask", False)}
    return {**limits.to_parameters(), **settings.to_parameters(), **served}


def write_repository(output: Path, onnx_dir: Path, opts: RepositoryOptions = RepositoryOptions()) -> Path:
    opts.check()
    manifest = read_export_manifest(onnx_dir)
    family_spec = family(manifest["family"])
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    for spec in family_spec.graphs:
        version_dir = write_model(output, engine_config(spec, opts))
        if opts.flavor == "python-ort":
            install_python_model(version_dir, "ort_engine.py")
            install_onnx(onnx_dir, spec, version_dir, spec.onnx_file)
        elif opts.flavor == "onnxruntime":
            install_onnx(onnx_dir, spec, version_dir, "model.onnx")
        # tensorrt: model.plan is written into version_dir by `python -m export.tensorrt_build`
    install_python_model(write_model(output, cache_config(family_spec, opts)), "image_cache.py")
    for spec in (EVF_SAM, EVF_SAM_PROMPTS):
        version_dir = write_model(output, served_config(spec, opts, served_parameters(spec, manifest, opts)))
        install_python_model(version_dir, "segment.py")
        shutil.copyfile(onnx_dir / TOKENIZER_FILE, version_dir / TOKENIZER_FILE)
    (output / PROVENANCE_FILE).write_text(json.dumps(repository_provenance(manifest, opts), indent=2))
    return output


def repository_provenance(manifest: Mapping, opts: RepositoryOptions) -> Dict:
    """What this repository serves and how it was generated (read by serving.prepare and the launcher)."""
    return {"export": dict(manifest), "options": {k: v for k, v in opts.__dict__.items()},
            "generator_commit": provenance.git_commit()}


def read_repository_provenance(repository: Path) -> Optional[Dict]:
    path = Path(repository) / PROVENANCE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The repository options as command-line flags (shared with serving.prepare)."""
    parser.add_argument("--flavor", choices=FLAVORS, default="python-ort")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--engine-instances", type=int, default=1)
    parser.add_argument("--front-instances", type=int, default=4, help="requests in flight per served model")
    parser.add_argument("--ort-threads", type=int, default=0)
    parser.add_argument("--max-queue-size", type=int, default=64)
    parser.add_argument("--served-queue-timeout-ms", type=float, default=None,
                        help="longest wait in evf_sam's / evf_sam_prompts' queue (default: 60 s, as every model)")
    parser.add_argument("--encodes-in-flight", type=int, default=None,
                        help="images encoded at once; more wait where a gone client's request is dropped "
                             "(default: what the encoder instances run at once; 0: unbounded)")
    parser.add_argument("--cache-mib", type=int, default=None,
                        help=f"image feature cache budget (default per family: {DEFAULT_CACHE_MIB})")
    parser.add_argument("--max-output-pixels", type=int, default=DEFAULT_MAX_OUTPUT_PIXELS,
                        help="raw masks per response: prompts x height x width")
    parser.add_argument("--bls-timeout-s", type=float, default=DEFAULT_BLS_TIMEOUT_S)
    parser.add_argument("--no-warmup", action="store_true")


def options_from(args: argparse.Namespace) -> RepositoryOptions:
    return RepositoryOptions(
        flavor=args.flavor, device=args.device, engine_instances=args.engine_instances,
        front_instances=args.front_instances, ort_threads=args.ort_threads, max_queue_size=args.max_queue_size,
        served_queue_timeout_us=None if args.served_queue_timeout_ms is None else int(args.served_queue_timeout_ms * 1000),
        encodes_in_flight=args.encodes_in_flight,
        cache_bytes=None if args.cache_mib is None else args.cache_mib * 1024**2,
        max_output_pixels=args.max_output_pixels, bls_timeout_s=args.bls_timeout_s, warmup=not args.no_warmup)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.repository", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--output", type=Path, default=Path("build/model_repository"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    opts = options_from(args)
    path = write_repository(args.output, args.onnx_dir, opts)
    manifest = read_export_manifest(args.onnx_dir)
    print(f"wrote {opts.flavor}/{opts.device} model repository to {path}: {manifest['family']} checkpoint "
          f"{manifest['checkpoint']} (sha256 {manifest['checkpoint_sha256'][:12]}), recipe {manifest['recipe']}")


if __name__ == "__main__":
    main()
