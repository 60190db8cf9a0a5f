"""A real language-modelling corpus: the Python standard library's own source code.

The pure-Python sources of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``) are read as text (nothing is imported or run) and
cut into the corpora of :mod:`experiments.code_lm`: pre-training on most of the library,
fine-tuning on one package that pre-training never saw. Rules, all deterministic:

* **Modules**: a top-level ``name.py`` is the package ``name``; a folder is a package
  and holds every ``*.py`` under it, folders ``test``, ``tests``, ``idle_test``,
  ``__pycache__`` skipped (the file rules of :mod:`lowrank_jax.data.docstrings`). The
  packages in ``skip`` (default ``encodings``, ``pydoc_data``: codec tables and the
  documentation's text as string literals, not code) are left out everywhere; so are
  ``test``, ``site-packages`` and ``__pycache__``.
* **Held out**: the packages in ``held_out`` (default ``email``, ``http``, ``json``,
  ``unittest``) never reach pre-training (nor the tokenizer). One of them, ``finetune``
  (default ``email``), is the fine-tuning corpus.
* **Splits by module**: with the module path's ``sha256`` order and the greedy
  least-filled rule of :func:`lowrank_jax.data.docstrings.split_by_module` (weighed by
  KiB of source): pre-training modules go to ``pretrain_train`` / ``pretrain_validation``
  (``pretrain_fractions``, default 97/3), the fine-tuning package's modules to
  ``finetune_train`` / ``finetune_validation`` (``finetune_fractions``, default 80/20;
  shares of the source size, not exact: a module moves whole).
  No module is in two splits.
* **Tokenizer**: byte-level BPE (Radford et al. 2019; ``tokenizers``) with special tokens
  ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, trained on the ``pretrain_train`` modules'
  whole sources only, in path order (:func:`train_tokenizer`).
* **Chunks**: a module's source is cut at line ends into pieces of at most
  ``max_tokens`` tokens (lines tokenised one by one and summed; a single longer line is
  cut by characters), so with ``<s>`` and ``</s>`` a chunk fits a row of
  ``max_tokens + 2`` tokens. Chunks keep every character: joined they give the source.

:func:`write_jsonl` writes a split in the SFT format of :mod:`lowrank_jax.data.sft`
(``{"prompt": "", "response": chunk}``: the loss covers every token after ``<s>``).
The corpus depends on the Python version that supplies the library;
:class:`CodeCorpus` records it and a ``fingerprint`` of its contents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

from lowrank_jax.data import docstrings

__all__ = [
  "DEFAULT_HELD_OUT",
  "DEFAULT_FINETUNE",
  "DEFAULT_SKIP",
  "SPLITS",
  "SPECIAL_TOKENS",
  "PAD",
  "BOS",
  "EOS",
  "SourceFile",
  "Chunk",
  "CodeCorpus",
  "package_of",
  "stdlib_packages",
  "read_sources",
  "split_modules",
  "train_tokenizer",
  "save_tokenizer",
  "chunk_source",
  "build_corpus",
  "write_jsonl",
]

DEFAULT_HELD_OUT: tuple[str, ...] = ("email", "http", "json", "unittest")
DEFAULT_FINETUNE = "email"
DEFAULT_SKIP: tuple[str, ...] = ("encodings", "pydoc_data")
SPLITS: tuple[str, ...] = ("pretrain_train", "pretrain_validation", "finetune_train", "finetune_validation")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)
_NEVER = frozenset({"test", "site-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One module: its ``/``-separated ``path`` relative to the stdlib root, its top-level
  ``package`` and its source ``text`` (UTF-8, undecodable bytes replaced)."""
  path: str
  package: str
  text: str


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A piece of a module's source: ``text``, the module ``path``, its ``index`` in the
  module and its token count ``tokens`` (per-line sum, an upper bound in practice)."""
  text: str
  path: str
  index: int
  tokens: int


@dataclasses.dataclass(frozen=True)
class CodeCorpus:
  """The four splits of chunks (:data:`SPLITS`), the tokenizer, and what made them.

  Attributes:
    splits: split name -> chunks in module/index order.
    modules: split name -> the module paths of that split (sorted).
    tokenizer: the byte-level BPE ``tokenizers.Tokenizer`` (trained on ``pretrain_train``).
    held_out, finetune: the held-out packages and the fine-tuning package.
    python_version: the interpreter whose library was read.
    fingerprint: ``sha256`` over the split names, module paths and chunk texts, and the
      tokenizer's JSON.
  """
  splits: Mapping[str, Sequence[Chunk]]
  modules: Mapping[str, Sequence[str]]
  tokenizer: object
  held_out: tuple[str, ...]
  finetune: str
  python_version: str
  fingerprint: str

  def __getitem__(self, split: str) -> Sequence[Chunk]:
    if split not in self.splits:
      raise KeyError(f"unknown split {split!r}; expected one of {list(self.splits)}")
    return self.splits[split]

  def sizes(self) -> dict[str, dict[str, int]]:
    """Per split: modules, chunks, tokens (the chunks' per-line token counts) and characters."""
    return {k: {"modules": len(self.modules[k]), "chunks": len(v), "tokens": sum(c.tokens for c in v),
                "chars": sum(len(c.text) for c in v)} for k, v in self.splits.items()}


def package_of(path: str) -> str:
  """The top-level package of a module path: ``email/mime/text.py`` -> ``email``, ``os.py`` -> ``os``."""
  head = path.split("/", 1)[0]
  return head[:-3] if head.endswith(".py") and "/" not in path else head


def stdlib_packages(*, stdlib: Optional[str] = None, skip: Sequence[str] = DEFAULT_SKIP) -> list[str]:
  """Sorted names of the library's top-level modules and packages holding ``.py`` files
  (``test``, ``site-packages``, ``__pycache__`` and ``skip`` excluded)."""
  root = stdlib or docstrings.stdlib_path()
  excluded = _NEVER | set(skip)
  out = []
  for entry in sorted(os.listdir(root)):
    full = os.path.join(root, entry)
    if entry.endswith(".py") and os.path.isfile(full):
      name = entry[:-3]
    elif os.path.isdir(full) and not entry.startswith(".") and docstrings._python_files(root, entry):
      name = entry
    else:
      continue
    if name not in excluded and name.isidentifier():
      out.append(name)
  return out


def read_sources(packages: Sequence[str], *, stdlib: Optional[str] = None) -> list[SourceFile]:
  """The sources of ``packages`` (top-level names; each must exist), sorted by path.

  Raises:
    ValueError: naming the packages that are neither ``NAME.py`` nor a folder of ``.py`` files.
  """
  root = stdlib or docstrings.stdlib_path()
  paths: list[str] = []
  missing = []
  for name in sorted(set(packages)):
    if os.path.isfile(os.path.join(root, name + ".py")):
      paths.append(name + ".py")
    elif os.path.isdir(os.path.join(root, name)) and docstrings._python_files(root, name):
      paths += docstrings._python_files(root, name)
    else:
      missing.append(name)
  if missing:
    raise ValueError(f"packages {missing} are neither NAME.py nor folders of .py files in the standard "
                     f"library at {root}")
  out = []
  for path in sorted(paths):
    with open(os.path.join(root, path), "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    if text.strip():
      out.append(SourceFile(path, package_of(path), text))
  return out


def split_modules(weights: Mapping[str, int], fractions: Sequence[float], salt: str = "") -> tuple[list[str], list[str]]:
  """``(train modules, validation modules)``: whole modules in ``sha256(salt + path)`` order,
  each to the split least filled relative to its share of the total weight
  (:func:`lowrank_jax.data.docstrings.split_by_module`, one label).

  Args:
    weights: module path -> its size in small units (e.g. KiB of source; one placeholder
      example per unit is made); zero-weight modules are dropped.
    fractions: ``(train, validation)`` shares, summing to 1.
    salt: another deterministic draw.
  """
  train_f, val_f = (float(f) for f in fractions)
  examples = [docstrings.Example("", "all", path, "", i) for path, n in sorted(weights.items())
              for i in range(int(n))]
  split = docstrings.split_by_module(examples, (train_f, val_f, 0.0), salt)
  return (sorted({e.module for e in split["train"]}), sorted({e.module for e in split["validation"]}))


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8192, *, min_frequency: int = 2):
  """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (in the given order).

  Every byte is in the vocabulary (no unknown token), ``<pad>``, ``<s>``, ``</s>`` are
  ids 0, 1, 2; no normaliser, no special tokens added by ``encode`` (the SFT data layer
  adds ``<s>``/``</s>``). The same texts give the same ``to_str()``.

  Args:
    texts: training documents.
    vocab_size: target vocabulary size incl. the 256 bytes and the special tokens.
    min_frequency: a pair is merged only if it occurs at least this often.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), "
                     f"got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
  return tok


def save_tokenizer(folder: str | os.PathLike, tokenizer, *, model_max_length: int) -> list[str]:
  """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (``PreTrainedTokenizerFast``
  with ``<s>``/``</s>``/``<pad>``) into ``folder``; returns the file names."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  tokenizer.save(os.path.join(folder, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "pad_token": PAD, "model_max_length": int(model_max_length), "clean_up_tokenization_spaces": False}
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return ["tokenizer.json", "tokenizer_config.json"]


def _split_long(line: str, n_tokens: int, max_tokens: int) -> list[str]:
  """A line of ``n_tokens`` tokens cut by characters into ``ceil(n / max_tokens)`` pieces
  (a heuristic: byte-level BPE pieces of a cut line are rarely longer)."""
  parts = -(-n_tokens // max_tokens) * 2  # twice as many pieces: room for uneven token density
  size = -(-len(line) // parts)
  return [line[i:i + size] for i in range(0, len(line), size)]


def chunk_source(text: str, count: Callable[[Sequence[str]], Sequence[int]], max_tokens: int) -> list[tuple[str, int]]:
  """``[(chunk, tokens), ...]`` of a source cut at line ends (see the module docstring).

  Args:
    text: the source.
    count: token counts of a batch of strings.
    max_tokens: the most tokens of a chunk (per-line counts, summed).
  """
  if max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
  lines = text.splitlines(keepends=True)
  pieces: list[str] = []
  sizes: list[int] = []
  for line, n in zip(lines, count(lines)):
    if n > max_tokens:
      sub = _split_long(line, n, max_tokens)
      pieces += sub
      sizes += list(count(sub))
    else:
      pieces.append(line)
      sizes.append(int(n))
  out: list[tuple[str, int]] = []
  cur, cur_n = [], 0
  for piece, n in zip(pieces, sizes):
    if cur and cur_n + n > max_tokens:
      out.append(("".join(cur), cur_n))
      cur, cur_n = [], 0
    cur.append(piece)
    cur_n += n
  if cur:
    out.append(("".join(cur), cur_n))
  return out


def _counter(tokenizer) -> Callable[[Sequence[str]], list[int]]:
  def count(texts):
    if not texts:
      return []
    return [len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
  return count


def build_corpus(*, max_tokens: int = 254, vocab_size: int = 8192, held_out: Sequence[str] = DEFAULT_HELD_OUT,
                 finetune: str = DEFAULT_FINETUNE, packages: Optional[Sequence[str]] = None,
                 skip: Sequence[str] = DEFAULT_SKIP, pretrain_fractions: Sequence[float] = (0.97, 0.03),
                 finetune_fractions: Sequence[float] = (0.8, 0.2), min_frequency: int = 2,
                 stdlib: Optional[str] = None, salt: str = "") -> CodeCorpus:
  """Reads, splits and tokenises the corpus (see the module docstring).

  Args:
    max_tokens: the most tokens of a chunk (a row of ``max_tokens + 2`` holds it with
      ``<s>`` and ``</s>``).
    vocab_size: the BPE vocabulary size.
    held_out: packages never in pre-training; must contain ``finetune``.
    finetune: the fine-tuning package.
    packages: the pre-training packages before removing ``held_out`` (default: all of
      :func:`stdlib_packages`); a small list makes a small corpus for tests.
    skip: packages left out of the default ``packages``.
    pretrain_fractions, finetune_fractions: ``(train, validation)`` shares of the source size.
    min_frequency: BPE's minimum pair count.
    stdlib: the standard-library folder (default: the running interpreter's).
    salt: changes the module-to-split assignment deterministically.

  Returns:
    A :class:`CodeCorpus`.

  Raises:
    ValueError: ``finetune`` not in ``held_out``, unknown packages, or an empty split.
  """
  held = tuple(sorted(set(held_out)))
  if finetune not in held:
    raise ValueError(f"finetune package {finetune!r} must be one of the held-out packages {list(held)}")
  names = list(packages) if packages is not None else stdlib_packages(stdlib=stdlib, skip=skip)
  pre_names = sorted(set(names) - set(held))
  if not pre_names:
    raise ValueError(f"no pre-training package left after holding out {list(held)}")
  pre_files = read_sources(pre_names, stdlib=stdlib)
  ft_files = read_sources([finetune], stdlib=stdlib)
  by_path = {f.path: f for f in pre_files + ft_files}
  # The split must exist before the tokenizer (trained on pretrain_train only), and the
  # tokenizer before the chunks; so modules are weighed by their size in KiB here.
  kib = lambda files: {f.path: -(-len(f.text.encode("utf-8")) // 1024) for f in files}
  pre_train, pre_val = split_modules(kib(pre_files), pretrain_fractions, salt)
  ft_train, ft_val = split_modules(kib(ft_files), finetune_fractions, salt)
  modules = {"pretrain_train": pre_train, "pretrain_validation": pre_val,
             "finetune_train": ft_train, "finetune_validation": ft_val}
  for name, paths in modules.items():
    if not paths:
      raise ValueError(f"split {name!r} has no module (packages {pre_names if name.startswith('pre') else finetune}); "
                       "give more packages or other fractions")
  tokenizer = train_tokenizer([by_path[p].text for p in pre_train], vocab_size, min_frequency=min_frequency)
  count = _counter(tokenizer)
  splits: dict[str, list[Chunk]] = {}
  digest = hashlib.sha256()
  for name in SPLITS:
    chunks = []
    for path in modules[name]:
      for i, (text, n) in enumerate(chunk_source(by_path[path].text, count, max_tokens)):
        chunks.append(Chunk(text, path, i, n))
        digest.update(f"{name}\t{path}\t{i}\t{text}\n".encode("utf-8"))
    splits[name] = chunks
  digest.update(tokenizer.to_str().encode("utf-8"))
  return CodeCorpus(splits=splits, modules={k: tuple(v) for k, v in modules.items()}, tokenizer=tokenizer,
                    held_out=held, finetune=finetune,
                    python_version=".".join(map(str, sys.version_info[:3])), fingerprint=digest.hexdigest())


def write_jsonl(path: str | os.PathLike, chunks: Sequence[Chunk]) -> int:
  """Writes ``{"prompt": "", "response": chunk}`` lines (:mod:`lowrank_jax.data.sft`);
  returns the number of records."""
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for c in chunks:
      f.write(json.dumps({"prompt": "", "response": c.text}, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return len(chunks)
