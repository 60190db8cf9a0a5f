"""A real text-classification task: which standard-library package does a docstring come from?

Texts are the module, class and function docstrings of the Python standard library
installed on the machine (``sysconfig.get_paths()["stdlib"]``), read with :mod:`ast`
(no code is imported or run). The label is the top-level package (``asyncio``,
``email``, ...). Rules, all deterministic:

* **Files**: every ``*.py`` under the chosen packages, in sorted order; folders named
  ``test``, ``tests``, ``idle_test`` (and ``__pycache__``) are skipped, so labels are
  about each package's own code.
* **Cleaning**: ``ast.get_docstring`` (which dedents, like ``inspect.cleandoc``), then
  every whitespace run becomes one space; texts shorter than ``min_chars`` or with
  fewer than ``min_words`` words are dropped.
* **Deduplication**: a text that occurs under two labels is dropped everywhere; a text
  repeated within one label is kept once (its first occurrence in path/line order).
* **Split** by module, so no module (file) contributes to two splits: within each
  label, modules are taken in the order of ``sha256(path)`` and each goes to the split
  that is least filled relative to its target share (``fractions``, default 80/10/10)
  of that label's examples; validation and test refuse a module that would take them
  past 1.5x their target (train takes anything, e.g. ``tkinter/__init__.py``). So the
  held-out splits get modules early and every label with enough small modules reaches
  every split; the assignment depends only on the hashes and the counts, never on
  ``PYTHONHASHSEED`` or dict order.
* **Optional cap** ``max_per_class``: at most that many examples of a label in train
  (and proportionally fewer in validation/test), keeping the smallest ``sha256(text)``.

The task depends on the Python version that supplies the standard library; the
returned :class:`DocstringTask` records it and a ``fingerprint`` of its contents.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import re
import sys
import sysconfig
from typing import Mapping, Optional, Sequence

import numpy as np

from lowrank_jax.data import tokenization

__all__ = [
  "DEFAULT_PACKAGES",
  "SPLITS",
  "Example",
  "DocstringTask",
  "stdlib_path",
  "clean_docstring",
  "extract_docstrings",
  "deduplicate",
  "split_by_module",
  "load_docstring_task",
]

# Present in CPython 3.10 - 3.13 with enough modules (>= 5) and docstrings (>= 100) each.
DEFAULT_PACKAGES: tuple[str, ...] = ("asyncio", "email", "http", "idlelib", "importlib",
                                     "multiprocessing", "tkinter", "unittest", "urllib", "xml")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})


@dataclasses.dataclass(frozen=True)
class Example:
  """One docstring: cleaned ``text``, its ``label`` (package), ``module`` path relative to
  the stdlib root (``/``-separated), the ``qualname`` of its owner and its ``lineno``."""
  text: str
  label: str
  module: str
  qualname: str
  lineno: int


def _sha(s: str) -> str:
  return hashlib.sha256(s.encode("utf-8")).hexdigest()


def stdlib_path() -> str:
  """The folder of the running interpreter's pure-Python standard library."""
  return sysconfig.get_paths()["stdlib"]


_WS = re.compile(r"\s+")


def clean_docstring(doc: str) -> str:
  """Whitespace-normalised docstring: runs of whitespace (newlines included) -> one space."""
  return _WS.sub(" ", doc).strip()


def _module_docstrings(source: bytes, module: str, label: str) -> list[Example]:
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  out: list[Example] = []

  def visit(node, prefix: str):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        name = f"{prefix}.{child.name}" if prefix else child.name
        doc = ast.get_docstring(child, clean=True)
        if doc:
          out.append(Example(clean_docstring(doc), label, module, name, child.lineno))
        visit(child, name)
      elif isinstance(child, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
        visit(child, prefix)  # definitions nested in module-level control flow

  doc = ast.get_docstring(tree, clean=True)
  if doc:
    out.append(Example(clean_docstring(doc), label, module, "<module>", 1))
  visit(tree, "")
  return out


def _python_files(root: str, package: str) -> list[str]:
  """Sorted ``/``-separated paths (relative to ``root``) of the package's ``.py`` files."""
  top = os.path.join(root, package)
  files = []
  for dirpath, dirnames, filenames in os.walk(top):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
    for fn in sorted(filenames):
      if fn.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, fn), root)
        files.append(rel.replace(os.sep, "/"))
  return sorted(files)


def extract_docstrings(packages: Sequence[str] = DEFAULT_PACKAGES, *, stdlib: Optional[str] = None,
                       min_chars: int = 30, min_words: int = 4) -> list[Example]:
  """All cleaned docstrings of ``packages`` (not yet deduplicated), in path/line order.

  Args:
    packages: top-level package folders under ``stdlib``; each must exist.
    stdlib: the standard-library folder (default: :func:`stdlib_path`).
    min_chars, min_words: drop shorter texts.
  """
  root = stdlib or stdlib_path()
  missing = [p for p in packages if not os.path.isdir(os.path.join(root, p))]
  if missing:
    raise ValueError(f"packages {missing} are not folders of the standard library at {root}")
  out: list[Example] = []
  for package in sorted(set(packages)):
    for rel in _python_files(root, package):
      with open(os.path.join(root, rel), "rb") as f:
        source = f.read()
      for ex in _module_docstrings(source, rel, package):
        if len(ex.text) >= min_chars and len(ex.text.split(" ")) >= min_words:
          out.append(ex)
  return out


def deduplicate(examples: Sequence[Example]) -> list[Example]:
  """Drops texts seen under several labels; keeps the first of same-label repeats."""
  labels_of: dict[str, set[str]] = {}
  for ex in examples:
    labels_of.setdefault(ex.text, set()).add(ex.label)
  seen: set[str] = set()
  out = []
  for ex in sorted(examples, key=lambda e: (e.module, e.lineno, e.qualname)):
    if len(labels_of[ex.text]) > 1 or ex.text in seen:
      continue
    seen.add(ex.text)
    out.append(ex)
  return out


def split_by_module(examples: Sequence[Example], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                    salt: str = "") -> dict[str, list[Example]]:
  """Assigns whole modules to splits, stratified by label (see the module docstring).

  Args:
    examples: deduplicated examples.
    fractions: target shares of ``(train, validation, test)``; must sum to 1.
    salt: mixed into the module hashes to draw a different (still deterministic) split.

  Returns:
    ``{"train": [...], "validation": [...], "test": [...]}``, each in path/line order.
  """
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
    raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  by_label: dict[str, dict[str, int]] = {}
  for ex in examples:
    counts = by_label.setdefault(ex.label, {})
    counts[ex.module] = counts.get(ex.module, 0) + 1
  module_split: dict[str, int] = {}
  for label in sorted(by_label):
    counts = by_label[label]
    total = sum(counts.values())
    target = [f * total for f in fractions]
    have = [0] * len(SPLITS)
    for module in sorted(counts, key=lambda m: (_sha(salt + m), m)):
      n = counts[module]
      # Held-out splits may not overshoot their target by more than half; train takes anything.
      ok = [s for s in range(len(SPLITS))
            if target[s] > 0 and (s == 0 or have[s] + n <= 1.5 * target[s])]
      s = min(ok, key=lambda i: (have[i] / target[i], i)) if ok else 0
      module_split[module] = s
      have[s] += n
  out: dict[str, list[Example]] = {name: [] for name in SPLITS}
  for ex in sorted(examples, key=lambda e: (e.module, e.lineno, e.qualname)):
    out[SPLITS[module_split[ex.module]]].append(ex)
  return out


def _cap(split: dict[str, list[Example]], max_per_class: int,
         fractions: Sequence[float]) -> dict[str, list[Example]]:
  out = {}
  for i, name in enumerate(SPLITS):
    cap = max_per_class if i == 0 else max(1, round(max_per_class * fractions[i] / fractions[0]))
    keep: set[tuple] = set()
    for label in sorted({e.label for e in split[name]}):
      items = sorted((e for e in split[name] if e.label == label), key=lambda e: _sha(e.text))
      keep.update((e.module, e.lineno, e.qualname) for e in items[:cap])
    out[name] = [e for e in split[name] if (e.module, e.lineno, e.qualname) in keep]
  return out


@dataclasses.dataclass(frozen=True)
class DocstringTask:
  """The tokenised task. ``task["train"]`` is ``{"input_ids", "attention_mask", "labels"}``
  (int32 numpy arrays); ``examples`` holds the :class:`Example` rows in the same order."""
  splits: Mapping[str, Mapping[str, np.ndarray]]
  examples: Mapping[str, Sequence[Example]]
  label_names: tuple[str, ...]
  max_len: int
  python_version: str
  fingerprint: str

  def __getitem__(self, split: str) -> Mapping[str, np.ndarray]:
    if split not in self.splits:
      raise KeyError(f"unknown split {split!r}; expected one of {list(self.splits)}")
    return self.splits[split]

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def sizes(self) -> dict[str, int]:
    return {k: len(v["labels"]) for k, v in self.splits.items()}


@functools.lru_cache(maxsize=8)
def _examples_cached(packages: tuple[str, ...], stdlib: Optional[str], min_chars: int,
                     min_words: int) -> tuple[Example, ...]:
  return tuple(deduplicate(extract_docstrings(packages, stdlib=stdlib, min_chars=min_chars,
                                              min_words=min_words)))


def load_docstring_task(max_len: int = 64, *, packages: Sequence[str] = DEFAULT_PACKAGES,
                        fractions: Sequence[float] = (0.8, 0.1, 0.1), min_chars: int = 30,
                        min_words: int = 4, max_per_class: Optional[int] = None,
                        tokenizer=None, stdlib: Optional[str] = None,
                        salt: str = "") -> DocstringTask:
  """Builds the stdlib-docstring classification task, tokenised to ``max_len``.

  Args:
    max_len: token length (truncation and padding; [CLS] and [SEP] included).
    packages: the classes (top-level stdlib packages); labels follow sorted order.
    fractions: target train/validation/test shares (by examples, whole modules).
    min_chars, min_words: minimum docstring size after cleaning.
    max_per_class: optional class-balancing cap (train; validation/test proportionally).
    tokenizer: a ``tokenizers.Tokenizer`` (default: all-MiniLM-L6-v2's).
    stdlib: the standard-library folder (default: the running interpreter's).
    salt: changes the module-to-split assignment deterministically.

  Returns:
    A :class:`DocstringTask`; ``task["train"]["input_ids"]`` etc., ``task.label_names``.
  """
  label_names = tuple(sorted(set(packages)))
  examples = _examples_cached(label_names, stdlib, min_chars, min_words)
  split = split_by_module(examples, fractions, salt)
  if max_per_class is not None:
    split = _cap(split, int(max_per_class), fractions)
  index = {name: i for i, name in enumerate(label_names)}
  arrays, digest = {}, hashlib.sha256()
  for name in SPLITS:
    rows = split[name]
    ids, mask = tokenization.encode([e.text for e in rows], max_len, tokenizer,
                                    sources=[f"{e.module}:{e.lineno} ({e.qualname})" for e in rows])
    labels = np.asarray([index[e.label] for e in rows], np.int32)
    arrays[name] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for e in rows:
      digest.update(f"{name}\t{e.label}\t{e.module}\t{e.text}\n".encode("utf-8"))
    digest.update(ids.tobytes())
  return DocstringTask(splits=arrays, examples={k: tuple(v) for k, v in split.items()},
                       label_names=label_names, max_len=max_len,
                       python_version=".".join(map(str, sys.version_info[:3])),
                       fingerprint=digest.hexdigest())
