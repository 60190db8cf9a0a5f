"""Token ids are checked where the data is built: a tokenizer whose output leaves its own
vocabulary raises a TokenIdError naming the text and the position (not a NaN hidden state
or a wrapped-around embedding row later); a tokenizer.json file loads as a ChatTokenizer."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from lowrank_jax import validate
from lowrank_jax.data import chat, tokenization
from tests.trainer.conftest import DATA

VOCAB = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}


def _word_level(cls_id: int) -> Tokenizer:
  """A 4-token WordLevel tokenizer whose post-processor prepends ``[CLS]`` as id ``cls_id``
  (``TemplateProcessing`` takes any id: a config typo that a model would read as a row)."""
  tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", cls_id)])
  return tok


def test_encode_rejects_a_post_processor_id_outside_the_vocabulary():
  ids, mask = tokenization.encode(["a b", "b"], 4, _word_level(cls_id=1))  # in range: fine
  np.testing.assert_array_equal(ids, [[1, 2, 3, 0], [1, 3, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
  with pytest.raises(validate.TokenIdError,
                     match=r"encode: the tokenizer's ids \(position = \(text index, token index\)\): token id 9 "
                           r"at position \(0, 0\) \(shape \(2, 4\)\) is outside the vocabulary \[0, 4\).*"
                           r"2 of 8 ids are out of range"):
    tokenization.encode(["a b", "b"], 4, _word_level(cls_id=9))


def test_encode_names_the_source_of_the_first_text_with_a_bad_id():
  tok = Tokenizer(models.WordLevel({**VOCAB, "c": 7}, unk_token="[UNK]"))  # 5 entries, "c" -> 7
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  assert tok.get_vocab_size(with_added_tokens=True) == 5
  with pytest.raises(validate.TokenIdError, match=r"; text 1 is y.py:2: token id 7 at position \(1, 1\) "
                                                  r"\(shape \(3, 3\)\) is outside the vocabulary \[0, 5\)"):
    tokenization.encode(["a b", "b c", "c"], 3, tok, sources=["x.py:1", "y.py:2", "z.py:3"])
  with pytest.raises(ValueError, match="2 sources for 3 texts"):
    tokenization.encode(["a", "b", "a"], 3, tok, sources=["x", "y"])


def test_a_tokenizer_json_file_loads_without_config(tmp_path):
  folder = DATA / "chat_tokenizer"
  from_folder = chat.load_tokenizer(folder)
  from_file = chat.load_tokenizer(folder / "tokenizer.json")
  raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
  text, pieces = "<s><|user|>hi<|end|>", ["<s>", "<|user|>", "h", "i", "<|end|>"]
  assert from_file.encode(text) == from_folder.encode(text) == [raw.token_to_id(p) for p in pieces]
  assert from_file.vocab_size == from_folder.vocab_size == raw.get_vocab_size(with_added_tokens=True)
  assert from_folder.bos_id == from_folder.tokenizer.token_to_id("<s>") and from_folder.chat_template
  assert from_file.bos_id is None and from_file.chat_template is None  # a file: no config read
  with pytest.raises(ValueError, match="has no chat template"):
    from_file.apply_chat_template([{"role": "user", "content": "hi"}])
  with pytest.raises(FileNotFoundError, match="folder does not exist"):
    chat.load_tokenizer(tmp_path / "missing")
