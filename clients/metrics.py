"""cIoU and gIoU exactly as upstream's `eval.py` computes them.

Upstream (`eval.py` `validate`, `utils/utils.py` `intersectionAndUnionGPU`, `AverageMeter`), per
expression with prediction `p = logits > 0` (the served mask) and target `t` (the uint8 label map of
`clients.refcoco.rasterise`), `intersectionAndUnionGPU(p, t, K=2, ignore_index=255)`:

* pixels where `t == 255` are taken out of the prediction (set to 255);
* `torch.histc(..., bins=2, min=0, max=1)` counts only the values 0 and 1, so a target pixel of 2 or
  more (covered by several polygons of the object) is neither foreground nor background;
* foreground (class 1): `I = #(p == 1 and t == 1)`, `U = #(p == 1) + #(t == 1) - I`.

Then, over all N expressions of the split:

* per-expression IoU: `iou = I / (U + 1e-10)`, plus 1.0 when `U == 0` (prediction and target both
  empty: "no-object target" scores 1);
* cIoU = `sum(I) / (sum(U) + 1e-10)` (`intersection_meter.sum / (union_meter.sum + 1e-10)`);
* gIoU = `sum(iou) / (N + 1e-5)` (`acc_iou_meter.avg` after `all_reduce`, which divides by
  `count + 1e-5`): the mean per-expression IoU, every expression weighing the same.

Counts here are exact integers and the sums float64; upstream accumulates in float32 on the GPU,
which can differ in the 7th significant digit on a full split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

FOREGROUND = 1
IGNORE_LABEL = 255
UNION_EPS = 1e-10
COUNT_EPS = 1e-5


@dataclass(frozen=True)
class ExpressionScore:
    """Foreground intersection and union of one expression's prediction with its target."""

    intersection: int
    union: int

    @property
    def iou(self) -> float:
        return self.intersection / (self.union + UNION_EPS) + (1.0 if self.union == 0 else 0.0)


def score_expression(prediction: np.ndarray, target: np.ndarray) -> ExpressionScore:
    """upstream `intersectionAndUnionGPU(prediction, target, 2, ignore_index=255)`, class 1."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    predicted = (prediction == FOREGROUND) & (target != IGNORE_LABEL)
    wanted = target == FOREGROUND
    intersection = int(np.count_nonzero(predicted & wanted))
    union = int(np.count_nonzero(predicted)) + int(np.count_nonzero(wanted)) - intersection
    return ExpressionScore(intersection, union)


@dataclass
class IoUAccumulator:
    """Running sums over expressions; `ciou` and `giou` are upstream's split-level numbers."""

    intersection: int = 0
    union: int = 0
    iou_sum: float = 0.0
    count: int = 0

    def add(self, score: ExpressionScore) -> None:
        self.intersection += score.intersection
        self.union += score.union
        self.iou_sum += score.iou
        self.count += 1

    @property
    def ciou(self) -> float:
        return self.intersection / (self.union + UNION_EPS)

    @property
    def giou(self) -> float:
        return self.iou_sum / (self.count + COUNT_EPS)

    def as_dict(self) -> Dict[str, float]:
        return {
            "ciou": self.ciou,
            "giou": self.giou,
            "count": self.count,
            "intersection": self.intersection,
            "union": self.union,
        }
