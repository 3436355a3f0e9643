"""Prompt tokenization with the `tokenizers` library alone (what the server runs).

Upstream tokenizes with the slow sentencepiece `XLMRobertaTokenizer` (`<s> ... </s>`, fairseq ids:
<s>=0, <pad>=1, </s>=2, <unk>=3).  At export time the checkpoint's tokenizer is converted once to
`tokenizer.json`; tests check the conversion id-for-id against the slow tokenizer.
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
    """Copy the checkpoint's tokenizer.json, or convert its sentencepiece XLM-R tokenizer (export time)."""
    existing = checkpoint_dir / "tokenizer.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if existing.is_file():
        out_path.write_bytes(existing.read_bytes())
        return out_path
    if not (checkpoint_dir / "sentencepiece.bpe.model").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir}: no tokenizer (expected sentencepiece.bpe.model or tokenizer.json)"
        )
    from transformers import XLMRobertaTokenizer
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    slow = XLMRobertaTokenizer.from_pretrained(str(checkpoint_dir))
    convert_slow_tokenizer(slow).save(str(out_path))
    return out_path
