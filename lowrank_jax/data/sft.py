"""Supervised fine-tuning data for causal LMs: JSONL records -> token rows with a loss mask,
packed several examples per row without attention across them.

Records, one JSON object per line:

* ``{"prompt": str, "response": str}``: ``[bos] prompt response [eos]``; the loss covers
  the response and the end-of-sequence token;
* ``{"messages": [{"role": "system"|"user"|"assistant"|..., "content": str}, ...]}``: the
  conversation rendered by the model's chat template; the loss covers what each assistant
  turn adds to the text (the template's rendering of ``messages[:i + 1]`` after that of
  ``messages[:i]`` with the generation prompt), so role headers and user turns are context.

``loss_on="all"`` puts every token in the loss. A row of length ``T`` holds (all
``[T]`` numpy arrays)::

    input_ids    tokens of one or more examples, then padding (0)
    segment_ids  1, 2, ... per packed example, 0 = padding (the decoder's attention lets a
                 token see only earlier tokens of its own segment)
    positions    0, 1, ... restarting at every example
    targets      the next token of the same example (0 where there is none)
    loss_mask    1.0 where ``targets`` is in the loss (the target token is a response token)

The mean loss of a batch is ``sum(loss_mask * CE(logits, targets)) / sum(loss_mask)``.
Packing is greedy in file order (an example goes into the current row if it fits, else
starts a new one), so rows are a pure function of the file and ``seq_len``. This module
tokenises through a small protocol (:class:`TextTokenizer`) and imports no model code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Literal, Mapping, Optional, Protocol, Sequence

import numpy as np

from lowrank_jax import validate
from lowrank_jax.data import chat

__all__ = ["TextTokenizer", "Example", "SFTRows", "read_jsonl", "record_segments", "tokenize_record",
           "pack", "load_sft", "render_chat_template"]

ROW_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")
_INT32_IDS = int(np.iinfo(np.int32).max) + 1  # the ids rows can hold, when no vocabulary size is known


class TextTokenizer(Protocol):
  """What the data layer needs from a tokenizer.

  ``encode`` adds no special tokens (special tokens written in the text, e.g. by a chat
  template, are recognised); ``bos_id``/``eos_id`` may be ``None``. A tokenizer may also
  have ``vocab_size`` (e.g. :class:`lowrank_jax.data.chat.ChatTokenizer`): then every id it
  gives is checked to lie in ``[0, vocab_size)`` when the data is built.
  """
  bos_id: Optional[int]
  eos_id: Optional[int]

  def encode(self, text: str) -> list[int]: ...

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = False) -> str: ...


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenised record: ``tokens`` and ``in_loss`` (``True`` for response tokens)."""
  tokens: np.ndarray
  in_loss: np.ndarray
  source: str


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
  """``[(\"file:line\", record), ...]`` of a JSONL file (blank lines skipped).

  Raises:
    ValueError: naming the file and line of a line that is not a JSON object.
  """
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{os.fspath(path)}:{i}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
      out.append((where, rec))
  if not out:
    raise ValueError(f"{os.fspath(path)}: no records")
  return out


render_chat_template = chat.render_chat_template  # the one renderer (kept here under its old name)


def _check_messages(messages, where: str) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
  for j, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
      raise ValueError(f"{where}: messages[{j}] must be an object with string 'role' and 'content', "
                       f"got {json.dumps(m)[:200]}")
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: no 'assistant' message to train on")
  return messages


def record_segments(record: Mapping, tokenizer: TextTokenizer, where: str = "record") -> list[tuple[str, bool]]:
  """The record's text as ``[(piece, in_loss), ...]`` (see the module docstring).

  Raises:
    ValueError: an unknown record layout, or a chat template whose renderings are not
      prefixes of each other (the response spans could not be found).
  """
  keys = set(record)
  if keys == {"prompt", "response"}:
    p, r = record["prompt"], record["response"]
    if not (isinstance(p, str) and isinstance(r, str)):
      raise ValueError(f"{where}: 'prompt' and 'response' must be strings")
    return [(p, False), (r, True)]
  if keys == {"messages"}:
    messages = _check_messages(record["messages"], where)
    render = tokenizer.apply_chat_template
    pieces, done = [], ""
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      if i == 0:
        raise ValueError(f"{where}: messages[0] is an assistant turn; the chat template cannot render "
                         "the empty conversation before it (start with a system or user message)")
      before = render(messages[:i], add_generation_prompt=True)
      after = render(messages[:i + 1], add_generation_prompt=False)
      if not (before.startswith(done) and after.startswith(before)):
        raise ValueError(f"{where}: the chat template's rendering of the first {i + 1} messages does "
                         f"not extend that of the first {i} (with the generation prompt); cannot "
                         "locate the assistant turn's tokens")
      pieces += [(before[len(done):], False), (after[len(before):], True)]
      done = after
    rest = render(messages, add_generation_prompt=False)[len(done):]
    if rest:
      pieces.append((rest, False))
    return [(t, flag) for t, flag in pieces if t]
  raise ValueError(f"{where}: a record is {{\"prompt\", \"response\"}} or {{\"messages\"}}, "
                   f"got keys {sorted(keys)}")


def _check_ids(ids: np.ndarray, vocab_size: Optional[int], source: str) -> None:
  """``ids`` in ``[0, vocab_size)``, or in the int32 range (what rows hold) without a
  vocabulary size; a :class:`lowrank_jax.validate.TokenIdError` names ``source``."""
  if vocab_size is None:
    validate.check_token_ids(ids, _INT32_IDS, what=f"{source}: token ids (no vocab_size known: the int32 range)")
  else:
    validate.check_token_ids(ids, int(vocab_size), what=f"{source}: token ids")


def _token_id(t, where: str, position: int, what: str) -> int:
  """``t`` as an int; a float, bool or other non-integer id is an error naming where it is."""
  if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
    raise TypeError(f"{where}: {what} gave {type(t).__name__} {t!r} at token position {position}, "
                    f"not an integer token id")
  return int(t)


def tokenize_record(record: Mapping, tokenizer: TextTokenizer, where: str = "record",
                    loss_on: Literal["response", "all"] = "response", *,
                    vocab_size: Optional[int] = None) -> Example:
  """One :class:`Example`: the pieces tokenised one by one (so a response span is exact),
  with ``bos``/``eos`` around a prompt/response record.

  Args:
    record: a ``{"prompt", "response"}`` or ``{"messages"}`` record.
    tokenizer: a :class:`TextTokenizer`.
    where: the record's name in messages (``"file:line"``).
    loss_on: ``"response"`` or ``"all"`` (see the module docstring).
    vocab_size: ids must lie in ``[0, vocab_size)``; default the tokenizer's ``vocab_size``
      if it has one, else ids are only checked to be non-negative int32 values.

  Raises:
    TypeError: the tokenizer gave a non-integer id (naming ``where`` and the position).
    lowrank_jax.validate.TokenIdError: an id outside the vocabulary (naming ``where``, the
      id, its position and the vocabulary size).
  """
  pieces = record_segments(record, tokenizer, where)
  tokens: list[int] = []
  flags: list[bool] = []
  is_chat = "messages" in record
  if not is_chat and tokenizer.bos_id is not None:
    tokens.append(_token_id(tokenizer.bos_id, where, 0, "the tokenizer's bos_id"))
    flags.append(False)
  for text, in_loss in pieces:
    ids = [_token_id(t, where, len(tokens) + j, "the tokenizer") for j, t in enumerate(tokenizer.encode(text))]
    tokens += ids
    flags += [in_loss] * len(ids)
  if not is_chat and tokenizer.eos_id is not None:
    tokens.append(_token_id(tokenizer.eos_id, where, len(tokens), "the tokenizer's eos_id"))
    flags.append(True)
  ids = np.asarray(tokens, np.int64)
  _check_ids(ids, vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size", None), where)
  flags_arr = np.ones(len(tokens), bool) if loss_on == "all" else np.asarray(flags, bool)
  return Example(ids.astype(np.int32), flags_arr, where)


@dataclasses.dataclass(frozen=True)
class SFTRows:
  """Packed rows (``arrays``: :data:`ROW_KEYS` -> ``[N, T]``) and what packing did."""
  arrays: Mapping[str, np.ndarray]
  examples: int
  truncated: int
  dropped: int
  fingerprint: str

  @property
  def rows(self) -> int:
    return int(self.arrays["input_ids"].shape[0])

  @property
  def loss_tokens(self) -> int:
    return int(self.arrays["loss_mask"].sum())


def _fit(ex: Example, seq_len: int, too_long: str) -> Optional[Example]:
  if len(ex.tokens) <= seq_len:
    return ex
  if too_long == "error":
    raise ValueError(f"{ex.source}: {len(ex.tokens)} tokens exceed seq_len {seq_len}")
  if too_long == "drop":
    return None
  return Example(ex.tokens[:seq_len], ex.in_loss[:seq_len], ex.source)


def _check_example(ex: Example, vocab_size: Optional[int]) -> None:
  """An example's ids (e.g. pre-tokenised, not from :func:`tokenize_record`): integers in
  ``[0, vocab_size)`` (the int32 range without a vocabulary size), named by ``ex.source``."""
  _check_ids(ex.tokens, vocab_size, ex.source)
  if np.shape(ex.in_loss) != np.shape(ex.tokens):
    raise ValueError(f"{ex.source}: in_loss has shape {np.shape(ex.in_loss)}, tokens {np.shape(ex.tokens)}")


def pack(examples: Sequence[Example], seq_len: int, *, packing: bool = True,
         too_long: Literal["truncate", "drop", "error"] = "truncate",
         vocab_size: Optional[int] = None) -> SFTRows:
  """Rows of ``seq_len`` tokens (see the module docstring).

  Args:
    examples: tokenised examples, in order.
    seq_len: row length ``T``.
    packing: several examples per row; ``False``: one per row, padded.
    too_long: an example longer than ``T``: ``"truncate"``, ``"drop"`` or ``"error"``.
    vocab_size: every example's ids must lie in ``[0, vocab_size)``; ``None``: they must be
      non-negative int32 values.

  Returns:
    :class:`SFTRows`; examples left without any loss token (after truncation) are dropped.

  Raises:
    lowrank_jax.validate.TokenIdError: an id out of range, naming the example's source,
      the id and its position.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  rows: list[list[Example]] = []
  used = seq_len + 1  # forces a new row for the first example
  truncated = dropped = 0
  for ex in examples:
    _check_example(ex, vocab_size)
    fitted = _fit(ex, seq_len, too_long)
    if fitted is None:
      dropped += 1
      continue
    truncated += fitted is not ex
    if not fitted.in_loss[1:].any():  # nothing to predict (the first token is never a target)
      dropped += 1
      continue
    n = len(fitted.tokens)
    if packing and used + n <= seq_len:
      rows[-1].append(fitted)
      used += n
    else:
      rows.append([fitted])
      used = n
  if not rows:
    raise ValueError(f"no example left to train on ({dropped} dropped: too long or no loss tokens)")
  out = {k: np.zeros((len(rows), seq_len), np.float32 if k == "loss_mask" else np.int32) for k in ROW_KEYS}
  for r, row in enumerate(rows):
    start = 0
    for s, ex in enumerate(row, 1):
      n = len(ex.tokens)
      sl = slice(start, start + n)
      out["input_ids"][r, sl] = ex.tokens
      out["segment_ids"][r, sl] = s
      out["positions"][r, sl] = np.arange(n)
      out["targets"][r, start:start + n - 1] = ex.tokens[1:]
      out["loss_mask"][r, start:start + n - 1] = ex.in_loss[1:]
      start += n
  digest = hashlib.sha256()
  for k in ROW_KEYS:
    digest.update(k.encode())
    digest.update(np.ascontiguousarray(out[k]).tobytes())
  return SFTRows(arrays=out, examples=sum(len(r) for r in rows), truncated=truncated, dropped=dropped,
                 fingerprint=digest.hexdigest())


def load_sft(path: str | os.PathLike, tokenizer: TextTokenizer, seq_len: int, *, packing: bool = True,
             loss_on: Literal["response", "all"] = "response",
             too_long: Literal["truncate", "drop", "error"] = "truncate",
             vocab_size: Optional[int] = None) -> SFTRows:
  """A JSONL file as packed rows (:func:`read_jsonl` -> :func:`tokenize_record` -> :func:`pack`);
  every record's ids are checked against ``vocab_size`` (default: the tokenizer's), an id
  out of range raising :class:`lowrank_jax.validate.TokenIdError` naming ``file:line``."""
  examples = [tokenize_record(rec, tokenizer, where, loss_on, vocab_size=vocab_size)
              for where, rec in read_jsonl(path)]
  return pack(examples, seq_len, packing=packing, too_long=too_long, vocab_size=vocab_size)
