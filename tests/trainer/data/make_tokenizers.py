"""Writes the two tiny tokenizers the trainer tests use (run from the repository root):

    .venv/bin/python tests/trainer/data/make_tokenizers.py

* ``bert_tokenizer/tokenizer.json``: BERT-style WordPiece (``[CLS] ... [SEP]``, ``[PAD]`` = 0),
  vocabulary 400, trained on a fixed list of words (no files read), so a tiny random BERT
  runs the docstring task without the MiniLM weights package.
* ``chat_tokenizer/``: a character-level tokenizer (every printable ASCII character plus
  ``<s>``, ``</s>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>`` as special tokens) and a
  ``tokenizer_config.json`` with a chat template, for SFT on a tiny random decoder.
"""

import json
import pathlib
import string

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = pathlib.Path(__file__).parent

WORDS = ("the a an of to in for is and or not with from by on as this that return returns object "
         "value values class function method module file files name names list string data "
         "message messages header headers request response server client url http html json "
         "encode decode parse parser error errors set get new default type types key keys "
         "test tests socket event loop task tasks process queue thread window widget text "
         "element node tree document attribute attributes import path mail address content "
         "character characters escape entity entities number line lines read write open close").split()


def bert_tokenizer() -> Tokenizer:
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                      initial_alphabet=list(string.ascii_lowercase + string.digits
                                                            + string.punctuation))
  tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                               ("[SEP]", tok.token_to_id("[SEP]"))])
  tok.decoder = decoders.WordPiece()
  return tok


SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_tokenizer() -> Tokenizer:
  chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
  vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
  tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  tok.add_special_tokens(SPECIAL)
  return tok


def main() -> None:
  (HERE / "bert_tokenizer").mkdir(exist_ok=True)
  bert_tokenizer().save(str(HERE / "bert_tokenizer" / "tokenizer.json"))
  (HERE / "chat_tokenizer").mkdir(exist_ok=True)
  chat_tokenizer().save(str(HERE / "chat_tokenizer" / "tokenizer.json"))
  config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}
  (HERE / "chat_tokenizer" / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
  main()
