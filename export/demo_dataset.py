"""Write the held-out demo scenes as a RefCOCO-layout dataset that `clients.evaluate` reads.

    python -m export.demo_dataset OUT_DIR [--scenes 40]
    python -m clients.evaluate --url 127.0.0.1:8001 --dataset-dir OUT_DIR --split 'refcoco|shapes|val' --output r.json

The scenes are `export.demo_scenes.held_out_scenes` (the ones `export.train_demo` reports its held-out
scores on; training never draws them), JPEG-encoded, one expression of each type per scene.  The
client only knows the RefCOCO family's directory names, so the set is filed as dataset `refcoco`:

    OUT_DIR/refer_seg/refcoco/refs(shapes).p               every expression (split "val")
    OUT_DIR/refer_seg/refcoco/refs(shapes-<type>).p        one expression type only, e.g. shapes-relation
    OUT_DIR/refer_seg/refcoco/instances.json               one annotation per expression, COCO RLE
    OUT_DIR/refer_seg/images/mscoco/images/train2014/shapes_0000.jpg ...

Output is byte-for-byte the same on every run.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Dict, List

import numpy as np
from pycocotools import mask as coco_mask

from clients.refcoco import IMAGE_DIRS, REFER_DIR

from .demo_scenes import EXPRESSION_TYPES, HeldOutScene, held_out_scenes

DATASET = "refcoco"
SPLIT_BY = "shapes"
SPLIT = "val"
DEFAULT_SCENES = 40
PICKLE_PROTOCOL = 2  # what the published refs files use


def split_name(kind: str | None = None) -> str:
    """`dataset|split_by|split` for `clients.evaluate --split`: all expressions, or one type."""
    return f"{DATASET}|{SPLIT_BY if kind is None else f'{SPLIT_BY}-{kind}'}|{SPLIT}"


def write_dataset(out_dir: Path, scenes: List[HeldOutScene]) -> Path:
    root = Path(out_dir) / REFER_DIR
    data_dir = root / DATASET
    image_dir = root / IMAGE_DIRS[DATASET]
    data_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    for image_id, scene in enumerate(scenes):
        file_name = f"shapes_{image_id:04d}.jpg"
        (image_dir / file_name).write_bytes(scene.image)
        images.append({"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width})
        for expression in scene.expressions:
            ann_id = len(annotations)
            annotations.append(_annotation(ann_id, image_id, expression.mask))
            refs.append({
                "ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": SPLIT, "file_name": file_name,
                "category_id": 1, "expression_type": expression.kind,
                "sentences": [{"sent_id": ann_id, "sent": expression.text, "raw": expression.text,
                               "tokens": expression.text.split()}],
            })
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": 1, "name": "shape", "supercategory": "shape"}]}
    (data_dir / "instances.json").write_text(json.dumps(instances))
    _write_refs(data_dir / f"refs({SPLIT_BY}).p", refs)
    for kind in EXPRESSION_TYPES:
        _write_refs(data_dir / f"refs({SPLIT_BY}-{kind}).p", [r for r in refs if r["expression_type"] == kind])
    return Path(out_dir)


def _annotation(ann_id: int, image_id: int, mask: np.ndarray) -> Dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": float(mask.sum()),
            "bbox": bbox, "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}}


def _write_refs(path: Path, refs: List[Dict]) -> None:
    with open(path, "wb") as handle:
        pickle.dump(refs, handle, protocol=PICKLE_PROTOCOL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.demo_dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--scenes", type=int, default=DEFAULT_SCENES)
    args = parser.parse_args(argv)
    scenes = held_out_scenes(args.scenes)
    write_dataset(args.out_dir, scenes)
    count = sum(len(s.expressions) for s in scenes)
    print(f"wrote {len(scenes)} images, {count} expressions to {args.out_dir}; "
          f"evaluate with --dataset-dir {args.out_dir} --split '{split_name()}' (or e.g. '{split_name('relation')}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
