"""Hugging Face tokenizer folders with their chat templates, without transformers.

A folder written by ``PreTrainedTokenizerFast.save_pretrained`` holds ``tokenizer.json``
(the ``tokenizers`` library's full pipeline: normaliser, pre-tokeniser, model, post-
processor, decoder, added tokens) and ``tokenizer_config.json`` (special tokens, and the
chat template: a ``chat_template`` entry, or a ``chat_template.jinja`` file beside it as
transformers 5 writes by default). :func:`load_tokenizer` reads both into a
:class:`ChatTokenizer` that encodes and decodes as transformers does (special tokens
exactly as ``tokenizer.json``'s post-processor adds them: transformers 5's generic backend
ignores ``add_bos_token`` / ``add_eos_token`` too; the WordPiece space clean-up), and renders the chat template as ``apply_chat_template`` does
(:func:`render_chat_template`: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, loop controls, the ``tojson`` filter, ``raise_exception``,
``strftime_now``, ``namespace``; the special tokens as variables; message keys whose
value is ``None`` dropped). Tested against transformers' outputs
(tests/golden/decoders/tokenizer_cases.json).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

__all__ = ["ChatTokenizer", "load_tokenizer", "render_chat_template", "SPECIAL_TOKEN_KEYS"]

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")
Message = Mapping[str, Any]


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  # transformers' filter: json.dumps without Jinja's HTML escaping
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
  """``namespace(...)`` refusing underscore attributes (as transformers' sandbox does)."""

  def __init__(*args, **kwargs):
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise, strftime_now=_strftime_now, namespace=_Namespace, dict=dict)


def _plain(messages: Sequence[Message]) -> list[dict]:
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise TypeError(f"messages[{i}] must be a mapping with 'role' and 'content', got {type(m).__name__}")
    out.append({k: v for k, v in m.items() if v is not None})
  return out


def render_chat_template(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                         tools: Optional[Sequence[Mapping]] = None, documents: Optional[Sequence[Mapping]] = None,
                         **variables: Any) -> str:
  """Renders a Hugging Face chat template as ``transformers`` does.

  Args:
    template: the Jinja source.
    messages: ``[{"role": ..., "content": ...}, ...]`` (keys with ``None`` values dropped).
    add_generation_prompt: passed to the template (open an assistant turn).
    tools, documents: passed to the template as is (JSON-schema dicts).
    **variables: further template variables, e.g. the special tokens ``bos_token=...``.
  """
  if not messages:
    raise ValueError("cannot apply a chat template to an empty conversation")
  return _ENV.from_string(template).render(messages=_plain(messages), tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **variables)


def _content(value) -> Optional[str]:
  """A special token of ``tokenizer_config.json``: a string or an ``AddedToken`` dict."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


class ChatTokenizer:
  """A ``tokenizers.Tokenizer`` with the special tokens and chat template of its folder.

  Attributes:
    tokenizer: the ``tokenizers.Tokenizer`` (its post-processor as transformers leaves it).
    special_tokens: ``{"bos_token": "<s>", ...}`` (the template variables).
    chat_template: the Jinja source, or ``None``.
    bos_id, eos_id, pad_id: ids of those special tokens (``None`` if absent).
  """

  def __init__(self, tokenizer: Tokenizer, *, special_tokens: Optional[Mapping[str, str]] = None,
               chat_template: Optional[str] = None, clean_up_tokenization_spaces: bool = False,
               name: str = "tokenizer"):
    self.tokenizer = tokenizer
    self.special_tokens = dict(special_tokens or {})
    self.chat_template = chat_template
    self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
    self.name = name
    for key in ("bos", "eos", "pad", "unk"):
      tok = self.special_tokens.get(f"{key}_token")
      setattr(self, f"{key}_id", None if tok is None else tokenizer.token_to_id(tok))

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text``; special tokens written in the text are recognised, the
    post-processor's (e.g. a leading BOS) are added only with ``add_special_tokens``."""
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    if self.clean_up_tokenization_spaces and type(self.tokenizer.model).__name__ != "BPE":
      for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                   (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text

  def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = False, *,
                          tokenize: bool = False, tools=None, documents=None, **variables):
    """The conversation rendered by the chat template (a string), or its ids with
    ``tokenize=True`` (encoded without adding special tokens, as transformers does)."""
    if not self.chat_template:
      raise ValueError(f"{self.name} has no chat template (no 'chat_template' in tokenizer_config.json "
                       f"and no chat_template.jinja)")
    text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                tools=tools, documents=documents, **{**self.special_tokens, **variables})
    return self.encode(text) if tokenize else text


def _template_from(config: Mapping[str, Any], folder: str) -> Optional[str]:
  jinja_path = os.path.join(folder, "chat_template.jinja")
  if os.path.exists(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    template = named.get("default")
  return template if isinstance(template, str) else None


def load_tokenizer(folder: str | os.PathLike) -> ChatTokenizer:
  """The tokenizer of a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``,
  optionally ``special_tokens_map.json`` and ``chat_template.jinja``).

  ``folder`` may also be a ``tokenizer.json`` file itself: then the tokenizer alone, without
  special tokens or chat template (no config files are read).
  """
  folder = os.fspath(folder)
  if os.path.isfile(folder):
    return ChatTokenizer(Tokenizer.from_file(folder), name=folder)
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.exists(path):
    where = "folder does not exist" if not os.path.isdir(folder) else "no tokenizer.json in it"
    raise FileNotFoundError(f"{path}: {where} (only fast-tokenizer folders with tokenizer.json are supported)")
  tok = Tokenizer.from_file(path)
  config: dict = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
    p = os.path.join(folder, name)
    if os.path.exists(p):
      with open(p, encoding="utf-8") as f:
        try:
          config.update(json.load(f))
        except json.JSONDecodeError as e:
          raise ValueError(f"{p} is not valid JSON: {e}") from None
  special = {k: _content(config.get(k)) for k in SPECIAL_TOKEN_KEYS if _content(config.get(k)) is not None}
  for key, tok_str in special.items():
    if tok.token_to_id(tok_str) is None:
      raise ValueError(f"{folder}: {key} {tok_str!r} of tokenizer_config.json is not in tokenizer.json's vocabulary")
  return ChatTokenizer(tok, special_tokens=special, chat_template=_template_from(config, folder),
                       clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                       name=folder)

