"""RefCOCO / RefCOCO+ / RefCOCOg read from disk exactly as upstream's `eval.py` reads them.

Layout under the dataset directory (upstream's `--dataset_dir`):

    refer_seg/<dataset>/refs(<split_by>).p        pickle: the list of refs (REFER format)
    refer_seg/<dataset>/instances.json            COCO: images, annotations, categories
    refer_seg/images/mscoco/images/train2014/     the COCO train2014 JPEGs (refclef: images/saiapr_tc-12)

A split is named `dataset|split_by|split`, e.g. `refcoco|unc|val`, `refcoco+|unc|testA`,
`refcocog|umd|test`.  What upstream does (`utils/refer.py` REFER, `utils/dataset.py` ValDataset), and
this module reproduces:

* refs of the split (`REFER.getRefIds(split=...)`): `testA`/`testB`/`testC` select refs whose split
  contains that letter, `testAB`/`testBC`/`testAC` equal it, `test` contains "test", `train`/`val`
  equal it;
* one item per image those refs point at; its expressions are its refs in file order, each ref's
  sentences in order, the prompt being `sentence["sent"].strip().lower()`;
* the target of an expression is its ref's annotation, rasterised at the image's `height` x `width`
  from `instances.json`: polygons through `pycocotools.mask.frPyObjects` + `decode`, summed over the
  polygons and cast to uint8 (so a pixel covered by two polygons of the object holds 2); an
  annotation without segmentation is an all-zero target.

Upstream visits images in `set` order; here they come in the order of their first ref in the file,
which changes no metric (all sums).  Beyond upstream, a COCO RLE dict segmentation is also read.
The refs pickle holds only lists, dicts, strings and numbers, and is unpickled with every lookup
of a non-builtin class refused, so a tampered file cannot run code.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np
from pycocotools import mask as coco_mask

from .errors import DatasetError

REFER_DIR = "refer_seg"
IMAGE_DIRS = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "refclef": "images/saiapr_tc-12",
}
LETTER_SPLITS = ("testA", "testB", "testC")
PAIR_SPLITS = ("testAB", "testBC", "testAC")
EXACT_SPLITS = ("train", "val")
KNOWN_SPLITS = LETTER_SPLITS + PAIR_SPLITS + EXACT_SPLITS + ("test",)


@dataclass(frozen=True)
class SplitName:
    dataset: str
    split_by: str
    split: str

    @classmethod
    def parse(cls, text: str) -> "SplitName":
        parts = text.split("|")
        if len(parts) != 3 or not all(parts):
            raise DatasetError(f"split {text!r} is not of the form dataset|split_by|split, e.g. refcoco|unc|val")
        split = cls(*parts)
        if split.dataset not in IMAGE_DIRS:
            raise DatasetError(f"unknown dataset {split.dataset!r}; expected one of {', '.join(IMAGE_DIRS)}")
        if split.split not in KNOWN_SPLITS:
            raise DatasetError(f"unknown split {split.split!r}; expected one of {', '.join(KNOWN_SPLITS)}")
        return split

    def __str__(self) -> str:
        return f"{self.dataset}|{self.split_by}|{self.split}"

    def selects(self, ref_split: str) -> bool:
        """`REFER.getRefIds(split=...)`'s rule for whether a ref belongs to this split."""
        if self.split in LETTER_SPLITS:
            return self.split[-1] in ref_split
        if self.split == "test":
            return "test" in ref_split
        return ref_split == self.split


@dataclass(frozen=True)
class Expression:
    ref_id: int
    sent_id: int
    ann_id: int
    text: str

    @property
    def key(self) -> str:
        return f"{self.ref_id}/{self.sent_id}"


@dataclass(frozen=True)
class ReferImage:
    image_id: int
    path: str
    height: int
    width: int
    expressions: Tuple[Expression, ...]


@dataclass(frozen=True)
class Job:
    """One (image, expression) to send, numbered in evaluation order."""

    index: int
    image: ReferImage
    expression: Expression


class ReferSplit:
    """The images, expressions and target masks of one split."""

    def __init__(self, dataset_dir: str, name: str):
        self.name = SplitName.parse(name)
        root = os.path.join(dataset_dir, REFER_DIR)
        data_dir = os.path.join(root, self.name.dataset)
        refs = [ref for ref in load_refs(data_dir, self.name.split_by) if self.name.selects(str(ref.get("split")))]
        if not refs:
            raise DatasetError(f"no refs of split {self.name.split!r} in {_refs_path(data_dir, self.name.split_by)}")
        instances = load_instances(data_dir)
        self._annotations = _by_id(instances["annotations"], "annotation")
        images = _by_id(instances["images"], "image")
        image_dir = os.path.join(root, IMAGE_DIRS[self.name.dataset])
        self.images = _group_by_image(refs, images, self._annotations, image_dir)

    @property
    def expression_count(self) -> int:
        return sum(len(image.expressions) for image in self.images)

    def jobs(self) -> List[Job]:
        """Every (image, expression) in evaluation order."""
        pairs = ((image, expression) for image in self.images for expression in image.expressions)
        return [Job(index, image, expression) for index, (image, expression) in enumerate(pairs)]

    def target(self, image: ReferImage, expression: Expression) -> np.ndarray:
        """The expression's ground truth: uint8 [H, W], each pixel the number of polygons covering it."""
        segmentation = self._annotations[expression.ann_id].get("segmentation", [])
        return rasterise(segmentation, image.height, image.width)


def rasterise(segmentation: Any, height: int, width: int) -> np.ndarray:
    """upstream ValDataset: polygons (or RLEs) -> decode -> sum over them -> uint8."""
    if isinstance(segmentation, Mapping):
        return _rle_masks([dict(segmentation)], height, width).sum(axis=2).astype(np.uint8)
    if len(segmentation) == 0:
        return np.zeros((height, width), dtype=np.uint8)
    if isinstance(segmentation[0], list):
        rles = coco_mask.frPyObjects(segmentation, height, width)
        return coco_mask.decode(rles).sum(axis=2).astype(np.uint8)
    return _rle_masks([dict(rle) for rle in segmentation], height, width).sum(axis=2).astype(np.uint8)


def load_refs(data_dir: str, split_by: str) -> List[Dict[str, Any]]:
    path = _refs_path(data_dir, split_by)
    try:
        with open(path, "rb") as handle:
            refs = _DataOnlyUnpickler(handle).load()
    except FileNotFoundError:
        raise DatasetError(f"refs file not found: {path}") from None
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"cannot read refs file {path}: {exc}") from None
    if not isinstance(refs, list):
        raise DatasetError(f"refs file {path} holds a {type(refs).__name__}, expected a list of refs")
    return refs


def load_instances(data_dir: str) -> Dict[str, List[Dict[str, Any]]]:
    path = os.path.join(data_dir, "instances.json")
    try:
        with open(path, "rb") as handle:
            instances = json.load(handle)
    except FileNotFoundError:
        raise DatasetError(f"instances file not found: {path}") from None
    except ValueError as exc:
        raise DatasetError(f"cannot read instances file {path}: {exc}") from None
    missing = [key for key in ("images", "annotations") if key not in instances]
    if missing:
        raise DatasetError(f"instances file {path} has no {' or '.join(missing)}")
    return instances


def read_image_bytes(image: ReferImage) -> bytes:
    try:
        with open(image.path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise DatasetError(f"cannot read image {image.image_id}: {image.path}: {exc.strerror or exc}") from None


_PLAIN_TYPES = {
    name: getattr(builtins, name)
    for name in ("bool", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "set", "str", "tuple")
}
_PLAIN_TYPES.update(long=int, unicode=str)  # Python 2 names


class _DataOnlyUnpickler(pickle.Unpickler):
    """Resolves only built-in data types (Python 2 or 3 spelling); any other class is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _PLAIN_TYPES:
            return _PLAIN_TYPES[name]
        raise pickle.UnpicklingError(f"refs files hold only plain data, found a reference to {module}.{name}")


def _refs_path(data_dir: str, split_by: str) -> str:
    return os.path.join(data_dir, f"refs({split_by}).p")


def _by_id(records: Sequence[Dict[str, Any]], what: str) -> Dict[int, Dict[str, Any]]:
    try:
        return {record["id"]: record for record in records}
    except (KeyError, TypeError):
        raise DatasetError(f"an {what} record in instances.json has no 'id'") from None


def _group_by_image(
    refs: Sequence[Dict[str, Any]],
    images: Mapping[int, Dict[str, Any]],
    annotations: Mapping[int, Dict[str, Any]],
    image_dir: str,
) -> List[ReferImage]:
    expressions: Dict[int, List[Expression]] = {}
    for ref in refs:
        _check_ref(ref, images, annotations)
        expressions.setdefault(ref["image_id"], []).extend(_expressions(ref))
    return [_image(images[image_id], image_dir, tuple(found)) for image_id, found in expressions.items()]


def _expressions(ref: Mapping[str, Any]) -> Iterator[Expression]:
    for sentence in ref["sentences"]:
        if not isinstance(sentence, Mapping) or "sent" not in sentence or "sent_id" not in sentence:
            raise DatasetError(f"ref {ref['ref_id']} has a sentence without 'sent' and 'sent_id': {sentence!r:.200}")
        text = sentence["sent"].strip().lower()
        yield Expression(ref["ref_id"], sentence["sent_id"], ref["ann_id"], text)


def _image(info: Mapping[str, Any], image_dir: str, expressions: Tuple[Expression, ...]) -> ReferImage:
    path = os.path.join(image_dir, info["file_name"])
    return ReferImage(info["id"], path, int(info["height"]), int(info["width"]), expressions)


def _check_ref(ref: Mapping[str, Any], images: Mapping[int, Any], annotations: Mapping[int, Any]) -> None:
    missing = [key for key in ("ref_id", "ann_id", "image_id", "sentences") if key not in ref]
    if missing:
        raise DatasetError(f"a ref lacks {', '.join(missing)}: {dict(ref)!r:.200}")
    if ref["image_id"] not in images:
        raise DatasetError(f"ref {ref['ref_id']} points at image {ref['image_id']}, absent from instances.json")
    if ref["ann_id"] not in annotations:
        raise DatasetError(f"ref {ref['ref_id']} points at annotation {ref['ann_id']}, absent from instances.json")


def _rle_masks(rles: List[Dict[str, Any]], height: int, width: int) -> np.ndarray:
    for rle in rles:
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle.update(coco_mask.frPyObjects(rle, height, width))
        elif isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
    return coco_mask.decode(rles)
