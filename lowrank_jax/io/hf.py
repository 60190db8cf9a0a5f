"""Hugging Face ``safetensors`` weights <-> nested Flax-style parameter dicts.

Reads and writes with :mod:`lowrank_jax.io.safetensors` (numpy only, no torch;
bfloat16 included). A torch state dict is flat, with
dotted names (``encoder.layer.0.attention.self.query.weight``) and ``nn.Linear``
weights in ``[out, in]`` layout (``y = x W^T + b``); our models use nested dicts
and Flax's ``[in, out]`` kernels (``y = x W + b``). The conversion is

* rename each dotted name with an ordered list of ``(regex, replacement)`` rules
  (``re.sub``, applied in turn; a rule may map a name to ``""`` to drop it),
* then by the *last* path component: ``kernel`` leaves are transposed
  (``W_flax = W_torch.T``), everything else is copied as is,
* then split the ``/``-joined result into a nested dict.

:func:`default_rules` turns the usual torch suffixes into Flax names: a 2-d
``.weight`` becomes ``kernel`` (transposed), a 1-d ``.weight`` (LayerNorm,
RMSNorm) becomes ``scale``, an ``*embed*.weight`` becomes ``embedding``.
The inverse (:func:`to_torch_state_dict`) writes a tree back in torch layout.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from lowrank_jax.io import safetensors as st

__all__ = [
  "load_safetensors",
  "save_safetensors",
  "convert_state_dict",
  "load_hf_tree",
  "unflatten",
  "flatten",
  "to_torch_state_dict",
  "rename",
  "default_rules",
]

Rule = tuple[str, str]


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The flat ``{dotted name: numpy array}`` of a ``.safetensors`` file."""
  return st.load_file(path)


def save_safetensors(flat: Mapping[str, Any], path: str | os.PathLike,
                     metadata: Optional[dict[str, str]] = None) -> None:
  """Writes ``{name: array}`` to ``path`` atomically (temp file in the same folder, then rename)."""
  st.save_file(flat, path, metadata)


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``; raises on a name that is both a leaf and a folder."""
  out: dict = {}
  for name, value in flat.items():
    parts = name.split(sep)
    node = out
    for p in parts[:-1]:
      child = node.setdefault(p, {})
      if not isinstance(child, dict):
        raise ValueError(f"'{name}': '{p}' is both a leaf and a sub-tree")
      node = child
    if parts[-1] in node:
      raise ValueError(f"duplicate parameter name '{name}' after renaming")
    node[parts[-1]] = value
  return out


def flatten(tree: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
  """Inverse of :func:`unflatten` for nested dicts (``None`` leaves are skipped)."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    name = f"{prefix}{sep}{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, sep, name))
    elif v is not None:
      out[name] = v
  return out


def default_rules(embedding: str = r"embed") -> list[Rule]:
  """Suffix rules applied after the model's own renames (see module docstring).

  The renames are done on dotted names; these rules then turn the dots into
  ``/`` and the torch suffixes into Flax names. The ``ndim`` dependent part
  (``weight`` -> ``kernel`` or ``scale``) is done in :func:`convert_state_dict`,
  which marks 2-d ``weight`` names as ``<kernel>`` first.
  """
  return [
    (rf"^(.*{embedding}[^.]*)\.<kernel>$", r"\1.embedding"),
    (r"\.<kernel>$", ".kernel"),
    (r"\.weight$", ".scale"),
    (r"\.", "/"),
  ]


def convert_state_dict(flat: Mapping[str, np.ndarray], rules: Sequence[Rule] = (), *,
                       embedding: str = r"embed", dtype=None,
                       drop: Optional[Callable[[str], bool]] = None) -> dict:
  """Converts a flat torch-layout state dict into a nested Flax-layout dict.

  Args:
    flat: ``{dotted torch name: array}``.
    rules: model-specific ``(regex, replacement)`` renames applied in order to the
      dotted name *before* the generic suffix rules (e.g. drop ``.dense``). A name
      renamed to ``""`` is dropped.
    embedding: regex identifying embedding tables among 2-d ``weight`` tensors
      (kept ``[num, dim]``, named ``embedding``).
    dtype: cast floating arrays to this numpy/JAX dtype (``None`` keeps the file's).
    drop: predicate on the *original* name; ``True`` skips the tensor.

  Returns:
    Nested dict of numpy arrays; ``kernel`` leaves are ``W_torch.T`` (``[in, out]``).
  """
  out: dict[str, np.ndarray] = {}
  compiled = [(re.compile(p), r) for p, r in rules]
  suffix = [(re.compile(p), r) for p, r in default_rules(embedding)]
  for name in sorted(flat):
    if drop is not None and drop(name):
      continue
    value = np.asarray(flat[name])
    new = _rename(name, value.ndim, compiled, suffix)
    if not new:
      continue
    if new.endswith("/kernel"):
      value = np.ascontiguousarray(value.T)
    if dtype is not None and np.issubdtype(value.dtype, np.floating):
      value = value.astype(dtype)
    if new in out:
      raise ValueError(f"duplicate parameter name '{new}' after renaming (from '{name}')")
    out[new] = value
  return unflatten(out)


def rename(name: str, rules: Sequence[Rule] = (), *, ndim: int = 2, embedding: str = r"embed") -> str:
  """The ``/``-path that :func:`convert_state_dict` gives the torch name ``name`` of a
  tensor with ``ndim`` dimensions (``""`` if the rules drop it).

  ``rename("encoder.layer.0.attention.self.query.weight", bert.bert_rules())`` is
  ``"encoder/layer_0/attention/query/kernel"``.
  """
  return _rename(name, ndim, [(re.compile(p), r) for p, r in rules],
                 [(re.compile(p), r) for p, r in default_rules(embedding)])


def _rename(name: str, ndim: int, compiled, suffix) -> str:
  new = name
  for rx, rep in compiled:
    new = rx.sub(rep, new)
    if not new:
      return ""
  if new.endswith(".weight") and ndim == 2:
    new = new[: -len(".weight")] + ".<kernel>"
  for rx, rep in suffix:
    new = rx.sub(rep, new)
  return new


def load_hf_tree(path: str | os.PathLike, rules: Sequence[Rule] = (), **kwargs) -> dict:
  """:func:`load_safetensors` followed by :func:`convert_state_dict`."""
  return convert_state_dict(load_safetensors(path), rules, **kwargs)


def to_torch_state_dict(tree: Mapping[str, Any],
                        rename: Callable[[str], str] = lambda p: p.replace("/", ".")
                        ) -> dict[str, np.ndarray]:
  """Writes a nested Flax-layout tree back as a flat torch-layout state dict.

  ``kernel`` -> ``weight`` transposed (``[out, in]``), ``scale`` and ``embedding`` ->
  ``weight``; ``rename`` maps the ``/``-path (with the new suffix) to the torch name.
  """
  out: dict[str, np.ndarray] = {}
  for path, value in flatten(tree).items():
    value = np.asarray(value)
    head, _, last = path.rpartition("/")
    if last == "kernel":
      value, last = np.ascontiguousarray(value.T), "weight"
    elif last in ("scale", "embedding"):
      last = "weight"
    out[rename(f"{head}/{last}" if head else last)] = value
  return out
