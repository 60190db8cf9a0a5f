"""SFT data (lowrank_jax.data.sft): the loss covers exactly the response / assistant tokens,
packing keeps every example intact in its own segment (positions restart, targets never
cross a boundary), greedy rows, truncation rules, errors naming file and line."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer

from lowrank_jax.data import sft
from tests.trainer.conftest import DATA


class CharTokenizer:
  """The committed character-level tokenizer with the chat template of its
  tokenizer_config.json written out in Python."""

  def __init__(self):
    self.tok = Tokenizer.from_file(str(DATA / "chat_tokenizer" / "tokenizer.json"))
    self.bos_id, self.eos_id = self.tok.token_to_id("<s>"), self.tok.token_to_id("</s>")

  def encode(self, text):
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return "".join(self.tok.id_to_token(i) for i in ids)

  def apply_chat_template(self, messages, add_generation_prompt=False):
    text = "<s>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


TOK = CharTokenizer()


def test_prompt_response_loss_is_the_response_and_eos():
  ex = sft.tokenize_record({"prompt": "Q: 2+2=", "response": " 4"}, TOK)
  assert ex.tokens.tolist() == [TOK.bos_id] + TOK.encode("Q: 2+2=") + TOK.encode(" 4") + [TOK.eos_id]
  assert TOK.decode(ex.tokens[ex.in_loss]) == " 4</s>"
  assert sft.tokenize_record({"prompt": "a", "response": "b"}, TOK, loss_on="all").in_loss.all()


def test_chat_loss_is_what_each_assistant_turn_adds():
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6+6?"},
              {"role": "assistant", "content": "12"}, {"role": "user", "content": "and 6*6?"},
              {"role": "assistant", "content": "36"}]
  ex = sft.tokenize_record({"messages": messages}, TOK)
  text = TOK.apply_chat_template(messages)
  assert TOK.decode(ex.tokens) == text  # the pieces tokenise to the whole conversation
  # reference: the characters of each assistant turn's content and its end marker
  spans = ["12<|end|>", "36<|end|>"]
  assert TOK.decode(ex.tokens[ex.in_loss]) == "".join(spans)
  flags = "".join("1" if f else "0" for f in ex.in_loss)
  assert flags.count("01") == 2  # two separate spans


def _unpack(rows):
  """``[(tokens, positions, targets, mask)]`` per segment, in row order."""
  out = []
  for r in range(rows.rows):
    seg = rows.arrays["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      assert (np.diff(idx) == 1).all()  # contiguous
      out.append(tuple(rows.arrays[k][r, idx] for k in ("input_ids", "positions", "targets", "loss_mask")))
    pad = seg == 0
    assert not rows.arrays["input_ids"][r, pad].any() and not rows.arrays["loss_mask"][r, pad].any()
  return out


def _examples(lengths_and_flags):
  return [sft.Example(np.arange(1, len(f) + 1, dtype=np.int32) + 100 * i, np.asarray(f, bool), f"ex{i}")
          for i, f in enumerate(lengths_and_flags)]


@settings(max_examples=60, deadline=None)
@given(flags=st.lists(st.lists(st.booleans(), min_size=2, max_size=12), min_size=1, max_size=12),
       seq_len=st.integers(12, 30), packing=st.booleans())
def test_packing_keeps_every_example_whole_in_its_own_segment(flags, seq_len, packing):
  examples = [e for e in _examples(flags) if e.in_loss[1:].any()]
  if not examples:
    return
  rows = sft.pack(examples, seq_len, packing=packing)
  segments = _unpack(rows)
  assert len(segments) == len(examples) == rows.examples
  for ex, (tokens, positions, targets, mask) in zip(examples, segments):
    np.testing.assert_array_equal(tokens, ex.tokens)
    np.testing.assert_array_equal(positions, np.arange(len(ex.tokens)))
    np.testing.assert_array_equal(targets[:-1], ex.tokens[1:])  # the next token of the same example
    np.testing.assert_array_equal(mask[:-1], ex.in_loss[1:])
    assert targets[-1] == 0 and mask[-1] == 0  # nothing predicted across the boundary
  assert rows.loss_tokens == sum(int(e.in_loss[1:].sum()) for e in examples)
  seg = rows.arrays["segment_ids"]
  if packing:  # greedy: the first example of a row did not fit in the row before
    used = (seg > 0).sum(1)
    firsts = [rows.arrays["segment_ids"][r].tolist().count(1) for r in range(rows.rows)]
    assert all(used[r] + firsts[r + 1] > seq_len for r in range(rows.rows - 1))
  else:
    assert seg.max(1).tolist() == [1] * rows.rows


def test_too_long_examples_and_examples_without_loss_tokens():
  long, short, no_loss = _examples([[False, True] * 10, [False, True, True], [True, False, False]])
  rows = sft.pack([long, short, no_loss], 8, too_long="truncate")
  assert rows.examples == 2 and rows.truncated == 1 and rows.dropped == 1
  assert _unpack(rows)[0][0].tolist() == long.tokens[:8].tolist()
  rows = sft.pack([long, short], 8, too_long="drop")
  assert rows.examples == 1 and rows.dropped == 1
  with pytest.raises(ValueError, match="ex0: 20 tokens exceed seq_len 8"):
    sft.pack([long, short], 8, too_long="error")
  with pytest.raises(ValueError, match="no example left"):
    sft.pack([no_loss], 8)


def test_bad_files_and_records_name_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "respons": "b"}\n')
  with pytest.raises(ValueError, match=r"d.jsonl:3: a record is .* got keys \['prompt', 'respons'\]"):
    sft.load_sft(path, TOK, 16)
  path.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
  with pytest.raises(ValueError, match="d.jsonl:2: expected a JSON object"):
    sft.read_jsonl(path)
  path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  with pytest.raises(ValueError, match="d.jsonl:1: no 'assistant' message"):
    sft.load_sft(path, TOK, 16)

  class Inconsistent(CharTokenizer):
    def apply_chat_template(self, messages, add_generation_prompt=False):
      return f"[{len(messages)}]" + super().apply_chat_template(messages, add_generation_prompt)
  with pytest.raises(ValueError, match="cannot locate the assistant turn"):
    sft.tokenize_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                        Inconsistent())


def test_the_committed_sft_files_load():
  rows = sft.load_sft(DATA / "sft_train.jsonl", TOK, 64)
  records = [json.loads(l) for l in (DATA / "sft_train.jsonl").read_text().splitlines()]
  assert rows.examples == len(records) and rows.dropped == rows.truncated == 0
  assert rows.arrays["input_ids"].shape == (rows.rows, 64) and rows.rows < len(records)  # packed
