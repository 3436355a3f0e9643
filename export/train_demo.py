"""Train the small demo EVF-SAM ("ori" architecture, real layout) on generated shape scenes.

    python -m export.train_demo [--output-dir assets/demo-checkpoint] [--threads 2] [--precision auto]

The model is the real one at small sizes (SAM ViT image encoder at 1024x1024, SAM prompt encoder +
mask decoder at SAM's sizes, BEiT-3 at 224x224 + tokens, the text_hidden_fcs MLP), sized through
config.json's `sam_image_encoder` / `beit3` blocks.  Inputs come from `export.demo_batches` (the
serve-time preprocessing), and the graphs trained are the served ones (`encode_image`,
`encode_prompt`, `decode_masks`).

Three stages, each with its own AdamW and warm-up + cosine schedule.  The mask decoder (SAM's, 256-d
over 64x64 tokens) costs most per prompt on this CPU, and trained end to end from scratch the model
first learns to segment every object whatever the prompt: BEiT-3's fused [CLS] starts out almost all
image and hardly any text, so the decoder gets no usable signal of *which* object, and learning to
read the words through the decoder's loss alone takes more decoder steps than the budget holds.  So
reading and segmenting are learnt apart first, joined by a training-only teacher (dropped from the
checkpoint, like the heads below):

1. decoder (`decoder_steps`; image encoder + prompt encoder + mask decoder, no BEiT-3): 1 scene x 8
   prompts a step, each prompt's embedding made by the teacher, an MLP over the target's ground truth
   (colour / shape / texture, its coverage of BEiT-3's 7x7 patch grid, its centre): the decoder learns
   to cut out the object an embedding points at, from a clean signal.  Its IoU and mask tokens start
   small (`initialise`) and a read-out of the target from its output mask token (`mask_token`) makes
   it use the prompt: without both it settles on one mask for every prompt, all the objects.
2. grounding (`grounding_steps`; BEiT-3 and the MLP, no SAM): 4 scenes x 8 prompts a step, BEiT-3's
   prompt embedding pulled to the teacher's (MSE), plus training-only linear read-outs: from the prompt
   embedding, the target's colour, shape, texture, centre and patch coverage; from each output patch
   token, what it shows and whether it is part of the target.
3. end to end (`steps`): 2 scenes a step, scene 0's 8 prompts through the mask decoder with
   upstream's mask losses on the 256x256 low-res logits against the ground truth in the padded frame
   (sigmoid BCE x 2.0 + dice, hustvl/EVF-SAM `model/evf_sam.py`; dice at 1.0 rather than upstream's
   0.5, which keeps the from-scratch decoder out of the all-background minimum), SAM's MSE on the
   predicted IoU so the served score means something, the teacher term and the read-outs on all 16
   prompts, and on the SAM image embedding: colour / shape / texture of every 16x16 cell, and, dotting
   a linear map of each prompt embedding with every cell, the target's cells (the decoder's final dot
   product in miniature; the cell read-outs also run in stage 1).

The demo BEiT-3 uses 32x32 patches (7x7 at 224x224; upstream's are 16): 4x cheaper and the words are
a larger share of what the [CLS] token attends to.

Deterministic: fixed seeds, `torch.use_deterministic_algorithms(True)`, a fixed thread count (the
results depend on it: oneDNN splits reductions by thread) and a fixed precision: bfloat16 autocast
where the CPU has it natively (AVX512-BF16 or AMX; the committed checkpoint was trained so), float32
elsewhere (`--precision auto`, said when it happens), since emulated bfloat16 is several times slower.  Writes `config.json`,
`model.safetensors` (float16), the tokenizer (sentencepiece in XLM-R's layout + `[semantic]` as an
added token, saved by transformers' slow XLMRobertaTokenizer), `training_log.csv`, `training.json`,
`loss.png` and `TRAINING.md` (held-out scores per expression type).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from clients.metrics import IoUAccumulator, score_expression
from evfsam.modeling.builder import EvfSamConfig, build_evf_sam
from evfsam.modeling.evf_sam import EvfSamModel
from evfsam.processing import beit3_view, binary_mask, decode_image, sam_view
from evfsam.specs import SAM_EMBEDDING_DIM
from evfsam.tokenization import pad_batch

from .demo_batches import ATTRIBUTES, BEIT3_PATCH_SIZE, IGNORE, PATCH_GRID, Batch, Tokenize, make_batch
from .demo_scenes import EXPRESSION_TYPES, SEMANTIC_TOKEN, HeldOutScene, held_out_scenes, vocabulary_corpus
from .tiny_checkpoint import train_sentencepiece

DEFAULT_OUTPUT = Path("assets/demo-checkpoint")
SPM_VOCAB = 96  # an upper bound: the trainer keeps fewer pieces on this small vocabulary
# Windowed attention, then one global block: the objects span more than a 14x14 window, and telling a
# triangle from a circle needs the whole object (cheap next to the mask decoder: ~0.2 s of a 1.2 s step).
SAM_IMAGE_ENCODER = {"embed_dim": 64, "depth": 3, "num_heads": 4, "global_attn_indexes": [2]}
BEIT3 = {"embed_dim": 128, "layers": 3, "attention_heads": 4, "ffn_embed_dim": 256, "patch_size": BEIT3_PATCH_SIZE}


@dataclass(frozen=True)
class TrainConfig:
    decoder_steps: int = 350  # image encoder + mask decoder, prompted by the teacher's embedding of the target
    grounding_steps: int = 700  # BEiT-3 + MLP towards the teacher's embeddings and the training-only heads
    steps: int = 330  # end to end
    prompts: int = 8  # per scene and step
    grounding_scenes: int = 4  # per grounding step
    scenes: int = 2  # per end-to-end step: scene 0's prompts through the mask decoder, all through the heads
    peak_lr: float = 1e-3
    final_lr_fraction: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    auxiliary_weight: float = 1.0
    teacher_weight: float = 1.0  # BEiT-3's prompt embedding vs the teacher's (MSE), in stages 2 and 3
    seed: int = 0
    threads: int = 2
    held_out_scenes: int = 40
    # bfloat16 autocast (the weights stay fp32): ~2x faster than fp32 on a CPU with AVX512-BF16 or AMX, as
    # the committed checkpoint was trained; without them oneDNN emulates it (matmuls ~180x, training steps
    # 6-12x slower than fp32 on an AVX2-only EPYC; `--precision`).
    bfloat16: bool = True


# ------------------------------------------------------------------------------------ checkpoint


def write_demo_tokenizer(out_dir: Path):
    """XLM-R layout: sentencepiece trained on the expressions' words, `[semantic]` added, saved by transformers."""
    from transformers import XLMRobertaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(out_dir, vocabulary_corpus(), SPM_VOCAB)
    tokenizer = XLMRobertaTokenizer(str(out_dir / "sentencepiece.bpe.model"), model_max_length=512)
    tokenizer.add_tokens([SEMANTIC_TOKEN])
    tokenizer.save_pretrained(str(out_dir))
    return XLMRobertaTokenizer.from_pretrained(str(out_dir))


def demo_config(vocab_size: int) -> dict:
    return {
        "model_type": "evf",
        "architectures": ["EvfSamModel"],
        "torch_dtype": "float16",
        "hidden_size": BEIT3["embed_dim"],
        "out_dim": SAM_EMBEDDING_DIM,
        "sam_scale": "base",
        "mm_extractor_scale": "base",
        "sam_image_encoder": dict(SAM_IMAGE_ENCODER),
        "beit3": {**BEIT3, "vocab_size": vocab_size},
    }


def initialise(model: EvfSamModel, std: float = 0.02) -> None:
    """Embedding tables at N(0, 0.02) (torchscale's scale for its weights) instead of nn.Embedding's
    N(0, 1).  BEiT-3's token and position tables: at N(0, 1) a patch's position would drown its
    content.  The mask decoder's IoU and mask tokens: the mask token reads the prompt token through
    the first self-attention, and next to N(0, 1) tokens the prompt (~0.3 per dimension) is too faint
    to matter; the decoder then settles on one mask for every prompt (all the objects)."""
    beit3 = model.mm_extractor.beit3
    decoder = model.visual_model.mask_decoder
    with torch.no_grad():
        for table in (beit3.text_embed, beit3.encoder.embed_positions.A, beit3.encoder.embed_positions.B,
                      decoder.iou_token, decoder.mask_tokens):
            table.weight.normal_(0.0, std)


def save_weights(model: EvfSamModel, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = out_dir / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------------------------------ model


class AuxiliaryHeads(torch.nn.Module):
    """Training-only linear read-outs (not in the checkpoint).

    `cells`: colour / shape / texture of each 16x16 cell from the SAM image embedding.
    `patches`: the same per BEiT-3 output patch token, plus whether the patch is the prompt's target.
    `prompt`: from the prompt embedding the decoder receives, the target's colour / shape / texture
    (one object), its centre (x, y) and its coverage of the 7x7 patch grid.
    `mask_token`: the same from the mask decoder's output mask token (what its hypernetwork turns into
    the mask's filter): without it the from-scratch decoder settles on one mask for every prompt (all
    the objects), a minimum the mask losses alone do not leave within the budget.
    """

    def __init__(self, beit3_dim: int):
        super().__init__()
        self.classes = tuple(len(names) + 1 for names in ATTRIBUTES)  # + background
        self.cells = torch.nn.Conv2d(SAM_EMBEDDING_DIM, sum(self.classes), kernel_size=1)
        self.patches = torch.nn.Linear(beit3_dim, sum(self.classes) + 1)
        self.prompt = torch.nn.Linear(SAM_EMBEDDING_DIM, sum(self.classes) + 2 + PATCH_GRID * PATCH_GRID)
        self.match = torch.nn.Linear(SAM_EMBEDDING_DIM, SAM_EMBEDDING_DIM)
        self.mask_token = torch.nn.Linear(SAM_EMBEDDING_DIM, sum(self.classes) + 2 + PATCH_GRID * PATCH_GRID)


def target_descriptor(batch: Batch) -> torch.Tensor:
    """[M, D]: what each prompt's target is, from the ground truth: colour, shape and texture one-hot
    (class 0 = not one object), its coverage of BEiT-3's 7x7 patch grid, its centre, whether it is one object."""
    parts = []
    for row, names in enumerate(ATTRIBUTES):
        labels = batch.target_labels[:, row]
        onehot = torch.zeros(len(labels), len(names) + 1)
        onehot[torch.arange(len(labels)), torch.where(labels == IGNORE, 0, labels + 1)] = 1.0
        parts.append(onehot)
    parts += [batch.grounding.float(), batch.target_centres.float(), batch.has_object.float()[:, None]]
    return torch.cat(parts, dim=1)


class PromptTeacher(torch.nn.Module):
    """Training-only (not in the checkpoint): the target's descriptor -> a 256-d prompt embedding.

    Stage 1 trains the mask decoder on the teacher's embeddings, a clean signal of which object to cut
    out, so the decoder learns segmenting apart from reading; stage 2 trains BEiT-3 to produce the
    same embeddings from the image and the words; stage 3 joins them end to end."""

    def __init__(self, width: int = SAM_EMBEDDING_DIM):
        super().__init__()
        inputs = sum(len(names) + 1 for names in ATTRIBUTES) + PATCH_GRID * PATCH_GRID + 3
        self.net = torch.nn.Sequential(torch.nn.Linear(inputs, width), torch.nn.GELU(),
                                       torch.nn.Linear(width, SAM_EMBEDDING_DIM))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(target_descriptor(batch))[:, None]  # [M, 1, 256], as encode_prompt's


@dataclass
class Outputs:
    image_embeddings: Optional[torch.Tensor]  # [1, 256, 64, 64] (with the decoder only)
    text: torch.Tensor  # [M, 1, 256]: the prompt embeddings
    patches: torch.Tensor  # [M, 49, D]: BEiT-3's output patch tokens
    logits: Optional[torch.Tensor]  # [K, 256, 256]
    iou: Optional[torch.Tensor]  # [K]
    mask_token: Optional[torch.Tensor] = None  # [K, 256]: the decoder transformer's output mask token


def forward(model: EvfSamModel, batch: Batch, teacher: Optional[PromptTeacher] = None) -> Outputs:
    """The served graphs in sequence: `encode_image`, `encode_prompt` (+ its patch tokens), `decode_masks`.
    With a teacher, its embeddings prompt the decoder instead of BEiT-3's (stage 1)."""
    embeddings = model.encode_image(batch.sam_image) if batch.sam_image is not None else None
    if teacher is not None:
        text, patches = teacher(batch), None
    else:
        captured = []
        hook = model.mm_extractor.beit3.register_forward_hook(lambda _module, _inputs, out: captured.append(out))
        try:
            text = model.encode_prompt(batch.beit3_images[batch.owner], batch.input_ids, batch.attention_mask)
        finally:
            hook.remove()
        patches = captured[0][:, 1 : 1 + PATCH_GRID * PATCH_GRID]
    logits = iou = mask_token = None
    if batch.decoded:
        tokens = []
        transformer = model.visual_model.mask_decoder.transformer
        hook = transformer.register_forward_hook(lambda _module, _inputs, out: tokens.append(out[0]))
        try:
            low_res, iou_pred = model.decode_masks(embeddings.expand(batch.decoded, -1, -1, -1), text[: batch.decoded])
        finally:
            hook.remove()
        logits, iou, mask_token = low_res[:, 0], iou_pred[:, 0], tokens[0][:, 1]
    return Outputs(embeddings, text, patches, logits, iou, mask_token)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Upstream's dice loss (its scale factor cancels), mean over masks."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + eps) / (denominator + eps)).mean()


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], offset: int = 0) -> torch.Tensor:
    """Mean cross-entropy of the colour, shape and texture read-outs; `logits` [N, C], `labels` [N, 3]
    (index + offset; IGNORE rows skipped)."""
    total = logits.new_zeros(())
    for row, part in enumerate(logits.float().split(list(classes), dim=1)):
        target = labels[:, row]
        valid = target != IGNORE
        if valid.any():
            total = total + F.cross_entropy(part[valid], target[valid] + offset)
    return total / len(classes)


def auxiliary_losses(out: Outputs, batch: Batch, heads: AuxiliaryHeads) -> Dict[str, torch.Tensor]:
    classes = sum(heads.classes)
    terms = {}
    if out.image_embeddings is not None:
        cells = heads.cells(out.image_embeddings)[0].flatten(1).T  # [4096, C]
        terms["cells"] = attribute_loss(cells, batch.cell_labels.flatten(1).T, heads.classes)
        # The decoder's last step in miniature: the prompt embedding, mapped, dotted with every cell.
        query = heads.match(out.text[batch.owner == 0, 0])  # [P, 256]
        match = torch.einsum("pc,chw->phw", query, out.image_embeddings[0]).float() / SAM_EMBEDDING_DIM**0.5
        terms["match"] = (F.binary_cross_entropy_with_logits(match, batch.cell_masks)
                          + dice_loss(match, batch.cell_masks))
    if out.mask_token is not None:
        terms["mask_token"] = target_readout_loss(heads.mask_token(out.mask_token).float(), batch, heads, batch.decoded)
    if out.patches is None:  # stage 1: the teacher prompts the decoder, BEiT-3 is not run
        return terms
    patch_out = heads.patches(out.patches).float()  # [M, 49, C + 1]
    patch_labels = batch.patch_labels[batch.owner].flatten(2).transpose(1, 2).reshape(-1, len(ATTRIBUTES))
    patch_loss = attribute_loss(patch_out[..., :classes].reshape(-1, classes), patch_labels, heads.classes)
    patch_target = F.binary_cross_entropy_with_logits(patch_out[..., classes], batch.grounding)
    prompt_loss = target_readout_loss(heads.prompt(out.text[:, 0]).float(), batch, heads, len(batch.kinds))
    return {**terms, "patches": patch_loss + patch_target, "prompt": prompt_loss}


def target_readout_loss(readout: torch.Tensor, batch: Batch, heads: AuxiliaryHeads, rows: int) -> torch.Tensor:
    """The first `rows` prompts' targets read out of an embedding: colour / shape / texture, centre and
    coverage of the 7x7 patch grid (layout of `AuxiliaryHeads.prompt`)."""
    classes = sum(heads.classes)
    has_object = batch.has_object[:rows]
    target_loss = attribute_loss(readout[:, :classes], batch.target_labels[:rows], heads.classes, offset=1)
    centres = readout[:, classes : classes + 2]
    centre_loss = (F.l1_loss(centres[has_object], batch.target_centres[:rows][has_object])
                   if has_object.any() else centres.new_zeros(()))
    coverage_loss = F.binary_cross_entropy_with_logits(readout[:, classes + 2 :], batch.grounding[:rows])
    return target_loss + centre_loss + coverage_loss


@torch.no_grad()
def target_accuracy(out: Outputs, batch: Batch, heads: AuxiliaryHeads) -> torch.Tensor:
    """How often the prompt embedding tells the target object's colour, shape and texture (a diagnostic)."""
    prompt_out = heads.prompt(out.text[:, 0]).float()
    hits = []
    start = 0
    for row, width in enumerate(heads.classes):
        predicted = prompt_out[:, start + 1 : start + width].argmax(dim=1)
        hits.append((predicted == batch.target_labels[:, row])[batch.has_object].float())
        start += width
    return torch.cat(hits).mean() if batch.has_object.any() else torch.tensor(float("nan"))


def mask_losses(out: Outputs, batch: Batch) -> Dict[str, torch.Tensor]:
    logits, targets = out.logits.float(), batch.masks
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1).mean()
    with torch.no_grad():
        predicted, truth = logits > 0, targets > 0.5
        union = (predicted | truth).flatten(1).sum(1).float()
        actual_iou = torch.where(union > 0, (predicted & truth).flatten(1).sum(1).float() / union.clamp(min=1), 1.0)
    return {"bce": bce, "dice": dice_loss(logits, targets), "iou_mse": F.mse_loss(out.iou.float(), actual_iou),
            "train_iou": actual_iou.mean(), "per_prompt_iou": actual_iou}


def step_losses(out: Outputs, batch: Batch, heads: AuxiliaryHeads, cfg: TrainConfig,
                teacher: Optional[PromptTeacher] = None) -> Dict[str, torch.Tensor]:
    """`teacher` (stages 2 and 3): BEiT-3's prompt embeddings are also pulled towards the teacher's."""
    terms = auxiliary_losses(out, batch, heads)
    total = cfg.auxiliary_weight * sum(terms.values())
    if out.patches is not None:
        terms["target_accuracy"] = target_accuracy(out, batch, heads)
    if teacher is not None:
        with torch.no_grad():
            wanted = teacher(batch)
        terms["teacher"] = F.mse_loss(out.text.float(), wanted.float())
        total = total + cfg.teacher_weight * terms["teacher"]
    if batch.decoded:
        masks = mask_losses(out, batch)
        total = total + cfg.bce_weight * masks["bce"] + cfg.dice_weight * masks["dice"] + cfg.iou_weight * masks["iou_mse"]
        terms.update(masks)
    return {"loss": total, **terms}


def learning_rate(step: int, steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine down to final_lr_fraction of the peak."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(steps - cfg.warmup_steps, 1)
    floor = cfg.peak_lr * cfg.final_lr_fraction
    return floor + (cfg.peak_lr - floor) * 0.5 * (1 + np.cos(np.pi * progress))


STAGES = ("decoder", "grounding", "end-to-end")


def stage_of(step: int, cfg: TrainConfig) -> Tuple[str, int, int]:
    """(stage name, its first step, its length) of a global step."""
    start = 0
    for name, length in zip(STAGES, (cfg.decoder_steps, cfg.grounding_steps, cfg.steps)):
        if step < start + length:
            return name, start, length
        start += length
    raise IndexError(step)


def step_batch(cfg: TrainConfig, step: int, tokenize: Tokenize) -> Batch:
    """Step `step`'s scenes and prompts: drawn from their own seed, so any step can be replayed alone
    (held-out scenes come from another seed)."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    stage = stage_of(step, cfg)[0]
    if stage == "decoder":
        return make_batch(rng, tokenize, 1, cfg.prompts, cfg.prompts)
    if stage == "grounding":
        return make_batch(rng, tokenize, cfg.grounding_scenes, cfg.prompts, 0)
    return make_batch(rng, tokenize, cfg.scenes, cfg.prompts, cfg.prompts)


def train(model: EvfSamModel, tokenize: Tokenize, cfg: TrainConfig, log=print) -> List[dict]:
    """Three stages, each with a fresh AdamW and its own warm-up + cosine schedule; one log row per step."""
    heads = AuxiliaryHeads(model.mm_extractor.beit3.cfg.embed_dim)
    teacher = PromptTeacher()
    stage_parameters = {
        "decoder": list(model.visual_model.parameters()) + list(teacher.parameters()) + list(heads.parameters()),
        "grounding": list(model.mm_extractor.parameters()) + list(model.text_hidden_fcs.parameters()) + list(heads.parameters()),
        "end-to-end": list(model.parameters()) + list(heads.parameters()),
    }
    model.train()
    rows: List[dict] = []
    started = time.perf_counter()
    total = cfg.decoder_steps + cfg.grounding_steps + cfg.steps
    for step in range(total):
        stage, stage_start, stage_steps = stage_of(step, cfg)
        parameters = stage_parameters[stage]
        if step == stage_start:
            optimizer = torch.optim.AdamW(parameters, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - stage_start, stage_steps, cfg)
        batch = step_batch(cfg, step, tokenize)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bfloat16):
            out = forward(model, batch, teacher if stage == "decoder" else None)
            terms = step_losses(out, batch, heads, cfg, None if stage == "decoder" else teacher)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
        optimizer.step()
        per_prompt = terms.pop("per_prompt_iou", torch.zeros(0))
        row = {"stage": stage, "step": step, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
               **{k: float(v.detach()) for k, v in terms.items()}, "seconds": time.perf_counter() - started}
        for kind, iou in zip(batch.kinds, per_prompt.tolist()):
            row.setdefault(f"iou_{kind}", []).append(iou)
        rows.append({k: (float(np.mean(v)) if isinstance(v, list) else v) for k, v in row.items()})
        if step % 25 == 0 or step == total - 1:
            _print_progress(step, total, rows, log)
    model.eval()
    return rows


def _print_progress(step: int, steps: int, rows: Sequence[dict], log) -> None:
    recent = rows[-min(25, step + 1):]
    keys = list(dict.fromkeys(k for r in recent for k in r if k not in ("stage", "step", "lr", "grad_norm", "seconds")))
    shown = "  ".join(f"{k} {np.nanmean([r.get(k, np.nan) for r in recent]):.3f}" for k in keys)
    log(f"{rows[-1]['stage']} step {step:4d}/{steps}  {shown}  {rows[-1]['seconds']:.0f} s")


# ------------------------------------------------------------------------------------- evaluation


def served_masks(model: EvfSamModel, data: bytes, texts: Sequence[str], tokenize: Tokenize) -> List[np.ndarray]:
    """Masks as the server computes them: serve-time pre/post-processing around the eager graphs."""
    rgb = decode_image(data)
    sam, resized = sam_view(rgb)
    input_ids, attention = (torch.from_numpy(a) for a in pad_batch([tokenize(t) for t in texts]))
    with torch.inference_mode():
        embeddings = model.encode_image(torch.from_numpy(sam)[None])
        images_evf = torch.from_numpy(beit3_view(rgb))[None].expand(len(texts), -1, -1, -1)
        low_res, _ = model.decode_masks(embeddings.expand(len(texts), -1, -1, -1),
                                        model.encode_prompt(images_evf, input_ids, attention))
    return [binary_mask(low[0].numpy(), resized, rgb.shape[:2]) for low in low_res]


def evaluate(model: EvfSamModel, scenes: Sequence[HeldOutScene], tokenize: Tokenize) -> Dict[str, dict]:
    """Per expression type and overall: mIoU (= upstream's gIoU, the mean per-expression IoU) and cIoU."""
    totals = {kind: IoUAccumulator() for kind in (*EXPRESSION_TYPES, "all")}
    for scene in scenes:
        masks = served_masks(model, scene.image, [e.text for e in scene.expressions], tokenize)
        for expression, mask in zip(scene.expressions, masks):
            score = score_expression(mask, expression.mask)
            totals[expression.kind].add(score)
            totals["all"].add(score)
    return {kind: {"count": t.count, "miou": t.giou, "ciou": t.ciou} for kind, t in totals.items() if t.count}


# ---------------------------------------------------------------------------------------- report


def write_log(rows: Sequence[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def plot_losses(rows: Sequence[dict], path: Path, window: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.plots import save_figure

    def curve(axis, key, **style):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if len(points) >= window:
            steps, values = np.array(points).T
            axis.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"), **style)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("cells", "patches", "prompt", "match", "bce", "dice", "iou_mse"):
        curve(left, key, label=key)
    curve(right, "train_iou")
    left.set(xlabel="step", ylabel=f"loss (mean of {window} steps)", yscale="log", title="training losses")
    left.legend(fontsize=8)
    right.set(xlabel="step", ylabel="IoU at 256x256", ylim=(0, 1), title="training-batch mask IoU")
    save_figure(fig, path)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(asked: str, log=print) -> bool:
    """--precision auto|bfloat16|float32 -> whether to train under bfloat16 autocast."""
    if asked != "auto":
        return asked == "bfloat16"
    if native_bfloat16():
        return True
    log("this CPU has no native bfloat16 (AVX512-BF16 or AMX): training in float32, which differs from the "
        "committed checkpoint's bfloat16 run in the last bits and so in its weights; --precision bfloat16 "
        "reproduces that recipe but is several times slower on such a CPU")
    return False


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="auto: bfloat16 autocast where the CPU has it natively, else float32")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability() + (" + native bfloat16" if native_bfloat16() else "")
    return (f"{cpu} ({capability}), {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"torch {torch.__version__}")


def write_report(out_dir: Path, cfg: TrainConfig, scores_fp32, scores_fp16, seconds: float, command: str) -> None:
    summary = {"config": asdict(cfg), "model": demo_config(0),
               "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "git_commit": git_commit(), "command": command, "wall_seconds": round(seconds, 1),
               "held_out": {"float32": scores_fp32, "float16_checkpoint": scores_fp16}}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Demo checkpoint: how it was trained",
        "",
        "A small EVF-SAM in the real \"ori\" architecture and layout, trained from scratch on generated",
        "scenes of coloured, textured shapes (`export/demo_scenes.py`). It segments such scenes only;",
        "for real images serve a published checkpoint (`make demo CHECKPOINT=YxZhang/evf-sam2 IMAGE=... PROMPT=...`)",
        "or a local checkpoint directory.",
        "How and why it is trained this way: the docstring of `export/train_demo.py`.",
        "",
        f"- command: `{command}`",
        f"- machine: {summary['machine']}",
        f"- date: {summary['date']}",
        f"- git commit: {summary['git_commit']}",
        f"- wall time of the command: {seconds / 60:.1f} min ({cfg.threads} torch threads)",
        f"- training: {cfg.decoder_steps} decoder steps (1 generated scene x {cfg.prompts} expressions, prompted "
        f"by the training-only teacher), {cfg.grounding_steps} grounding steps ({cfg.grounding_scenes} scenes x "
        f"{cfg.prompts} expressions, BEiT-3 only), then {cfg.steps} end-to-end steps ({cfg.scenes} scenes x "
        f"{cfg.prompts} expressions, one scene's through the mask decoder); every step's scenes are new",
        f"- sizes: SAM image encoder {SAM_IMAGE_ENCODER}; BEiT-3 {BEIT3}; prompt encoder and mask decoder at SAM's sizes",
        f"- optimiser: AdamW (peak lr {cfg.peak_lr}, weight decay {cfg.weight_decay}, {cfg.warmup_steps} warm-up steps, "
        f"cosine to {cfg.final_lr_fraction} x peak, gradient norm clipped at {cfg.grad_clip}), "
        f"{'bfloat16 autocast' if cfg.bfloat16 else 'float32'}",
        "- curves: `training_log.csv` (one row per step), `loss.png`; everything above: `training.json`",
        "",
        f"## Held-out scores ({cfg.held_out_scenes} generated scenes never trained on, JPEG, one expression per type per scene)",
        "",
        "Masks as served (`decode_image`, `sam_view`, `beit3_view`, tokens, `binary_mask` at the original size),",
        "eager PyTorch; mIoU = mean per-expression IoU (upstream's gIoU), cIoU = summed intersection / summed union.",
        "The same scenes as a RefCOCO-layout set: `python -m export.demo_dataset DIR`.",
        "",
        "| type | count | mIoU fp32 | cIoU fp32 | mIoU fp16 checkpoint | cIoU fp16 checkpoint |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind in (*EXPRESSION_TYPES, "all"):
        if kind in scores_fp32:
            a, b = scores_fp32[kind], scores_fp16[kind]
            lines.append(f"| {kind} | {a['count']} | {100 * a['miou']:.1f} | {100 * a['ciou']:.1f} | "
                         f"{100 * b['miou']:.1f} | {100 * b['ciou']:.1f} |")
    lines += ["", "![training losses](loss.png)", ""]
    (out_dir / "TRAINING.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------ main


def make_deterministic(cfg: TrainConfig) -> None:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    # Not NaN-filling every new tensor (what deterministic mode does by default): ~30% of a step here,
    # and no kernel used reads memory it has not written.
    torch.utils.deterministic.fill_uninitialized_memory = False


def parse_args(argv=None) -> Tuple[argparse.Namespace, TrainConfig]:
    parser = argparse.ArgumentParser(prog="python -m export.train_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    tunable = ("decoder_steps", "grounding_steps", "steps", "prompts", "threads", "seed", "held_out_scenes")
    for field in fields(TrainConfig):
        if field.name in tunable:
            parser.add_argument("--" + field.name.replace("_", "-"), type=int, default=field.default)
    add_precision_argument(parser)
    args = parser.parse_args(argv)
    return args, replace(TrainConfig(), bfloat16=resolve_precision(args.precision),
                         **{name: getattr(args, name) for name in tunable})


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    command = " ".join(["python -m export.train_demo", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    make_deterministic(cfg)
    out_dir: Path = args.output_dir
    tokenizer = write_demo_tokenizer(out_dir)
    tokenize = Tokenize(tokenizer)
    config = demo_config(len(tokenizer))
    model = build_evf_sam(EvfSamConfig.from_dict(config))
    initialise(model)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; vocabulary {len(tokenizer)}")
    rows = train(model, tokenize, cfg)
    write_log(rows, out_dir / "training_log.csv")
    plot_losses(rows, out_dir / "loss.png")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_weights(model, out_dir)
    scenes = held_out_scenes(cfg.held_out_scenes)
    scores_fp32 = evaluate(model, scenes, tokenize)
    from evfsam.checkpoint import load_evf_sam

    scores_fp16 = evaluate(load_evf_sam(out_dir)[0], scenes, tokenize)
    seconds = time.perf_counter() - started
    write_report(out_dir, cfg, scores_fp32, scores_fp16, seconds, command)
    print((out_dir / "TRAINING.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
