"""The RefCOCO evaluation client on a small synthetic dataset written in the real on-disk format.

Reader and metric tests need no server: the metric math is checked against a line-by-line numpy
transcription of upstream's `validate` + `intersectionAndUnionGPU` + `AverageMeter` (kept separate
from `clients.metrics` on purpose), fed with predictions from a fake client.  The `triton` tests run
`python -m clients.evaluate` against the real tritonserver and recompute cIoU / gIoU in the test
from masks the test fetches itself and from the PyTorch reference.
"""
from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from clients import DatasetError, SegmentationClient
from clients.contract import Segmentation
from clients.evaluate import Evaluation, format_table, progress_path
from clients.images import decode_rgb
from clients.metrics import ExpressionScore, IoUAccumulator, score_expression
from clients.refcoco import ReferSplit, SplitName, rasterise
from evfsam.specs import EVF_SAM, SAM_IMAGE_ENCODER
from tests.images import encode, scene

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_SUBDIR = Path("refer_seg/images/mscoco/images/train2014")


# ---------------------------------------------------------------- the synthetic dataset


@dataclass
class SyntheticRef:
    ref_id: int
    ann_id: int
    image_id: int
    split: str
    sentences: List[str]
    sent_ids: List[int]


@dataclass
class SyntheticRefcoco:
    """What the test wrote, kept on the test's side to compute the expected numbers independently."""

    root: Path
    images: Dict[int, dict] = field(default_factory=dict)  # id -> COCO image record
    annotations: Dict[int, dict] = field(default_factory=dict)  # id -> COCO annotation record
    refs: List[SyntheticRef] = field(default_factory=list)

    def expressions(self, *ref_splits: str) -> List[Tuple[int, int, str]]:
        """(image_id, ann_id, prompt) of every expression of refs with these splits, grouped by image."""
        by_image: Dict[int, List[Tuple[int, int, str]]] = {}
        for ref in self.refs:
            if ref.split in ref_splits:
                for sentence in ref.sentences:
                    by_image.setdefault(ref.image_id, []).append((ref.image_id, ref.ann_id, sentence.strip().lower()))
        return [expression for group in by_image.values() for expression in group]

    def image_path(self, image_id: int) -> Path:
        return self.root / IMAGE_SUBDIR / self.images[image_id]["file_name"]

    def rgb(self, image_id: int) -> np.ndarray:
        return decode_rgb(self.image_path(image_id).read_bytes())

    def target(self, ann_id: int) -> np.ndarray:
        """upstream ValDataset, transcribed: frPyObjects / RLE -> decode -> sum(axis=2) -> uint8."""
        ann = self.annotations[ann_id]
        image = self.images[ann["image_id"]]
        segmentation = ann["segmentation"]
        if len(segmentation) == 0:
            return np.zeros((image["height"], image["width"]), np.uint8)
        if isinstance(segmentation[0], list):
            rle = coco_mask.frPyObjects(segmentation, image["height"], image["width"])
        else:
            rle = [{"size": r["size"], "counts": r["counts"].encode()} for r in segmentation]
        return np.sum(coco_mask.decode(rle), axis=2).astype(np.uint8)


def rectangle(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


# image id -> (height, width, [(ann_id, category, segmentation), ...])
def _annotations_of(height: int, width: int, base: int):
    ring = np.array([[0.5 * width + 0.3 * width * np.cos(a), 0.5 * height + 0.3 * height * np.sin(a)]
                     for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)])
    return [
        (base + 1, 1, [rectangle(0.1 * width, 0.2 * height, 0.5 * width, 0.7 * height)]),
        (base + 2, 2, [ring.reshape(-1).round(2).tolist()]),
        # two overlapping polygons of one object: the overlap holds 2 in upstream's target
        (base + 3, 3, [rectangle(0.55 * width, 0.1 * height, 0.95 * width, 0.5 * height),
                       rectangle(0.7 * width, 0.3 * height, 0.9 * width, 0.9 * height)]),
    ]


SPLIT_PLAN = {  # image id -> (height, width, split of its refs)
    101: (96, 128, "val"),
    102: (120, 90, "val"),
    103: (64, 160, "val"),
    104: (100, 100, "testA"),
    105: (80, 120, "testB"),
    106: (70, 70, "train"),
}
SENTENCES = [
    ["The LEFT box  ", "a square on the left"],
    ["round thing in the middle"],
    ["  Right Object", "the shape on the right", "upper right"],
]


def write_synthetic_refcoco(root: Path) -> SyntheticRefcoco:
    """refer_seg/refcoco/{refs(unc).p, instances.json} and train2014 JPEGs, as the real files are."""
    dataset = SyntheticRefcoco(root)
    (root / IMAGE_SUBDIR).mkdir(parents=True)
    (root / "refer_seg/refcoco").mkdir(parents=True)
    sent_id = 1000
    for image_id, (height, width, split) in SPLIT_PLAN.items():
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        dataset.images[image_id] = {"id": image_id, "file_name": file_name, "height": height, "width": width,
                                    "license": 1, "coco_url": "", "flickr_url": "", "date_captured": ""}
        (root / IMAGE_SUBDIR / file_name).write_bytes(encode(scene(height, width, seed=image_id), "JPEG", quality=90))
        annotations = _annotations_of(height, width, image_id * 10)
        for (ann_id, category, segmentation), sentences in zip(annotations, SENTENCES):
            dataset.annotations[ann_id] = _annotation(ann_id, image_id, category, segmentation, height, width)
            sent_ids = list(range(sent_id, sent_id + len(sentences)))
            sent_id += len(sentences)
            dataset.refs.append(SyntheticRef(ann_id + 5000, ann_id, image_id, split, sentences, sent_ids))
    _add_special_cases(dataset)
    _write_files(dataset)
    return dataset


def _add_special_cases(dataset: SyntheticRefcoco) -> None:
    """An annotation without segmentation (an all-empty target) and one stored as an RLE list."""
    height, width = SPLIT_PLAN[102][:2]
    dataset.annotations[9001] = {**_annotation(9001, 102, 1, [], height, width), "area": 0.0}
    dataset.refs.append(SyntheticRef(9901, 9001, 102, "val", ["nothing here"], [9990]))
    block = np.zeros((height, width), np.uint8, order="F")
    block[10:40, 5:25] = 1
    rle = coco_mask.encode(block)
    rle_segmentation = [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}]
    dataset.annotations[9002] = _annotation(9002, 102, 2, rle_segmentation, height, width)
    dataset.refs.append(SyntheticRef(9902, 9002, 102, "val", ["The Small Block"], [9991]))


def _annotation(ann_id, image_id, category, segmentation, height, width) -> dict:
    area, bbox = 0.0, [0.0, 0.0, 0.0, 0.0]
    if segmentation and isinstance(segmentation[0], list):
        rles = coco_mask.frPyObjects(segmentation, height, width)
        merged = coco_mask.merge(rles)
        area, bbox = float(coco_mask.area(merged)), [float(v) for v in coco_mask.toBbox(merged)]
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": segmentation,
            "area": area, "bbox": bbox, "iscrowd": 0}


def _write_files(dataset: SyntheticRefcoco) -> None:
    refs = [
        {
            "ref_id": ref.ref_id, "ann_id": ref.ann_id, "image_id": ref.image_id, "split": ref.split,
            "category_id": dataset.annotations[ref.ann_id]["category_id"],
            "file_name": f"COCO_train2014_{ref.image_id:012d}_{ref.ann_id}.jpg",  # as in the real refs files
            "sent_ids": ref.sent_ids,
            "sentences": [
                {"tokens": sentence.strip().lower().split(), "raw": sentence, "sent_id": sent_id,
                 "sent": sentence.strip().lower() if i % 2 else sentence}
                for i, (sentence, sent_id) in enumerate(zip(ref.sentences, ref.sent_ids))
            ],
        }
        for ref in dataset.refs
    ]
    data_dir = dataset.root / "refer_seg/refcoco"
    (data_dir / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {
        "info": {}, "licenses": [],
        "images": list(dataset.images.values()),
        "annotations": list(dataset.annotations.values()),
        "categories": [{"id": i, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(["box", "ring", "pair"], 1)],
    }
    (data_dir / "instances.json").write_text(json.dumps(instances))


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory) -> SyntheticRefcoco:
    return write_synthetic_refcoco(tmp_path_factory.mktemp("dataset"))


# ---------------------------------------------------------------- upstream's metric, transcribed


def upstream_intersection_and_union(output: np.ndarray, target: np.ndarray, k: int = 2, ignore_index: int = 255):
    """utils/utils.py intersectionAndUnionGPU with numpy: np.histogram over [0, K-1] drops what
    torch.histc drops (values outside the range)."""
    output = output.astype(np.int64).reshape(-1).copy()
    target = target.astype(np.int64).reshape(-1)
    output[target == ignore_index] = ignore_index
    intersection = output[output == target]

    def histc(values):
        return np.histogram(values, bins=k, range=(0, k - 1))[0].astype(np.float64)

    area_intersection, area_output, area_target = histc(intersection), histc(output), histc(target)
    return area_intersection, area_output + area_target - area_intersection, area_target


def upstream_validate(batches: List[Tuple[List[np.ndarray], List[np.ndarray]]]) -> Tuple[float, float]:
    """eval.py validate(): one batch per image, (predictions, targets) of its expressions."""
    meters = {"intersection": [0.0, 0], "union": [0.0, 0], "acc_iou": [0.0, 0]}  # AverageMeter sum, count

    def update(name, value, n=1):
        meters[name][0] += value * n
        meters[name][1] += n

    for predictions, targets in batches:
        intersection, union, acc_iou = 0.0, 0.0, 0.0
        for mask_i, output_i in zip(targets, predictions):
            intersection_i, union_i, _ = upstream_intersection_and_union(output_i, mask_i)
            intersection += intersection_i
            union += union_i
            acc_iou += intersection_i / (union_i + 1e-10)
            acc_iou[union_i == 0] += 1.0
        acc_iou = acc_iou / len(targets)
        update("intersection", intersection)
        update("union", union)
        update("acc_iou", acc_iou, n=len(targets))
    iou_class = meters["intersection"][0] / (meters["union"][0] + 1e-10)
    giou = meters["acc_iou"][0] / (meters["acc_iou"][1] + 1e-5)  # all_reduce: sum / (count + 1e-5)
    return float(giou[1]), float(iou_class[1])


def expected_metrics(dataset: SyntheticRefcoco, ref_splits, predict: Callable, limit: int = None):
    """(giou, ciou, count) from the test's own records, the prediction function and upstream's math."""
    expressions = dataset.expressions(*ref_splits)[:limit]
    batches: Dict[int, Tuple[list, list]] = {}
    for image_id, ann_id, prompt in expressions:
        predictions, targets = batches.setdefault(image_id, ([], []))
        predictions.append(predict(dataset.rgb(image_id), prompt))
        targets.append(dataset.target(ann_id))
    giou, ciou = upstream_validate(list(batches.values()))
    return giou, ciou, len(expressions)


# ---------------------------------------------------------------- predictions without a server


def fake_prediction(rgb: np.ndarray, prompt: str) -> np.ndarray:
    """Deterministic masks of varied overlap with the targets; empty for 'nothing here'."""
    if prompt == "nothing here":
        return np.zeros(rgb.shape[:2], np.uint8)
    threshold = 40 + (sum(map(ord, prompt)) % 150)
    return (rgb[:, :, sum(map(ord, prompt)) % 3] > threshold).astype(np.uint8)


class FakeClient:
    """Stands in for AsyncSegmentationClient in metric and resume tests (never for the server)."""

    def __init__(self, predict=fake_prediction, fail_after: int = None):
        self.predict = predict
        self.fail_after = fail_after
        self.prompts: List[str] = []

    async def segment_many(self, requests):
        for image, prompt in requests:
            if self.fail_after is not None and len(self.prompts) >= self.fail_after:
                raise ConnectionAbortedError("the fake connection dropped")
            self.prompts.append(prompt)
            yield Segmentation(prompt, self.predict(decode_rgb(image), prompt), 0.5)


def run_fake(dataset, tmp_path, split="refcoco|unc|val", client=None, **prepare):
    evaluation = Evaluation.prepare(str(dataset.root), split, str(tmp_path / "results.json"),
                                    show_progress=False, **prepare)
    client = client or FakeClient()
    try:
        asyncio.run(evaluation.run(client))
    finally:
        evaluation.log.close()
    return evaluation, client


# ---------------------------------------------------------------- the reader


def test_split_names():
    assert str(SplitName.parse("refcoco+|unc|testA")) == "refcoco+|unc|testA"
    for bad, message in [("refcoco|unc", "is not of the form dataset|split_by|split"),
                         ("coco|unc|val", "unknown dataset 'coco'"),
                         ("refcoco|unc|dev", "unknown split 'dev'")]:
        with pytest.raises(DatasetError, match=message):
            SplitName.parse(bad)


@pytest.mark.parametrize(
    "split, selected",
    [
        ("testA", ["testA", "testAB", "testAC"]),  # REFER: split[-1] in ref["split"]
        ("testB", ["testB", "testAB", "testBC"]),
        ("testC", ["testC", "testBC", "testAC"]),
        ("test", ["test", "testA", "testB", "testC", "testAB", "testBC", "testAC"]),  # "test" in ref["split"]
        ("testAB", ["testAB"]),
        ("val", ["val"]),
        ("train", ["train"]),
    ],
)
def test_split_selection_is_refers(split, selected):
    candidates = ["train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC"]
    name = SplitName("refcoco", "unc", split)
    assert [c for c in candidates if name.selects(c)] == [c for c in candidates if c in selected]


def test_reader_finds_images_expressions_and_prompts(refcoco):
    split = ReferSplit(str(refcoco.root), "refcoco|unc|val")
    assert [image.image_id for image in split.images] == [101, 102, 103]
    expected = refcoco.expressions("val")
    jobs = split.jobs()
    assert [(j.image.image_id, j.expression.ann_id, j.expression.text) for j in jobs] == expected
    assert split.expression_count == len(expected) == 6 * 3 + 2
    assert "the left box" in [j.expression.text for j in jobs]  # strip().lower() of "The LEFT box  "
    first = split.images[0]
    assert first.path == str(refcoco.image_path(101))
    assert (first.height, first.width) == (96, 128)
    assert [j.index for j in jobs] == list(range(len(jobs)))
    assert len({j.expression.key for j in jobs}) == len(jobs)


def test_other_splits(refcoco):
    assert [i.image_id for i in ReferSplit(str(refcoco.root), "refcoco|unc|testA").images] == [104]
    assert [i.image_id for i in ReferSplit(str(refcoco.root), "refcoco|unc|testB").images] == [105]
    assert [i.image_id for i in ReferSplit(str(refcoco.root), "refcoco|unc|test").images] == [104, 105]


def test_targets_are_upstreams_rasterisation(refcoco):
    split = ReferSplit(str(refcoco.root), "refcoco|unc|val")
    for job in split.jobs():
        target = split.target(job.image, job.expression)
        np.testing.assert_array_equal(target, refcoco.target(job.expression.ann_id))
        assert target.shape == (job.image.height, job.image.width) and target.dtype == np.uint8
    overlapping = refcoco.target(1013)
    assert overlapping.max() == 2  # two polygons of one object overlap


def test_a_rectangle_polygon_covers_its_area():
    target = rasterise([rectangle(10, 20, 50, 60)], 100, 100)
    assert abs(int(target.sum()) - 40 * 40) <= 2 * 40 + 1
    assert target[40, 30] == 1 and target[5, 5] == 0


def test_rle_dict_segmentation_is_read():
    block = np.zeros((30, 40), np.uint8, order="F")
    block[5:10, 6:20] = 1
    rle = coco_mask.encode(block)
    np.testing.assert_array_equal(rasterise({"size": [30, 40], "counts": rle["counts"].decode()}, 30, 40), block)
    uncompressed = {"size": [30, 40], "counts": [35, 10, 1155]}  # column-major runs: 35 zeros, 10 ones, ...
    expected = np.zeros((30, 40), np.uint8)
    expected[5:15, 1] = 1
    np.testing.assert_array_equal(rasterise(uncompressed, 30, 40), expected)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "refer_seg/refcoco/refs(unc).p").unlink(), "refs file not found: "),
        (lambda root: (root / "refer_seg/refcoco/instances.json").write_text("{"), "cannot read instances file "),
        (lambda root: (root / "refer_seg/refcoco/refs(unc).p").write_bytes(pickle.dumps([os.stat_result(range(10))])),
         "refs files hold only plain data, found a reference to os.stat_result"),
        (lambda root: (root / "refer_seg/refcoco/refs(unc).p").write_bytes(pickle.dumps([])),
         "no refs of split 'val' in "),
    ],
)
def test_broken_datasets_fail_clearly(tmp_path, damage, message):
    dataset = write_synthetic_refcoco(tmp_path / "dataset")
    damage(dataset.root)
    with pytest.raises(DatasetError) as error:
        ReferSplit(str(dataset.root), "refcoco|unc|val")
    assert message in str(error.value)


def test_missing_image_fails_when_it_is_read(tmp_path):
    dataset = write_synthetic_refcoco(tmp_path / "dataset")
    dataset.image_path(102).unlink()
    with pytest.raises(DatasetError, match=f"cannot read image 102: {dataset.image_path(102)}"):
        run_fake(dataset, tmp_path)


# ---------------------------------------------------------------- the metric


def test_expression_score_is_upstreams_class_1():
    rng = np.random.default_rng(0)
    for _ in range(50):
        target = rng.choice([0, 1, 2, 255], size=(17, 23), p=[0.5, 0.35, 0.1, 0.05]).astype(np.uint8)
        prediction = rng.integers(0, 2, size=(17, 23), dtype=np.uint8)
        score = score_expression(prediction, target)
        intersection, union, _ = upstream_intersection_and_union(prediction, target)
        assert (score.intersection, score.union) == (intersection[1], union[1])


def test_both_empty_counts_one_and_a_miss_counts_zero():
    empty = np.zeros((5, 5), np.uint8)
    full = np.ones((5, 5), np.uint8)
    assert score_expression(empty, empty).iou == 1.0
    assert score_expression(full, empty).iou == 0.0
    assert score_expression(empty, full).iou == 0.0
    assert score_expression(full, full).iou == pytest.approx(1.0, abs=1e-9)


def test_accumulator_matches_upstream_on_random_batches():
    rng = np.random.default_rng(1)
    batches, accumulator = [], IoUAccumulator()
    for _ in range(12):
        count = int(rng.integers(1, 5))
        shape = tuple(rng.integers(5, 30, size=2))
        targets = [(rng.random(shape) < rng.random()).astype(np.uint8) * int(rng.integers(0, 2)) for _ in range(count)]
        predictions = [(rng.random(shape) < rng.random()).astype(np.uint8) for _ in range(count)]
        batches.append((predictions, targets))
        for prediction, target in zip(predictions, targets):
            accumulator.add(score_expression(prediction, target))
    giou, ciou = upstream_validate(batches)
    assert accumulator.giou == pytest.approx(giou, rel=1e-12)
    assert accumulator.ciou == pytest.approx(ciou, rel=1e-12)


def test_ciou_weighs_pixels_and_giou_weighs_expressions():
    accumulator = IoUAccumulator()
    accumulator.add(ExpressionScore(intersection=90, union=100))  # big object, good
    accumulator.add(ExpressionScore(intersection=0, union=10))  # small object, missed
    assert accumulator.ciou == pytest.approx(90 / 110)
    assert accumulator.giou == pytest.approx(0.45, rel=1e-5)


# ---------------------------------------------------------------- the evaluation, with a fake client


@pytest.mark.parametrize("split, ref_splits", [("refcoco|unc|val", ["val"]), ("refcoco|unc|test", ["testA", "testB"])])
def test_evaluation_reproduces_upstreams_numbers(refcoco, tmp_path, split, ref_splits):
    evaluation, client = run_fake(refcoco, tmp_path, split)
    summary = evaluation.summary({"url": "fake"})
    giou, ciou, count = expected_metrics(refcoco, ref_splits, fake_prediction)
    assert summary["count"] == count == len(client.prompts)
    assert summary["giou"] == pytest.approx(giou, rel=1e-12)
    assert summary["ciou"] == pytest.approx(ciou, rel=1e-12)
    assert 0.0 < summary["ciou"] < 1.0 and 0.0 < summary["giou"] < 1.0
    assert summary["complete"] and summary["split"] == split


def test_the_empty_target_with_empty_prediction_scores_one(refcoco, tmp_path):
    evaluation, _ = run_fake(refcoco, tmp_path)
    (job,) = [job for job in evaluation.jobs if job.expression.text == "nothing here"]
    assert evaluation.log.scores[job.index].iou == 1.0


def test_limit_takes_the_first_expressions(refcoco, tmp_path):
    evaluation, client = run_fake(refcoco, tmp_path, limit=4)
    giou, ciou, count = expected_metrics(refcoco, ["val"], fake_prediction, limit=4)
    summary = evaluation.summary({})
    assert (summary["count"], len(client.prompts)) == (4, 4)
    assert (summary["giou"], summary["ciou"]) == (pytest.approx(giou, rel=1e-12), pytest.approx(ciou, rel=1e-12))
    assert not summary["complete"]


def test_an_interrupted_run_resumes_where_it_stopped(refcoco, tmp_path):
    with pytest.raises(ConnectionAbortedError):
        run_fake(refcoco, tmp_path, client=FakeClient(fail_after=7))
    lines = Path(progress_path(str(tmp_path / "results.json"))).read_text().splitlines()
    assert len(lines) == 1 + 7
    with open(progress_path(str(tmp_path / "results.json")), "a") as handle:
        handle.write('{"index": 7, "key": "torn')  # killed mid-write
    evaluation, client = run_fake(refcoco, tmp_path)
    total = refcoco.expressions("val")
    assert len(client.prompts) == len(total) - 7
    assert client.prompts == [prompt for _, _, prompt in total[7:]]
    giou, ciou, count = expected_metrics(refcoco, ["val"], fake_prediction)
    summary = evaluation.summary({})
    assert summary["count"] == count
    assert (summary["giou"], summary["ciou"]) == (pytest.approx(giou, rel=1e-12), pytest.approx(ciou, rel=1e-12))
    assert summary["throughput"]["evaluated_this_run"] == len(total) - 7


def test_restart_and_foreign_progress_files(refcoco, tmp_path):
    with pytest.raises(ConnectionAbortedError):
        run_fake(refcoco, tmp_path, client=FakeClient(fail_after=3))
    with pytest.raises(DatasetError, match="is for split 'refcoco|unc|val', not 'refcoco|unc|testA'"):
        run_fake(refcoco, tmp_path, split="refcoco|unc|testA")
    _, client = run_fake(refcoco, tmp_path, restart=True)
    assert len(client.prompts) == len(refcoco.expressions("val"))


def test_results_table():
    table = format_table({"split": "refcoco|unc|val", "count": 20, "ciou": 0.81234, "giou": 0.5,
                          "throughput": {"expressions_per_s": 12.5}})
    assert table.splitlines()[1].split() == ["refcoco|unc|val", "20", "81.23", "50.00", "12.50"]


# ---------------------------------------------------------------- the command line without a server


def run_evaluate(*args, timeout=600, **popen):
    return subprocess.run(
        [sys.executable, "-m", "clients.evaluate", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, **popen,
    )


def test_cli_missing_dataset_exits_2(tmp_path):
    done = run_evaluate("--url", "127.0.0.1:1", "--dataset-dir", str(tmp_path), "--split", "refcoco|unc|val",
                        "--output", str(tmp_path / "r.json"))
    assert done.returncode == 2
    assert done.stderr == f"error: refs file not found: {tmp_path}/refer_seg/refcoco/refs(unc).p\n"


def test_cli_bad_split_exits_2(refcoco, tmp_path):
    done = run_evaluate("--url", "127.0.0.1:1", "--dataset-dir", str(refcoco.root), "--split", "refcoco-val",
                        "--output", str(tmp_path / "r.json"))
    assert done.returncode == 2 and done.stderr.startswith("error: split 'refcoco-val' is not of the form")


def test_cli_unreachable_server_exits_3_and_keeps_nothing_half_done(refcoco, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = run_evaluate("--url", f"127.0.0.1:{port}", "--dataset-dir", str(refcoco.root), "--split",
                        "refcoco|unc|val", "--output", str(tmp_path / "r.json"), "--no-progress")
    assert done.returncode == 3
    assert done.stderr.startswith(f"error: cannot reach the Triton server at 127.0.0.1:{port} over grpc: ")
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- against the real server


def served_prediction(url: str, protocol: str):
    client = SegmentationClient(url, protocol=protocol)

    def predict(rgb, prompt):
        return client.segment(rgb, prompt).mask

    return predict, client


@pytest.mark.triton
@pytest.mark.parametrize(
    "protocol, split, ref_splits",
    [("grpc", "refcoco|unc|val", ["val"]), ("http", "refcoco|unc|test", ["testA", "testB"])],
)
def test_cli_evaluates_the_served_model(triton_server, reference_pipeline, refcoco, tmp_path, protocol, split,
                                        ref_splits):
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    output = tmp_path / "results.json"
    done = run_evaluate("--url", url, "--protocol", protocol, "--dataset-dir", str(refcoco.root),
                        "--split", split, "--output", str(output), "--concurrency", "4")
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text())
    assert results["split"] == split and results["complete"]
    assert results["count"] == len(refcoco.expressions(*ref_splits))
    assert results["throughput"]["expressions_per_s"] > 0
    assert results["server"] == {"url": url, "protocol": protocol, "model": EVF_SAM.name, "concurrency": 4}
    assert not Path(progress_path(str(output))).exists()
    assert done.stdout.splitlines()[1].split()[:2] == [split, str(results["count"])]
    assert split in done.stderr  # the progress bar

    predict, client = served_prediction(url, protocol)
    with client:
        giou, ciou, _ = expected_metrics(refcoco, ref_splits, predict)
    # the same server asked again: equal, up to a boundary pixel moved by different batching
    assert results["giou"] == pytest.approx(giou, abs=2e-3)
    assert results["ciou"] == pytest.approx(ciou, abs=2e-3)
    reference = expected_metrics(refcoco, ref_splits, lambda rgb, prompt: reference_pipeline(rgb, prompt)[0])
    assert results["giou"] == pytest.approx(reference[0], abs=1e-2)
    assert results["ciou"] == pytest.approx(reference[1], abs=1e-2)


@pytest.mark.triton
def test_cli_limit(triton_server, refcoco, tmp_path):
    output = tmp_path / "results.json"
    done = run_evaluate("--url", triton_server.http_url, "--protocol", "http", "--dataset-dir", str(refcoco.root),
                        "--split", "refcoco|unc|testA", "--output", str(output), "--limit", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text())
    assert (results["count"], results["complete"]) == (2, False)
    assert done.stderr == ""


@pytest.mark.triton
def test_cli_server_error_names_the_image_and_exits_6(triton_server, tmp_path):
    dataset = write_synthetic_refcoco(tmp_path / "dataset")
    dataset.image_path(104).write_bytes(b"\xff\xd8\xff\xe0 a truncated JPEG")
    done = run_evaluate("--url", triton_server.grpc_url, "--dataset-dir", str(dataset.root), "--split",
                        "refcoco|unc|testA", "--output", str(tmp_path / "r.json"), "--no-progress")
    assert done.returncode == 6
    assert done.stderr.startswith("error: the server failed the request: ")
    assert done.stderr.rstrip().endswith(f"(image 104, {dataset.image_path(104)}, expression 'the left box')")
    assert done.stderr.count("\n") == 1


@pytest.mark.triton
def test_cli_contract_mismatch_exits_5(triton_server, refcoco, tmp_path):
    done = run_evaluate("--url", triton_server.http_url, "--protocol", "http", "--dataset-dir", str(refcoco.root),
                        "--split", "refcoco|unc|testA", "--output", str(tmp_path / "r.json"),
                        "--model", SAM_IMAGE_ENCODER.name, "--no-progress")
    assert done.returncode == 5
    expected = f"error: served model {SAM_IMAGE_ENCODER.name!r} does not match the client contract: "
    assert done.stderr.startswith(expected)


@pytest.mark.triton
def test_cli_timeout_exits_4(triton_server, refcoco, tmp_path):
    done = run_evaluate("--url", triton_server.http_url, "--protocol", "http", "--dataset-dir", str(refcoco.root),
                        "--split", "refcoco|unc|testA", "--output", str(tmp_path / "r.json"), "--timeout", "0.1",
                        "--no-progress")
    assert done.returncode == 4
    url = triton_server.http_url
    assert done.stderr == f"error: no answer from the Triton server at {url} over http within 0.1 s\n"


@pytest.mark.triton
def test_cli_interrupted_then_resumed(triton_server, refcoco, tmp_path):
    output = tmp_path / "results.json"
    progress = Path(progress_path(str(output)))
    args = ["--url", triton_server.grpc_url, "--dataset-dir", str(refcoco.root), "--split", "refcoco|unc|test",
            "--output", str(output), "--concurrency", "2", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "clients.evaluate", *args], cwd=REPO_ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)  # stops sending, waits for the 2 in flight: no gRPC cancellation
    _, stderr = process.communicate(timeout=60)
    total = len(refcoco.expressions("testA", "testB"))
    if process.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert process.returncode == 130
    saved = len(progress.read_text().splitlines()) - 1
    assert 2 <= saved < total
    assert stderr.strip().splitlines()[-1] == (
        f"error: interrupted; {saved} of {total} expressions are saved in {progress}: "
        "run the same command again to resume"
    )
    assert not output.exists()

    done = run_evaluate(*args)  # the server survived the interruption, and the run resumes
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text())
    assert results["count"] == total
    assert results["throughput"]["evaluated_this_run"] == total - saved
