"""Prompt tokenization with the `tokenizers` library alone (what the server runs).

Upstream tokenizes with the slow sentencepiece `XLMRobertaTokenizer` (`<s> ... </s>`, fairseq ids:
<s>=0, <pad>=1, </s>=2, <unk>=3), including the multitask checkpoints' added token "[semantic]".
At export time the checkpoint's tokenizer is converted once to `tokenizer.json`; tests check the
conversion id-for-id against the slow tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from .specs import MAX_TEXT_TOKENS, TEXT_BUCKET

PAD_ID = 1
MAX_PROMPT_BYTES = 8192


class InvalidPrompt(ValueError):
    """The prompt cannot be served; the message is safe to show a client."""


def decode_prompt(raw: bytes) -> str:
    if len(raw) > MAX_PROMPT_BYTES:
        raise InvalidPrompt(f"prompt is {len(raw)} bytes; the limit is {MAX_PROMPT_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPrompt(f"prompt is not valid UTF-8 (byte {exc.start})") from None


class PromptTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_tokens: int = MAX_TEXT_TOKENS):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_tokens = max_tokens

    def encode(self, prompt: str) -> List[int]:
        """`<s> prompt </s>` ids; empty, whitespace-only and over-long prompts are rejected."""
        if not prompt.strip():
            raise InvalidPrompt("prompt is empty or whitespace only")
        ids = self._tokenizer.encode(prompt).ids
        if len(ids) > self.max_tokens:
            raise InvalidPrompt(
                f"prompt is {len(ids)} tokens (with <s> and </s>); the limit is {self.max_tokens}"
            )
        return ids


def pad_batch(sequences: Sequence[Sequence[int]], bucket: int = TEXT_BUCKET) -> Tuple[np.ndarray, np.ndarray]:
    """Right-pad to a common length rounded up to `bucket`: (input_ids, attention_mask), int64."""
    longest = max(len(s) for s in sequences)
    length = -(-longest // bucket) * bucket
    input_ids = np.full((len(sequences), length), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def write_tokenizer_json(checkpoint_dir: Path, out_path: Path) -> Path:
    """Convert the checkpoint's slow XLM-R tokenizer to tokenizer.json (export time).

    Upstream always uses the slow tokenizer (`use_fast=False`), so when `sentencepiece.bpe.model`
    is there it is converted even if the checkpoint also ships a tokenizer.json; a tokenizer.json
    alone is copied as is.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not (checkpoint_dir / "sentencepiece.bpe.model").is_file():
        existing = checkpoint_dir / "tokenizer.json"
        if not existing.is_file():
            raise FileNotFoundError(
                f"{checkpoint_dir}: no tokenizer (expected sentencepiece.bpe.model or tokenizer.json)"
            )
        out_path.write_bytes(existing.read_bytes())
        return out_path
    from transformers import XLMRobertaTokenizer

    slow = XLMRobertaTokenizer.from_pretrained(str(checkpoint_dir))
    slow_tokenizer_to_json(slow, out_path)
    return out_path


def slow_tokenizer_to_json(slow, out_path: Path) -> None:
    """transformers' conversion of the sentencepiece model, with the added tokens put back the way
    the slow tokenizer matches them.

    The plain conversion keeps only <s> and </s> as added tokens, so "[semantic]" (and <pad>, <unk>,
    <mask> typed in a prompt) would be split into word pieces.  The slow tokenizer cuts added tokens
    out of the raw text (case-sensitive, before any normalisation) and sentencepiece then drops the
    whitespace at the edges of each remaining piece.  In `tokenizers` terms that is: every added token
    `normalized=False` (matched on the raw text) with `lstrip=rstrip=True` (the edge whitespace goes).
    """
    import json

    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    spec = json.loads(convert_slow_tokenizer(slow).to_str())
    spec["added_tokens"] = [
        {"id": token_id, "content": token.content, "single_word": token.single_word, "lstrip": True,
         "rstrip": True, "normalized": False, "special": token.special}
        for token_id, token in sorted(slow.added_tokens_decoder.items())
    ]
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    wrong = {t.content: (i, tokenizer.token_to_id(t.content)) for i, t in slow.added_tokens_decoder.items()
             if tokenizer.token_to_id(t.content) != i}
    if wrong:
        raise ValueError(f"added tokens got other ids than the slow tokenizer's (slow, converted): {wrong}")
    tokenizer.save(str(out_path))
