"""The code corpus of the standard library (lowrank_jax.data.stdlib_code): splits are
deterministic and by whole module, held-out packages never reach pre-training or the
tokenizer, chunks rebuild the sources and fit their budget, the tokenizer round-trips
and the JSONL reads back through the SFT data layer."""

import json

import numpy as np
import pytest

from lowrank_jax.data import chat, sft, stdlib_code as sc

PACKAGES = ("bisect", "colorsys", "fnmatch", "shlex", "textwrap", "json")
KW = dict(max_tokens=62, vocab_size=320, held_out=("json",), finetune="json", packages=PACKAGES,
          pretrain_fractions=(0.75, 0.25))


@pytest.fixture(scope="module")
def corpus():
  return sc.build_corpus(**KW)


def test_package_of():
  assert sc.package_of("email/mime/text.py") == "email"
  assert sc.package_of("os.py") == "os"
  assert sc.package_of("json/__init__.py") == "json"


def test_stdlib_packages_lists_modules_and_folders_but_not_tests_or_skipped():
  names = sc.stdlib_packages()
  assert {"os", "json", "email", "textwrap"} <= set(names)
  assert not {"test", "site-packages", "encodings", "pydoc_data"} & set(names)
  assert names == sorted(names)


def test_split_is_deterministic_and_by_whole_module(corpus):
  again = sc.build_corpus(**KW)
  assert again.fingerprint == corpus.fingerprint
  assert again.modules == corpus.modules
  assert again.tokenizer.to_str() == corpus.tokenizer.to_str()
  seen = {}
  for split, paths in corpus.modules.items():
    assert paths, split
    for p in paths:
      assert p not in seen, f"{p} in {seen.get(p)} and {split}"
      seen[p] = split
    assert {c.path for c in corpus[split]} == set(paths)
  # every module of the packages is somewhere
  assert set(seen) == {f.path for f in sc.read_sources(PACKAGES)}


def test_salt_draws_another_split():
  pre = lambda salt: sc.split_modules({f"m{i}.py": 1 + i % 3 for i in range(40)}, (0.8, 0.2), salt)
  assert pre("") == pre("")
  assert pre("") != pre("other")
  train, val = pre("")
  assert not set(train) & set(val) and len(train) + len(val) == 40
  # shares by weight: about 20% of 80 units in validation (a module moves whole)
  weights = {f"m{i}.py": 1 + i % 3 for i in range(40)}
  share = sum(weights[m] for m in val) / sum(weights.values())
  assert 0.1 < share < 0.3


def test_held_out_package_never_in_pretraining_or_the_tokenizer(corpus):
  for split in ("pretrain_train", "pretrain_validation"):
    assert all(sc.package_of(c.path) not in corpus.held_out for c in corpus[split])
  for split in ("finetune_train", "finetune_validation"):
    assert all(sc.package_of(c.path) == "json" for c in corpus[split])
  # the tokenizer is exactly the one trained on the pre-training training modules alone
  texts = [f.text for f in sc.read_sources(PACKAGES) if f.path in corpus.modules["pretrain_train"]]
  assert sc.train_tokenizer(texts, KW["vocab_size"]).to_str() == corpus.tokenizer.to_str()


def test_build_corpus_errors():
  with pytest.raises(ValueError, match="must be one of the held-out"):
    sc.build_corpus(**{**KW, "finetune": "textwrap"})
  with pytest.raises(ValueError, match="no_such_pkg"):
    sc.build_corpus(**{**KW, "packages": ("bisect", "no_such_pkg"), "held_out": ("json",)})
  with pytest.raises(ValueError, match="vocab_size"):
    sc.train_tokenizer(["x"], 100)


def test_chunks_rebuild_each_source_and_fit_the_token_budget(corpus):
  sources = {f.path: f.text for f in sc.read_sources(PACKAGES)}
  for split in sc.SPLITS:
    by_module = {}
    for c in corpus[split]:
      by_module.setdefault(c.path, []).append(c)
    for path, chunks in by_module.items():
      assert [c.index for c in chunks] == list(range(len(chunks)))
      assert "".join(c.text for c in chunks) == sources[path]
  lengths = [len(e.ids) for split in sc.SPLITS
             for e in corpus.tokenizer.encode_batch([c.text for c in corpus[split]], add_special_tokens=False)]
  assert max(lengths) <= KW["max_tokens"]


def test_chunk_source_groups_lines_and_cuts_long_ones():
  count = lambda texts: [len(t) for t in texts]  # one "token" per character
  text = "ab\ncd\n" + "x" * 25 + "\nend"
  chunks = sc.chunk_source(text, count, 10)
  assert "".join(c for c, _ in chunks) == text
  assert all(n <= 10 and len(c) == n for c, n in chunks)
  assert chunks[0] == ("ab\ncd\n", 6)
  with pytest.raises(ValueError):
    sc.chunk_source(text, count, 0)


def test_tokenizer_round_trip_and_special_tokens(corpus, tmp_path):
  tok = corpus.tokenizer
  assert [tok.token_to_id(t) for t in sc.SPECIAL_TOKENS] == [0, 1, 2]
  assert tok.get_vocab_size() == KW["vocab_size"]
  samples = [c.text for split in sc.SPLITS for c in corpus[split][:20]]
  samples += ["caf\u00e9 = '\u00fcber' + \"\u6f22\u5b57\"  # \U0001f600\n\tx = 1\r\n"]  # bytes outside the corpus
  for text in samples:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
  sc.save_tokenizer(tmp_path, tok, model_max_length=64)
  loaded = chat.load_tokenizer(tmp_path)
  assert loaded.special_tokens["bos_token"] == "<s>" and loaded.special_tokens["eos_token"] == "</s>"
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert cfg["model_max_length"] == 64 and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert loaded.encode(samples[0]) == tok.encode(samples[0], add_special_tokens=False).ids


class _Tok:
  bos_id, eos_id = 1, 2

  def __init__(self, tok):
    self.tok = tok

  def encode(self, text):
    return self.tok.encode(text, add_special_tokens=False).ids

  def apply_chat_template(self, messages, add_generation_prompt=False):
    raise NotImplementedError


def test_jsonl_reads_back_through_the_sft_layer(corpus, tmp_path):
  chunks = corpus["finetune_validation"]
  path = tmp_path / "ft.jsonl"
  assert sc.write_jsonl(path, chunks) == len(chunks)
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert records == [{"prompt": "", "response": c.text} for c in chunks]
  rows = sft.load_sft(path, _Tok(corpus.tokenizer), KW["max_tokens"] + 2)
  assert rows.examples == len(chunks) and rows.truncated == 0 and rows.dropped == 0
  n_tokens = [len(corpus.tokenizer.encode(c.text, add_special_tokens=False).ids) for c in chunks]
  # every token after <s> is in the loss: the chunk's tokens and </s>
  assert rows.loss_tokens == sum(n + 1 for n in n_tokens)
  first = rows.arrays["input_ids"][0]
  assert first[0] == 1 and np.count_nonzero(rows.arrays["segment_ids"][0] == 1) == n_tokens[0] + 2
