"""Diagnostic: how well the demo's BEiT-3 tells what each 224x224-view patch shows (colour, shape, texture).

    python -m export.patch_probe [--patch-size 32] [--steps 1200] [--batch 32] [--pool 3000] [--rotation 1.0]

Not part of training.  The demo model (`export.train_demo`) reads colours but not shapes; this trains
only the vision side of its BEiT-3 (image tokens + 2 text tokens, as `encode_prompt` runs it) with a
linear read-out of every patch, on many more scenes per second than the grounding stage sees (one view
per scene instead of one per prompt), and reports the read-out's accuracy on held-out scenes per
attribute, next to the share of the most common class (what always guessing it would score).
`--pool N` draws N scenes once and samples batches from them (flipped every other step); `--pool 0`
draws fresh scenes every step (~12 ms each here, most of a step).  `--rotation` < 1 tilts shapes at
most that fraction of 180 degrees from upright.  `--positions sincos` starts the patch position
table at 2-D sine-cosine values instead of N(0, 0.02).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

from evfsam.modeling.builder import EvfSamConfig, build_evf_sam
from evfsam.processing import beit3_view
from evfsam.specs import BEIT3_IMAGE_SIZE

from .demo_batches import ATTRIBUTES, attribute_map
from .demo_scenes import random_scene
from .train_demo import AuxiliaryHeads, TrainConfig, add_precision_argument, attribute_loss, demo_config, git_commit, \
    initialise, learning_rate, machine, make_deterministic, resolve_precision, write_demo_tokenizer

ATTRIBUTE_NAMES = ("colour", "shape", "texture")


class SceneSource:
    """BEiT-3 views [N, 3, 224, 224] and per-patch labels [N, 3, g, g] (index + 1, 0 = no object)."""

    def __init__(self, grid: int, rotation: float, seed: int):
        self.grid, self.rotation = grid, rotation
        self.rng = np.random.default_rng(seed)

    def coverage(self, mask: np.ndarray) -> np.ndarray:
        return cv2.resize(mask.astype(np.float32), (self.grid, self.grid), interpolation=cv2.INTER_AREA)

    def draw(self, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        views, labels = [], []
        for _ in range(count):
            scene = random_scene(self.rng, self.rotation)
            views.append(beit3_view(scene.rgb))
            labels.append(attribute_map(scene, self.coverage))
        return torch.from_numpy(np.stack(views)), torch.from_numpy(np.stack(labels))


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim]: sine and cosine of the row and of the column at dim / 4 frequencies each."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    frequencies = 1.0 / 100.0 ** (np.arange(dim // 4) / (dim // 4))
    parts = []
    for coordinate in (rows.ravel(), cols.ravel()):
        angles = coordinate[:, None] * frequencies[None]
        parts += [np.sin(angles), np.cos(angles)]
    return torch.tensor(np.concatenate(parts, axis=1), dtype=torch.float32)


class PatchReadout(torch.nn.Module):
    """The demo EVF-SAM's BEiT-3 and a linear read-out of its output patch tokens."""

    def __init__(self, patch_size: int, positions: str):
        super().__init__()
        with tempfile.TemporaryDirectory() as folder:  # the slow tokenizer holds its model in memory once loaded
            tokenizer = write_demo_tokenizer(Path(folder))
        config = demo_config(len(tokenizer))
        config["beit3"]["patch_size"] = patch_size
        self.grid = BEIT3_IMAGE_SIZE // patch_size
        self.model = build_evf_sam(EvfSamConfig.from_dict(config))
        initialise(self.model)
        if positions == "sincos":
            table = self.model.mm_extractor.beit3.encoder.embed_positions.A.weight
            with torch.no_grad():  # rows 0-1 are fairseq's offset, row 2 the [CLS] token
                table[3 : 3 + self.grid**2] = 0.5 * sincos_positions(self.grid, table.shape[1])
        self.heads = AuxiliaryHeads(self.model.mm_extractor.beit3.cfg.embed_dim)
        self.input_ids = torch.tensor([tokenizer("")["input_ids"]])  # <s> </s>: no words

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """[N, g * g, C] read-out logits (colour, shape, texture classes, each with 0 = no object)."""
        captured = []
        beit3 = self.model.mm_extractor.beit3
        hook = beit3.register_forward_hook(lambda _module, _inputs, out: captured.append(out))
        try:
            ids = self.input_ids.expand(len(views), -1)
            self.model.encode_prompt(views, ids, torch.ones_like(ids))
        finally:
            hook.remove()
        return self.heads.patches(captured[0][:, 1 : 1 + self.grid**2])[..., : sum(self.heads.classes)].float()

    def parameters_trained(self) -> List[torch.nn.Parameter]:
        return list(self.model.mm_extractor.parameters()) + list(self.heads.patches.parameters())


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """[N, 3, g, g] -> [N * g * g, 3]."""
    return labels.flatten(2).transpose(1, 2).reshape(-1, len(ATTRIBUTES))


def accuracies(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> Dict[str, float]:
    """Per attribute, the read-out's accuracy over patches an object covers (> half)."""
    flat, truth = logits.reshape(-1, logits.shape[-1]), flat_labels(labels)
    covered = truth[:, 0] > 0
    out, start = {}, 0
    for name, row, width in zip(ATTRIBUTE_NAMES, range(len(classes)), classes):
        predicted = flat[:, start : start + width].argmax(1)
        out[name] = float((predicted[covered] == truth[covered, row]).float().mean())
        start += width
    return out


def majority_shares(labels: torch.Tensor) -> Dict[str, float]:
    truth = flat_labels(labels)
    covered = truth[truth[:, 0] > 0]
    return {name: float(np.bincount(covered[:, row].numpy()).max() / max(len(covered), 1))
            for row, name in enumerate(ATTRIBUTE_NAMES)}


def run(args: argparse.Namespace, log=print) -> dict:
    cfg = TrainConfig(threads=args.threads, peak_lr=args.lr, bfloat16=resolve_precision(args.precision, log))
    make_deterministic(cfg)
    probe = PatchReadout(args.patch_size, args.positions)
    source = SceneSource(probe.grid, args.rotation, args.seed)
    held_out = SceneSource(probe.grid, args.rotation, args.seed + 1).draw(args.validation)
    pool = source.draw(args.pool) if args.pool else None
    parameters = probe.parameters_trained()
    optimizer = torch.optim.AdamW(parameters, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    classes = probe.heads.classes
    started, history = time.perf_counter(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, cfg)
        if pool is None:
            views, labels = source.draw(args.batch)
        else:
            pick = torch.from_numpy(np.random.default_rng([args.seed, step]).integers(0, args.pool, args.batch))
            views, labels = pool[0][pick], pool[1][pick]
            if step % 2:
                views, labels = views.flip(-1), labels.flip(-1)
        probe.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bfloat16):
            logits = probe(views)
            loss = attribute_loss(logits.reshape(-1, logits.shape[-1]), flat_labels(labels), classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
        optimizer.step()
        if (step + 1) % args.report_every == 0 or step + 1 == args.steps:
            probe.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bfloat16):
                validation = accuracies(probe(held_out[0]), held_out[1], classes)
            row = {"step": step + 1, "seconds": round(time.perf_counter() - started, 1), "loss": float(loss.detach()),
                   "train": accuracies(logits.detach(), labels, classes), "held_out": validation}
            history.append(row)
            log(json.dumps(row))
    return {"args": vars(args), "machine": machine(), "git_commit": git_commit(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "majority_share_held_out": majority_shares(held_out[1]), "history": history}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.patch_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch-size", type=int, default=32, choices=(8, 14, 16, 28, 32))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=3000, help="scenes drawn once (0: fresh scenes every step)")
    parser.add_argument("--validation", type=int, default=200, help="held-out scenes")
    parser.add_argument("--rotation", type=float, default=1.0)
    parser.add_argument("--positions", choices=("learned", "sincos"), default="learned")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    add_precision_argument(parser)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--report-every", type=int, default=200)
    parser.add_argument("--output", help="write the report (JSON) here too")
    args = parser.parse_args(argv)
    if not 0 <= args.rotation <= 1:
        parser.error("--rotation is a fraction of 180 degrees, from 0 (upright) to 1 (any angle)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args, log=lambda line: print(line, flush=True))
    print(json.dumps({"majority_share_held_out": report["majority_share_held_out"]}))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
