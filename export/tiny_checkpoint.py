"""Write a random-weight EVF-SAM checkpoint in the real on-disk layout (for tests and the demo).

The layout is what upstream publishes: `config.json` (model_type "evf"), weights as
`model.safetensors` / `pytorch_model.bin` / shards + index, and the XLM-R sentencepiece tokenizer
(`sentencepiece.bpe.model`, `tokenizer_config.json`, `special_tokens_map.json`).  Masks from such a
checkpoint are meaningless; only the plumbing is real.

    python -m export.tiny_checkpoint OUT_DIR [--size tiny|vit-b|full] [--format safetensors|bin|sharded]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

import torch

from evfsam.modeling.builder import EvfSamConfig, build_evf_sam

SIZES: Dict[str, dict] = {
    "tiny": {
        "hidden_size": 32,
        "sam_scale": "base",
        "mm_extractor_scale": "base",
        "sam_image_encoder": {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]},
        "beit3": {"embed_dim": 32, "layers": 2, "attention_heads": 2, "ffn_embed_dim": 64, "vocab_size": 256},
    },
    # SAM ViT-B image encoder with a small BEiT-3: the encoder dominates, as in the real model.
    "vit-b": {
        "hidden_size": 64,
        "sam_scale": "base",
        "mm_extractor_scale": "base",
        "beit3": {"embed_dim": 64, "layers": 2, "attention_heads": 2, "ffn_embed_dim": 128, "vocab_size": 256},
    },
    # The published architecture (SAM ViT-H + BEiT-3 large) with a tiny vocabulary.
    "full": {"hidden_size": 1024, "sam_scale": "huge", "mm_extractor_scale": "large"},
}

SPM_VOCAB = 100
WORDS = (
    "the a man woman person dog cat zebra horse car bus tree sky left right top bottom middle center "
    "red blue green white black yellow big small tall short front back near far behind holding "
    "wearing shirt hat bag umbrella giraffe elephant sheep cow bird boat plane train truck chair "
    "table bed couch cup bottle plate pizza cake banana apple orange sandwich standing sitting walking "
    "running looking smiling closest farthest second third first last one two three of on in with "
    "and to at by near under above next"
).split()


def write_sentencepiece(out_dir: Path, seed: int = 0) -> None:
    """A small unigram sentencepiece model laid out like XLM-R's (unk=0, <s>=1, </s>=2)."""
    import random

    rng = random.Random(seed)
    train_sentencepiece(out_dir, [" ".join(rng.choices(WORDS, k=rng.randint(2, 9))) for _ in range(3000)], SPM_VOCAB)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
               "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, **special}, indent=2)
    )


def train_sentencepiece(out_dir: Path, lines, vocab_size: int) -> Path:
    """`sentencepiece.bpe.model` (unigram, XLM-R's piece ids: unk=0, <s>=1, </s>=2) trained on `lines`."""
    import sentencepiece as spm

    corpus = out_dir / "spm_corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / "sentencepiece.bpe"),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "sentencepiece.bpe.vocab").unlink()
    return out_dir / "sentencepiece.bpe.model"


def random_state_dict(config: EvfSamConfig, seed: int) -> Dict[str, torch.Tensor]:
    """Every tensor random (zero-initialised ones too), scaled so activations stay O(1)."""
    torch.manual_seed(seed)
    model = build_evf_sam(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("positional_encoding_gaussian_matrix"):
                continue  # SAM draws it at construction; keep it
            if tensor.dim() <= 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))
            elif tensor.dim() <= 1:
                tensor.copy_(0.02 * torch.randn_like(tensor))
            elif name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w", "cls_token", "mask_token")) or "embed" in name:
                tensor.copy_(0.2 * torch.randn_like(tensor))
        _spread_mask_logits(model)
    return dict(model.state_dict())


def _spread_mask_logits(model) -> None:
    """Make random masks informative: logits of both signs, O(1), that depend on the prompt.

    With default init the mask logits are ~1e-3 and all of one sign (the upscaled features pass a
    GELU, so their mean dominates), which would make every mask all-ones.  The hypernetwork output is
    projected off the mean feature direction and scaled up, and the prompt projection is amplified.
    """
    decoder = model.visual_model.mask_decoder
    model.text_hidden_fcs[0][2].weight.mul_(30)
    features = []
    hook = decoder.output_upscaling.register_forward_hook(lambda _m, _i, out: features.append(out))
    model.decode_masks(torch.randn(2, 256, 64, 64), torch.randn(2, 1, 256))
    hook.remove()
    mean = features[0].mean(dim=(0, 2, 3))
    mean = mean / mean.norm()
    projection = torch.eye(len(mean)) - torch.outer(mean, mean)
    for mlp in decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.copy_(projection @ mlp.layers[-1].weight * 1000)
        mlp.layers[-1].bias.copy_(projection @ mlp.layers[-1].bias)


def write_tiny_checkpoint(
    out_dir: Path, size: str = "tiny", weights_format: str = "safetensors", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = {"model_type": "evf", "architectures": ["EvfSamModel"], "out_dim": 256,
           "torch_dtype": str(dtype).replace("torch.", ""), **SIZES[size]}
    config = EvfSamConfig.from_dict(raw)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    state = {k: v.to(dtype).contiguous() for k, v in random_state_dict(config, seed).items()}
    _write_weights(out_dir, state, weights_format)
    write_sentencepiece(out_dir, seed)
    return out_dir


def _write_weights(out_dir: Path, state: Dict[str, torch.Tensor], weights_format: str) -> None:
    from safetensors.torch import save_file

    if weights_format == "safetensors":
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    elif weights_format == "bin":
        torch.save(state, out_dir / "pytorch_model.bin")
    elif weights_format == "sharded":
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
        weight_map = {}
        for file_name, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(out_dir / file_name), metadata={"format": "pt"})
            weight_map.update({k: file_name for k in keys})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    else:
        raise ValueError(f"unknown weights format {weights_format!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--format", choices=["safetensors", "bin", "sharded"], default="safetensors")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_tiny_checkpoint(args.out_dir, args.size, args.format, getattr(torch, args.dtype), args.seed)
    print(f"wrote random-weight EVF-SAM checkpoint ({args.size}) to {args.out_dir}")


if __name__ == "__main__":
    main()
