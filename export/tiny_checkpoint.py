"""Write a random-weight EVF-SAM / EVF-SAM2 checkpoint in the real on-disk layout (for tests and the demo).

The layout is what upstream publishes: `config.json` (model_type "evf"), weights as
`model.safetensors` / `pytorch_model.bin` / shards + index, and the XLM-R sentencepiece tokenizer
(`sentencepiece.bpe.model`, `tokenizer_config.json`, `special_tokens_map.json`; `--multitask` adds
the `[semantic]` token of the `-multitask` checkpoints, saved as transformers' slow tokenizer saves
added tokens).  Masks from such a checkpoint are meaningless; only the plumbing is real.

Sizes, per family ("ori": SAM ViT, "sam2": SAM-2 Hiera), always with the real mask decoder:
- tiny: a few-channel image encoder and BEiT-3 (seconds to build; SAM-2's fixed-size decoder and
  memory modules make the sam2 one ~45 MB);
- vit-b: a real-size image encoder whose CPU cost is realistic (SAM ViT-B / SAM-2 Hiera-B+) with a
  small BEiT-3;
- full: the published architecture (SAM ViT-H or SAM-2 Hiera-L, BEiT-3 large) with its vocabulary size.

    python -m export.tiny_checkpoint OUT_DIR [--family ori|sam2] [--size tiny|vit-b|full]
        [--format safetensors|bin|sharded] [--dtype float32|float16|bfloat16] [--multitask]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Sequence

import torch

from evfsam.modeling.builder import EvfConfig, build_evf_model, config_from_dict

SIZES: Dict[str, dict] = {  # "ori"
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
    # The published architecture (SAM ViT-H + BEiT-3 large).
    "full": {"hidden_size": 1024, "sam_scale": "huge", "mm_extractor_scale": "large"},
}
SAM2_SIZES: Dict[str, dict] = {
    # Hiera-L's layout in miniature: 4 stages, a global block in stage 2, window sizes 8/4/16/8.
    "tiny": {
        "hidden_size": 32,
        "sam_scale": "large",
        "mm_extractor_scale": "base",
        "sam2_image_encoder": {"embed_dim": 8, "num_heads": 1, "stages": [1, 2, 3, 1], "global_att_blocks": [4],
                               "window_spec": [8, 4, 16, 8], "window_pos_embed_bkg_spatial_size": [7, 7]},
        "beit3": SIZES["tiny"]["beit3"],
    },
    # SAM-2 Hiera-B+ (sam2_hiera_b+.yaml) with a small BEiT-3.
    "vit-b": {
        "hidden_size": 64,
        "sam_scale": "large",
        "mm_extractor_scale": "base",
        "sam2_image_encoder": {"embed_dim": 112, "num_heads": 2, "stages": [2, 3, 16, 3],
                               "global_att_blocks": [12, 16, 20], "window_spec": [8, 4, 14, 7],
                               "window_pos_embed_bkg_spatial_size": [14, 14]},
        "beit3": SIZES["vit-b"]["beit3"],
    },
    # The published architecture (SAM-2 Hiera-L + BEiT-3 large).
    "full": {"hidden_size": 1024, "sam_scale": "large", "mm_extractor_scale": "large"},
}
FAMILY_SIZES: Dict[str, Dict[str, dict]] = {"ori": SIZES, "sam2": SAM2_SIZES}
ARCHITECTURE = {"ori": "EvfSamModel", "sam2": "EvfSam2Model"}
SEMANTIC_TOKEN = "[semantic]"  # the multitask checkpoints' added token (id 64002 in the real vocabulary)

SPM_VOCAB = 100
WORDS = (
    "the a man woman person dog cat zebra horse car bus tree sky left right top bottom middle center "
    "red blue green white black yellow big small tall short front back near far behind holding "
    "wearing shirt hat bag umbrella giraffe elephant sheep cow bird boat plane train truck chair "
    "table bed couch cup bottle plate pizza cake banana apple orange sandwich standing sitting walking "
    "running looking smiling closest farthest second third first last one two three of on in with "
    "and to at by near under above next"
).split()


def write_sentencepiece(out_dir: Path, seed: int = 0, added_tokens: Sequence[str] = ()) -> None:
    """A small unigram sentencepiece model laid out like XLM-R's (unk=0, <s>=1, </s>=2).

    `added_tokens` are added to the slow `XLMRobertaTokenizer` and saved with its `save_pretrained`
    (added_tokens.json + tokenizer_config.json's added_tokens_decoder), as upstream's multitask
    tokenizer was.
    """
    import random

    rng = random.Random(seed)
    train_sentencepiece(out_dir, [" ".join(rng.choices(WORDS, k=rng.randint(2, 9))) for _ in range(3000)], SPM_VOCAB)
    write_tokenizer_files(out_dir, added_tokens)


def write_tokenizer_files(out_dir: Path, added_tokens: Sequence[str] = ()) -> None:
    """XLM-R's special tokens and tokenizer config next to `sentencepiece.bpe.model` (+ `added_tokens`)."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
               "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, **special}, indent=2)
    )
    if added_tokens:
        from transformers import XLMRobertaTokenizer

        tokenizer = XLMRobertaTokenizer.from_pretrained(str(out_dir))
        tokenizer.add_tokens(list(added_tokens))
        tokenizer.save_pretrained(str(out_dir))


def train_sentencepiece(out_dir: Path, lines, vocab_size: int) -> Path:
    """`sentencepiece.bpe.model` (unigram, XLM-R's piece ids: unk=0, <s>=1, </s>=2) trained on `lines`."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
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


def random_state_dict(config: EvfConfig, seed: int) -> Dict[str, torch.Tensor]:
    """Every tensor random (zero-initialised ones too), scaled so activations stay O(1)."""
    torch.manual_seed(seed)
    model = build_evf_model(config)
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
        _spread_mask_logits(model, config.family)
    return dict(model.state_dict())


def _spread_mask_logits(model, family: str) -> None:
    """Make random masks informative: logits of both signs, O(1), that depend on the prompt.

    With default init the mask logits are ~1e-3 and all of one sign (the upscaled features pass a
    GELU, so their mean dominates), which would make every mask all-ones.  The hypernetwork output is
    projected off the mean feature direction and scaled up, and the prompt projection is amplified.
    SAM-2's logits are then rescaled to a standard deviation of SAM2_MASK_LOGIT_STD, where token 0's
    stability score sits near the 0.98 threshold of the single-mask fallback.
    """
    model.text_hidden_fcs[0][2].weight.mul_(30)
    if family == "sam2":
        decoder = model.visual_model.sam_mask_decoder
        sample = _sam2_mask_logits_sample(model)
    else:
        decoder = model.visual_model.mask_decoder

        def sample():
            return model.decode_masks(torch.randn(2, 256, 64, 64), torch.randn(2, 1, 256))[0]

    features = []
    hook = decoder.output_upscaling[-1].register_forward_hook(lambda _m, _i, out: features.append(out))
    sample()
    hook.remove()
    mean = features[0].mean(dim=(0, 2, 3))
    mean = mean / mean.norm()
    projection = torch.eye(len(mean)) - torch.outer(mean, mean)
    for mlp in decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.copy_(projection @ mlp.layers[-1].weight * 1000)
        mlp.layers[-1].bias.copy_(projection @ mlp.layers[-1].bias)
    if family == "sam2":
        scale = SAM2_MASK_LOGIT_STD / sample().std()
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(scale)
            mlp.layers[-1].bias.mul_(scale)


SAM2_MASK_LOGIT_STD = 10.0


def _sam2_mask_logits_sample(model):
    """All four mask tokens' logits for one random image and two random prompts (fixed inputs)."""
    sam = model.visual_model
    image_embeddings, feats_0, feats_1 = model.encode_image(torch.randn(1, 3, 1024, 1024))
    text_embeds = torch.randn(2, 1, 256)

    def sample():
        sparse, dense = sam.sam_prompt_encoder(text_embeds)
        pe = sam.sam_prompt_encoder.get_dense_pe()
        return sam.sam_mask_decoder.predict_masks(image_embeddings, pe, sparse, dense, feats_0, feats_1)[0]

    return sample


def write_tiny_checkpoint(
    out_dir: Path,
    size: str = "tiny",
    weights_format: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    family: str = "ori",
    multitask: bool = False,
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = {"model_type": "evf", "architectures": [ARCHITECTURE[family]], "out_dim": 256,
           "torch_dtype": str(dtype).replace("torch.", ""), **FAMILY_SIZES[family][size]}
    config = config_from_dict(raw, family)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    state = {k: v.to(dtype).contiguous() for k, v in random_state_dict(config, seed).items()}
    _write_weights(out_dir, state, weights_format)
    write_sentencepiece(out_dir, seed, added_tokens=[SEMANTIC_TOKEN] if multitask else [])
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
    parser.add_argument("--family", choices=sorted(FAMILY_SIZES), default="ori")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--format", choices=["safetensors", "bin", "sharded"], default="safetensors")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multitask", action="store_true", help=f"add the {SEMANTIC_TOKEN} token to the tokenizer")
    args = parser.parse_args()
    write_tiny_checkpoint(args.out_dir, args.size, args.format, getattr(torch, args.dtype), args.seed,
                          family=args.family, multitask=args.multitask)
    print(f"wrote random-weight EVF-SAM checkpoint ({args.family}, {args.size}) to {args.out_dir}")


if __name__ == "__main__":
    main()
