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

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

__all__ = ["TextTokenizer", "Example", "SFTRows", "read_jsonl", "record_segments", "tokenize_record",
           "pack", "load_sft", "render_chat_template"]

ROW_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


class TextTokenizer(Protocol):
  """What the data layer needs from a tokenizer.

  ``encode`` adds no special tokens (special tokens written in the text, e.g. by a chat
  template, are recognised); ``bos_id``/``eos_id`` may be ``None``.
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


def _raise(message: str):
  raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render_chat_template(template: str, messages: Sequence[Mapping[str, str]], *,
                         add_generation_prompt: bool = False, **special_tokens: str) -> str:
  """A Hugging Face chat template (Jinja, from ``tokenizer_config.json``) rendered as
  ``transformers`` renders it: a sandboxed environment with ``trim_blocks`` and
  ``lstrip_blocks``, the ``tojson`` filter, ``raise_exception``, loop controls, and the
  special tokens (``bos_token=...``) as variables."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          **special_tokens)


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


def tokenize_record(record: Mapping, tokenizer: TextTokenizer, where: str = "record",
                    loss_on: Literal["response", "all"] = "response") -> Example:
  """One :class:`Example`: the pieces tokenised one by one (so a response span is exact),
  with ``bos``/``eos`` around a prompt/response record."""
  pieces = record_segments(record, tokenizer, where)
  tokens: list[int] = []
  flags: list[bool] = []
  chat = "messages" in record
  if not chat and tokenizer.bos_id is not None:
    tokens.append(int(tokenizer.bos_id))
    flags.append(False)
  for text, in_loss in pieces:
    ids = [int(t) for t in tokenizer.encode(text)]
    tokens += ids
    flags += [in_loss] * len(ids)
  if not chat and tokenizer.eos_id is not None:
    tokens.append(int(tokenizer.eos_id))
    flags.append(True)
  flags_arr = np.ones(len(tokens), bool) if loss_on == "all" else np.asarray(flags, bool)
  return Example(np.asarray(tokens, np.int32), flags_arr, where)


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


def pack(examples: Sequence[Example], seq_len: int, *, packing: bool = True,
         too_long: Literal["truncate", "drop", "error"] = "truncate") -> SFTRows:
  """Rows of ``seq_len`` tokens (see the module docstring).

  Args:
    examples: tokenised examples, in order.
    seq_len: row length ``T``.
    packing: several examples per row; ``False``: one per row, padded.
    too_long: an example longer than ``T``: ``"truncate"``, ``"drop"`` or ``"error"``.

  Returns:
    :class:`SFTRows`; examples left without any loss token (after truncation) are dropped.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  rows: list[list[Example]] = []
  used = seq_len + 1  # forces a new row for the first example
  truncated = dropped = 0
  for ex in examples:
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
             too_long: Literal["truncate", "drop", "error"] = "truncate") -> SFTRows:
  """A JSONL file as packed rows (:func:`read_jsonl` -> :func:`tokenize_record` -> :func:`pack`)."""
  examples = [tokenize_record(rec, tokenizer, where, loss_on) for where, rec in read_jsonl(path)]
  return pack(examples, seq_len, packing=packing, too_long=too_long)
