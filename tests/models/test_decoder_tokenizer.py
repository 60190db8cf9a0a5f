"""data.chat: a Hugging Face tokenizer folder and its chat template, against transformers'
encodings and apply_chat_template outputs (tests/golden/decoders/tokenizer_cases.json)."""

import json
import pathlib
import shutil

import jinja2
import pytest

from lowrank_jax.data import chat

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "decoders"
CASES = json.loads((GOLDEN / "tokenizer_cases.json").read_text())


@pytest.fixture(scope="module")
def tok():
  return chat.load_tokenizer(GOLDEN / "tokenizer")


@pytest.mark.parametrize("case", CASES["texts"], ids=lambda c: repr(c["text"])[:20])
def test_encode_decode_equal_transformers(tok, case):
  assert tok.encode(case["text"], add_special_tokens=True) == case["ids"]
  assert tok.encode(case["text"]) == case["ids_no_special"]
  assert tok.decode(case["ids"]) == case["decoded"]
  assert tok.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip"]


@pytest.mark.parametrize("case", CASES["chats"], ids=lambda c: f"{len(c['messages'])}msg-gen{c['add_generation_prompt']}")
def test_chat_template_equals_transformers(tok, case):
  text = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
  assert text == case["text"]
  assert tok.apply_chat_template(case["messages"], case["add_generation_prompt"], tokenize=True) == case["ids"]


def test_special_tokens_and_sizes(tok):
  assert tok.vocab_size == CASES["vocab_size"]
  assert (tok.bos_id, tok.eos_id) == (tok.tokenizer.token_to_id("<s>"), tok.tokenizer.token_to_id("</s>"))
  assert tok.special_tokens["pad_token"] == "<pad>" and tok.pad_id is not None


def test_chat_template_jinja_file(tmp_path):
  """transformers 5 writes the template to chat_template.jinja by default."""
  folder = tmp_path / "tok"
  shutil.copytree(GOLDEN / "tokenizer", folder)
  cfg = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "chat_template.jinja").write_text(cfg.pop("chat_template"))
  (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
  case = CASES["chats"][3]
  assert chat.load_tokenizer(folder).apply_chat_template(case["messages"], True) == case["text"]
  (folder / "chat_template.jinja").unlink()
  no_template = chat.load_tokenizer(folder)
  with pytest.raises(ValueError, match="has no chat template"):
    no_template.apply_chat_template(case["messages"])


def test_template_errors(tok, tmp_path):
  with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
    tok.apply_chat_template([{"role": "robot", "content": "hi"}])
  with pytest.raises(ValueError, match="empty conversation"):
    tok.apply_chat_template([])
  with pytest.raises(jinja2.exceptions.SecurityError):
    chat.render_chat_template("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    chat.load_tokenizer(tmp_path)
  folder = tmp_path / "bad"
  shutil.copytree(GOLDEN / "tokenizer", folder)
  cfg = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<nope>"}))
  with pytest.raises(ValueError, match="eos_token '<nope>'.*not in tokenizer.json"):
    chat.load_tokenizer(folder)


def test_add_bos_eos_flags_as_transformers(tmp_path):
  """tokenizer.json's post-processor decides which special tokens are added; transformers'
  generic backend ignores tokenizer_config.json's add_bos_token / add_eos_token, as we do."""
  transformers = pytest.importorskip("transformers")
  folder = tmp_path / "flags"
  shutil.copytree(GOLDEN / "tokenizer", folder)
  raw = json.loads((folder / "tokenizer.json").read_text())
  (folder / "tokenizer.json").write_text(json.dumps({**raw, "post_processor": None}))
  cfg = json.loads((folder / "tokenizer_config.json").read_text())
  for flags in ({"add_bos_token": False, "add_eos_token": True}, {"add_bos_token": True}, {}):
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, **flags}))
    ours = chat.load_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for case in CASES["texts"]:
      assert ours.encode(case["text"], add_special_tokens=True) == theirs(case["text"])["input_ids"], flags
