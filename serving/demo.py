"""`make demo`: serve the generated repository, send one real request, write the mask and an overlay.

    python -m serving.demo --repository build/model_repository --image assets/demo_scene.png \
        --prompt "the red triangle" --output-dir demo_output [--demo-model] [--ground-truth MASK.png]
        [--random-weights]

With `--ground-truth` (a 0/255 PNG mask of the image's size whose text chunk "prompt" names the prompt
it answers) it prints the served mask's IoU against it, when the prompt is that one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clients.metrics import score_expression
from evfsam.processing import decode_image
from evfsam.specs import EVF_SAM

from .server import ServerError, TritonServer

BANNER = """
############################################################################################
#  DEMO CHECKPOINT WITH RANDOM WEIGHTS: the pipeline is real, the mask is MEANINGLESS.     #
#  For real masks: make demo CHECKPOINT=YxZhang/evf-sam   (or a local checkpoint directory) #
############################################################################################
"""
DEMO_MODEL_BANNER = """
############################################################################################
#  SMALL DEMO MODEL trained on synthetic coloured shapes (assets/demo-checkpoint/TRAINING.md): #
#  it knows only scenes like assets/demo_scene.png, and segments even those poorly.       #
#  For real images serve a real checkpoint (a hub id or a local checkpoint directory):      #
#  make demo CHECKPOINT=YxZhang/evf-sam2 IMAGE=path/to/photo.jpg PROMPT="zebra top left"     #
############################################################################################
"""
OVERLAY_COLOR = np.array([50, 120, 220])  # upstream inference.py's highlight colour


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Upstream's visualisation: masked pixels become 0.5 * image + 0.5 * colour."""
    out = rgb.copy()
    selected = mask.astype(bool)
    out[selected] = (rgb * 0.5 + mask[:, :, None].astype(np.uint8) * OVERLAY_COLOR * 0.5)[selected]
    return out


def ground_truth_iou(path: Path, prompt: str, mask: np.ndarray) -> dict:
    with Image.open(path) as image:
        truth_prompt = image.text.get("prompt")
        truth = (np.asarray(image.convert("L")) > 0).astype(np.uint8)
    if truth_prompt != prompt:
        return {"iou_vs_ground_truth": None, "ground_truth": f"{path} answers {truth_prompt!r}, not this prompt"}
    return {"iou_vs_ground_truth": round(score_expression(mask, truth).iou, 4), "ground_truth": str(path)}


def request(server: TritonServer, image: bytes, prompt: str):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for spec, value in zip(EVF_SAM.inputs, (image, prompt.encode("utf-8"))):
        tensor = grpcclient.InferInput(spec.name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]], dtype=object))
        inputs.append(tensor)
    result = client.infer(EVF_SAM.name, inputs)
    mask_name, score_name = (t.name for t in EVF_SAM.outputs)
    return result.as_numpy(mask_name)[0], float(result.as_numpy(score_name)[0, 0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("build/model_repository"))
    parser.add_argument("--image", type=Path, default=Path("assets/sample.jpg"))
    parser.add_argument("--prompt", default="zebra top left")
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--random-weights", action="store_true", help="print the meaningless-mask warning")
    parser.add_argument("--demo-model", action="store_true", help="say that the model is the synthetic-shapes demo")
    parser.add_argument("--ground-truth", type=Path, help="the prompt's true mask (PNG): print the served mask's IoU")
    args = parser.parse_args(argv)
    banner = BANNER if args.random_weights else DEMO_MODEL_BANNER if args.demo_model else ""
    print(banner, flush=True)
    image = args.image.read_bytes()
    server = TritonServer(args.repository, args.http_port, args.grpc_port, args.metrics_port,
                          log_file=args.output_dir / "tritonserver.log")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"starting tritonserver on {server.grpc_url} (log: {server.log_file}) ...", flush=True)
    try:
        with server:
            started = time.perf_counter()
            mask, score = request(server, image, args.prompt)
            latency = time.perf_counter() - started
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rgb = decode_image(image)
    Image.fromarray(mask * 255).save(args.output_dir / "mask.png")
    Image.fromarray(overlay(rgb, mask)).save(args.output_dir / "overlay.png")
    summary = {"image": str(args.image), "prompt": args.prompt, "score": score, "mask_shape": list(mask.shape),
               "foreground_fraction": float(mask.mean()), "latency_s": round(latency, 3),
               "random_weights": args.random_weights}
    if args.ground_truth is not None:
        summary.update(ground_truth_iou(args.ground_truth, args.prompt, mask))
    (args.output_dir / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output_dir / 'mask.png'} and {args.output_dir / 'overlay.png'}; server stopped")
    print(banner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
