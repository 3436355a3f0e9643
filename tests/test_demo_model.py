"""The committed demo checkpoint (assets/demo-checkpoint, trained by `python -m export.train_demo`)
served by a real tritonserver reaches a fixed IoU floor on held-out generated scenes, training is
deterministic, and the companions (the tokenizer layout, the RefCOCO-layout held-out set, the demo
sample) are what their generators make."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients.metrics import score_expression
from export.demo_scenes import SEMANTIC_TOKEN, demo_sample, expressions, held_out_scenes, random_scene

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = ROOT / "assets" / "demo-checkpoint"
DEMO_IMAGE = ROOT / "assets" / "demo_scene.png"
DEMO_MASK = ROOT / "assets" / "ground_truth" / "demo_scene.png"  # not in assets/: the page lists those
SERVED_SCENES = 3
# Measured on the first SERVED_SCENES held-out scenes with the committed checkpoint (eager, as served):
# all expressions 0.39, colour expressions 0.63; with red and blue swapped: 0.36 and 0.40.  The colour
# floor sits between the two: a BGR/RGB mix-up fails it (test_the_colour_floor_catches_a_swapped_channel).
MEAN_IOU_FLOOR = 0.3
COLOUR_IOU_FLOOR = 0.5


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import XLMRobertaTokenizer

    return XLMRobertaTokenizer.from_pretrained(str(DEMO_CHECKPOINT))


def test_tokenizer_has_semantic_as_an_added_token_and_whole_words(demo_tokenizer):
    import json

    added = json.loads((DEMO_CHECKPOINT / "added_tokens.json").read_text())
    assert list(added) == [SEMANTIC_TOKEN]
    assert demo_tokenizer("[semantic] background")["input_ids"][:2] == [0, added[SEMANTIC_TOKEN]]
    config = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    assert config["beit3"]["vocab_size"] == len(demo_tokenizer) == added[SEMANTIC_TOKEN] + 1
    rng = np.random.default_rng(7)
    words = {w for found in expressions(random_scene(rng), rng).values() for e in found for w in e.text.split()}
    split = [w for w in words - {SEMANTIC_TOKEN} if len(demo_tokenizer.tokenize(w)) != 1]
    assert not split, f"expression words the demo tokenizer splits into pieces: {split}"


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_demo_dataset_is_deterministic_and_reads_as_refcoco(tmp_path):
    from clients.refcoco import ReferSplit
    from export.demo_dataset import split_name, write_dataset

    scenes = held_out_scenes(2)
    write_dataset(tmp_path / "a", scenes)
    write_dataset(tmp_path / "b", held_out_scenes(2))
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    split = ReferSplit(str(tmp_path / "a"), split_name())
    expected = [e for s in scenes for e in s.expressions]
    jobs = split.jobs()
    assert [job.expression.text for job in jobs] == [e.text for e in expected]
    for job, expression in zip(jobs, expected):
        np.testing.assert_array_equal(split.target(job.image, job.expression), expression.mask)
    relation = ReferSplit(str(tmp_path / "a"), split_name("semantic"))
    assert {job.expression.text.split()[0] for job in relation.jobs()} == {SEMANTIC_TOKEN}


def _native_bfloat16() -> bool:
    from export.train_demo import native_bfloat16

    return native_bfloat16()


EMULATED_BFLOAT16 = pytest.mark.skipif(
    not _native_bfloat16(), reason="no native bfloat16 on this CPU: `--precision auto` trains in float32 here, and "
                                   "these 3 steps under emulated bfloat16 take ~3 min")


@pytest.mark.parametrize("bfloat16", [pytest.param(True, marks=EMULATED_BFLOAT16), False],
                         ids=["bfloat16-autocast", "float32"])
def test_training_is_deterministic(tmp_path, bfloat16):
    """Two runs of the first steps (one per stage) from the same seed agree bit for bit."""
    import torch

    from evfsam.modeling.builder import EvfSamConfig, build_evf_sam
    from export.demo_batches import Tokenize
    from export.train_demo import TrainConfig, demo_config, initialise, make_deterministic, train, write_demo_tokenizer

    cfg = TrainConfig(decoder_steps=1, grounding_steps=1, steps=1, prompts=2, grounding_scenes=1, scenes=1,
                      bfloat16=bfloat16)
    tokenizer = write_demo_tokenizer(tmp_path / "tokenizer")
    runs = []
    previous = torch.get_num_threads()
    try:
        for _ in range(2):
            make_deterministic(cfg)
            model = build_evf_sam(EvfSamConfig.from_dict(demo_config(len(tokenizer))))
            initialise(model)
            rows = train(model, Tokenize(tokenizer), cfg, log=lambda _line: None)
            runs.append([{k: v for k, v in row.items() if k != "seconds"} for row in rows])
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(previous)
    assert [row["stage"] for row in runs[0]] == ["decoder", "grounding", "end-to-end"]
    assert runs[0] == runs[1]


def test_precision_auto_follows_the_cpu_and_says_when_it_falls_back():
    """Emulated bfloat16 is several times slower than float32: `auto` takes it only where the CPU has it natively."""
    from export.train_demo import native_bfloat16, parse_args, resolve_precision

    said = []
    assert resolve_precision("bfloat16", said.append) is True
    assert resolve_precision("float32", said.append) is False and not said
    assert resolve_precision("auto", said.append) is native_bfloat16()
    assert bool(said) is not native_bfloat16()
    assert parse_args(["--precision", "float32"])[1].bfloat16 is False


def test_committed_demo_sample_is_the_generated_one():
    rgb, expression = demo_sample()
    np.testing.assert_array_equal(np.asarray(Image.open(DEMO_IMAGE).convert("RGB")), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(DEMO_MASK)) > 0, expression.mask.astype(bool))


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    from export.__main__ import parse_args, run
    from serving.repository import RepositoryOptions, write_repository
    from tests.conftest import TEST_CACHE_BYTES, start_server

    onnx_dir = tmp_path_factory.mktemp("demo_onnx")
    run(parse_args(["--checkpoint", str(DEMO_CHECKPOINT), "--output-dir", str(onnx_dir)]))
    repository = write_repository(tmp_path_factory.mktemp("demo_repo") / "model_repository", onnx_dir,
                                  RepositoryOptions(flavor="python-ort", ort_threads=1, cache_bytes=TEST_CACHE_BYTES))
    running = start_server(repository, DEMO_CHECKPOINT, tmp_path_factory.mktemp("demo_logs") / "tritonserver.log")
    yield running
    running.server.stop()


@pytest.mark.triton
def test_served_masks_reach_the_iou_floor(demo_server):
    """Every expression of the first SERVED_SCENES held-out scenes (JPEG, as a client sends them) through
    the served pipeline: decoding, both image views, tokenization, BEiT-3, the mask decoder and the
    resize back, with floors below what the committed checkpoint measures."""
    from clients.client import SegmentationClient

    scenes = held_out_scenes(SERVED_SCENES)
    expressions_ = [e for scene in scenes for e in scene.expressions]
    requests = [(scene.image, e.text) for scene in scenes for e in scene.expressions]
    with SegmentationClient(demo_server.grpc_url) as client:
        results = list(client.segment_many(requests))
    ious = [score_expression(r.mask, e.mask).iou for r, e in zip(results, expressions_)]
    by_type = {}
    for expression, iou in zip(expressions_, ious):
        by_type.setdefault(expression.kind, []).append(round(iou, 3))
    colour = [iou for e, iou in zip(expressions_, ious) if e.kind == "colour"]
    assert np.mean(ious) >= MEAN_IOU_FLOOR, by_type
    assert np.mean(colour) >= COLOUR_IOU_FLOOR, by_type


def _colour_iou(model, tokenize, scenes, swap_channels: bool) -> float:
    """Mean IoU of the colour expressions with the served preprocessing (eager graphs), optionally on
    images whose red and blue channels were swapped before encoding (a BGR/RGB mix-up)."""
    import cv2

    from export.train_demo import served_masks

    ious = []
    for scene in scenes:
        image = scene.image
        if swap_channels:
            rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
            image = cv2.imencode(".png", rgb)[1].tobytes()  # cv2 writes BGR: red and blue trade places
        colour = [e for e in scene.expressions if e.kind == "colour"]
        masks = served_masks(model, image, [e.text for e in colour], tokenize)
        ious += [score_expression(m, e.mask).iou for m, e in zip(masks, colour)]
    return float(np.mean(ious))


def test_the_colour_floor_catches_a_swapped_channel(demo_tokenizer):
    """The served test's colour floor has teeth: the same checkpoint and preprocessing, fed images with
    red and blue swapped, falls below it (and without the swap clears it)."""
    from evfsam.checkpoint import load_evf_sam
    from export.demo_batches import Tokenize

    model = load_evf_sam(DEMO_CHECKPOINT)[0].float().eval()
    scenes = held_out_scenes(SERVED_SCENES)
    tokenize = Tokenize(demo_tokenizer)
    assert _colour_iou(model, tokenize, scenes, swap_channels=False) >= COLOUR_IOU_FLOOR
    assert _colour_iou(model, tokenize, scenes, swap_channels=True) < COLOUR_IOU_FLOOR
