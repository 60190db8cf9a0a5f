"""SFT data (lowrank_jax.data.sft): the loss covers exactly the response / assistant tokens,
packing keeps every example intact in its own segment (positions restart, targets never
cross a boundary), greedy rows, truncation rules, errors naming file and line, token ids
checked against the vocabulary (the tokenizer's, the model's) with file, line and position."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer

from lowrank_jax import validate
from lowrank_jax.data import chat, sft
from lowrank_jax.trainer import config as run_config, tasks
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


# ------------------------------------------------------------------ token ids are checked


class SizedTokenizer(CharTokenizer):
  """The character tokenizer with a vocabulary size and, optionally, a broken id for "Z"."""

  def __init__(self, vocab_size, z_id=None, bos_id=None):
    super().__init__()
    self.vocab_size = vocab_size
    self.z_id = z_id
    if bos_id is not None:
      self.bos_id = bos_id

  def encode(self, text):
    return [self.z_id if c == "Z" and self.z_id is not None else i
            for c, i in zip(text, super().encode(text))] if self.z_id is not None else super().encode(text)


def test_an_id_at_or_above_the_vocabulary_names_file_line_and_position(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "ab", "response": "c"}\n{"prompt": "aZ", "response": "c"}\n')
  vocab = TOK.tok.get_vocab_size()
  rows = sft.load_sft(path, SizedTokenizer(vocab), 16)  # every id in range: loads
  assert rows.examples == 2 and int(rows.arrays["input_ids"].max()) < vocab
  # "aZ": [bos, a, Z, ...]: the bad id is the third token of the second record
  with pytest.raises(validate.TokenIdError, match=rf"d.jsonl:2: token ids: token id {vocab} at position \(2,\) "
                                                  rf"\(shape \(5,\)\) is outside the vocabulary \[0, {vocab}\)"):
    sft.load_sft(path, SizedTokenizer(vocab, z_id=vocab), 16)
  # a model vocabulary smaller than the tokenizer's (vocab_size=): the first record already fails
  small = min(TOK.encode("a")[0], TOK.bos_id) + 1
  with pytest.raises(validate.TokenIdError, match=rf"d.jsonl:1: token ids: token id \d+ at position \(\d+,\).*"
                                                  rf"\[0, {small}\)"):
    sft.load_sft(path, SizedTokenizer(vocab), 16, vocab_size=small)


def test_negative_and_non_integer_ids_are_refused():
  record = {"prompt": "aZ", "response": "c"}
  with pytest.raises(validate.TokenIdError, match=r"rec: token ids: token id -1 at position \(0,\).*wrap around"):
    sft.tokenize_record(record, SizedTokenizer(1000, bos_id=-1), "rec")
  # without a vocabulary size negative ids still fail (the int32 range)
  neg = SizedTokenizer(1000, z_id=-7)
  del neg.vocab_size
  with pytest.raises(validate.TokenIdError,
                     match=r"rec: token ids \(no vocab_size known.*token id -7 at position \(2,\)"):
    sft.tokenize_record(record, neg, "rec")
  with pytest.raises(TypeError, match=r"rec: the tokenizer gave float 3.0 at token position 2, not an integer"):
    sft.tokenize_record(record, SizedTokenizer(1000, z_id=3.0), "rec")
  with pytest.raises(TypeError, match=r"rec: the tokenizer gave bool True at token position 2"):
    sft.tokenize_record(record, SizedTokenizer(1000, z_id=True), "rec")


def test_pretokenized_examples_are_checked_when_packed():
  good = sft.Example(np.array([5, 6, 7], np.int32), np.array([False, True, True]), "mine:0")
  bad = sft.Example(np.array([5, -2, 7], np.int32), np.array([False, True, True]), "mine:1")
  assert sft.pack([good], 4).examples == 1
  int32 = r"token ids \(no vocab_size known: the int32 range\)"
  with pytest.raises(validate.TokenIdError, match=rf"mine:1: {int32}: token id -2 at position \(1,\)"):
    sft.pack([good, bad], 4)
  with pytest.raises(validate.TokenIdError, match=r"mine:0: token ids: token id 7 at position \(2,\).*\[0, 7\)"):
    sft.pack([good], 4, vocab_size=7)
  floats = sft.Example(np.array([5.0, 6.0]), np.array([False, True]), "mine:2")
  with pytest.raises(ValueError, match=r"mine:0: in_loss has shape \(2,\), tokens \(3,\)"):
    sft.pack([sft.Example(good.tokens, good.in_loss[:2], "mine:0")], 4)
  with pytest.raises(TypeError, match=rf"mine:2: {int32}: token ids must be integers, got dtype float64"):
    sft.pack([floats], 4)


def test_a_conversation_opening_with_the_assistant_is_refused_naming_the_record():
  with pytest.raises(ValueError, match=r"f.jsonl:4: messages\[0\] is an assistant turn"):
    sft.tokenize_record({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
                        TOK, "f.jsonl:4")


def test_the_folder_tokenizer_is_the_chat_module_and_matches_the_python_template():
  folder = tasks.FolderTokenizer(str(DATA / "chat_tokenizer"))
  assert isinstance(folder, chat.ChatTokenizer) and sft.render_chat_template is chat.render_chat_template
  assert folder.vocab_size == TOK.tok.get_vocab_size(with_added_tokens=True)
  for where, record in sft.read_jsonl(DATA / "sft_train.jsonl")[:6]:  # chat and prompt/response records
    ours, ref = sft.tokenize_record(record, folder, where), sft.tokenize_record(record, TOK, where)
    np.testing.assert_array_equal(ours.tokens, ref.tokens)
    np.testing.assert_array_equal(ours.in_loss, ref.in_loss)
    assert ours.in_loss.any()


def test_sft_task_checks_the_ids_against_the_model_vocabulary(tmp_path):
  vocab = 20  # the chat tokenizer's characters go up to ~103
  raw = {"name": "sft_small_vocab", "task": "sft",
         "model": {"kind": "decoder", "tokenizer": str(DATA / "chat_tokenizer"),
                   "random": {"vocab_size": vocab, "hidden_size": 8, "intermediate_size": 16, "num_layers": 1,
                              "num_heads": 2, "num_kv_heads": 1, "max_seq_len": 64}},
         "data": {"train": str(DATA / "sft_train.jsonl"), "seq_len": 64},
         "methods": [{"name": "lora", "where": "q_proj/kernel", "rank": 2}]}
  config = run_config.from_dict(raw)
  with pytest.raises(validate.TokenIdError,
                     match=rf"sft_small_vocab: data.train \(.*sft_train.jsonl\) input_ids \[row, token\] for the "
                           rf"model's vocab_size: token id \d+ at position \(0, \d+\).*\[0, {vocab}\)"):
    tasks.sft(config, tasks.Keys.from_seed(0))
