"""The served tokenizer (tokenizer.json, `tokenizers` only) against upstream's slow XLMRobertaTokenizer,
id for id, with and without the multitask checkpoints' added token "[semantic]"."""
from __future__ import annotations

import json
import shutil

import pytest

from evfsam.tokenization import PromptTokenizer, write_tokenizer_json
from export.tiny_checkpoint import SEMANTIC_TOKEN, write_sentencepiece

PROMPTS = [
    "zebra top left", "  a cat  ", "man\u3000left", "ｍａｎ left", "Ünïcödé piñata 😀", "the\tman\nleft",
    "[semantic] hair", "[semantic]hair", "hair[semantic]", "a [semantic] b", "a[semantic]b", "[semantic][semantic]",
    "[semantic] [semantic] man", "  [semantic]   hair  ", "man  [semantic]", "the\t[semantic]\nman", "[semantic]",
    "x[semantic]y[semantic]z", "[[semantic]]", "[semantic]s", "man\u3000[semantic]\u3000left", "man\xa0[semantic]",
    "[SEMANTIC] hair", "[Semantic] hair", "［semantic］ man", "[semantic ] man", "[sem antic]",
    "a <mask> b", "a<mask>b", "<s>man</s>", "man <s> woman", "man<pad>woman", "man <unk> woman", "<s>[semantic]</s>",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Plain XLM-R tokenizer; with "[semantic]" as transformers 4.57's save_pretrained writes it; and
    with only the added_tokens.json that the published multitask checkpoints ship."""
    root = tmp_path_factory.mktemp("tokenizers")
    write_sentencepiece(root / "plain")
    write_sentencepiece(root / "multitask", added_tokens=[SEMANTIC_TOKEN])
    shutil.copytree(root / "plain", root / "added_tokens_json_only")
    semantic_id = json.loads((root / "multitask" / "added_tokens.json").read_text())[SEMANTIC_TOKEN]
    (root / "added_tokens_json_only" / "added_tokens.json").write_text(json.dumps({SEMANTIC_TOKEN: semantic_id}))
    return {name: root / name for name in ("plain", "multitask", "added_tokens_json_only")}


def _slow(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), use_fast=False)  # upstream's inference.py


@pytest.mark.parametrize("layout", ["plain", "multitask", "added_tokens_json_only"])
def test_served_tokenizer_matches_slow_tokenizer(tokenizer_dirs, tmp_path, layout):
    directory = tokenizer_dirs[layout]
    served = PromptTokenizer(write_tokenizer_json(directory, tmp_path / "tokenizer.json"))
    slow = _slow(directory)
    for prompt in PROMPTS:
        assert served.encode(prompt) == slow(prompt)["input_ids"], prompt


def test_semantic_token_is_one_id_after_the_vocabulary(tokenizer_dirs, tmp_path):
    slow = _slow(tokenizer_dirs["multitask"])
    semantic = slow.convert_tokens_to_ids(SEMANTIC_TOKEN)
    assert semantic == len(slow) - 1 == slow.vocab_size  # as 64002 after XLM-R's 64002 ids (<mask> 64001)
    served = PromptTokenizer(write_tokenizer_json(tokenizer_dirs["multitask"], tmp_path / "tokenizer.json"))
    ids = served.encode("[semantic] hair")
    assert ids[:2] == [0, semantic] and ids[-1] == 2 and semantic not in served.encode("hair")
    assert semantic not in PromptTokenizer(
        write_tokenizer_json(tokenizer_dirs["plain"], tmp_path / "plain.json")
    ).encode("[semantic] hair")


def test_multitask_tokenizer_files_are_what_save_pretrained_writes(tokenizer_dirs):
    directory = tokenizer_dirs["multitask"]
    semantic_id = json.loads((directory / "added_tokens.json").read_text())[SEMANTIC_TOKEN]
    decoder = json.loads((directory / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder[str(semantic_id)] == {"content": SEMANTIC_TOKEN, "lstrip": False, "normalized": True,
                                         "rstrip": False, "single_word": False, "special": False}


def test_sentencepiece_model_wins_over_a_shipped_tokenizer_json(tokenizer_dirs, tmp_path):
    """Upstream ignores a tokenizer.json (use_fast=False); so does the conversion."""
    directory = tmp_path / "checkpoint"
    shutil.copytree(tokenizer_dirs["multitask"], directory)
    write_tokenizer_json(tokenizer_dirs["plain"], directory / "tokenizer.json")  # stale: no "[semantic]"
    served = PromptTokenizer(write_tokenizer_json(directory, tmp_path / "tokenizer.json"))
    assert served.encode("[semantic] hair") == _slow(directory)("[semantic] hair")["input_ids"]


def test_tiny_sam2_checkpoint_ships_the_multitask_tokenizer(tiny_sam2_checkpoint, tmp_path):
    served = PromptTokenizer(write_tokenizer_json(tiny_sam2_checkpoint, tmp_path / "tokenizer.json"))
    slow = _slow(tiny_sam2_checkpoint)
    assert served.encode("[semantic] zebra") == slow("[semantic] zebra")["input_ids"]
    assert slow.convert_tokens_to_ids(SEMANTIC_TOKEN) in served.encode("[semantic] zebra")
