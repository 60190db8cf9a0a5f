"""Key paths, leaf selection, partition/combine and counts over parameter pytrees.

Every leaf of a parameter pytree has a '/'-joined *path* such as
``encoder/layer_0/attention/query/kernel``. The same syntax works for plain dicts,
Flax linen ``params`` and Flax NNX ``nnx.State`` (the trailing ``value`` of an NNX
variable is dropped), so one ``where=`` selects the same weights in all three.

A selection (``where``) is one of:

* a regex string, matched with :func:`re.search` against each path;
* a sequence of regex strings (a leaf is selected if any matches);
* a predicate ``f(path: str, leaf) -> bool``;
* a boolean mask pytree with the structure of the tree.

``partition(tree, mask)`` splits a tree into ``(selected, rest)`` with ``None`` in the
holes, in the style of ``equinox.partition``; ``combine`` puts them back together.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy

PyTree = Any
Where = Union[str, Sequence[str], Callable[[str, Any], bool], PyTree, None]

__all__ = [
  "path_str",
  "leaf_paths",
  "flatten_with_paths",
  "is_lazy_or_array",
  "select",
  "partition",
  "combine",
  "count_params",
  "count_bytes",
  "array_bytes",
  "dtype_bits",
  "map_selected",
  "Siblings",
  "with_subtree",
  "without_subtree",
]


class Siblings:
  """Selects the leaves named ``name`` beside the leaves ``where`` selects.

  ``Siblings(r"query/kernel", "bias")`` selects ``.../query/bias``: the bias of
  each adapted layer (LoRA's ``bias="lora_only"``).
  """

  def __init__(self, where, name: str = "bias"):
    self.where, self.name = where, name

  def flags(self, tree) -> list[bool]:
    parents = {p.rpartition("/")[0] for p, m in
               zip(leaf_paths(tree), jax.tree_util.tree_leaves(select(tree, self.where))) if m}
    return [p.rpartition("/")[0] in parents and p.rpartition("/")[2] == self.name
            for p in leaf_paths(tree)]

  def __repr__(self):
    return f"Siblings({self.where!r}, {self.name!r})"


def key_name(k) -> str:
  """The string form of one ``jax.tree_util`` path key (dict key, attribute, index)."""
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """Joins a JAX key path into ``a/b/c``; drops the ``value`` field of NNX variables."""
  names = [key_name(k) for k in path]
  if names and names[-1] in ("value", "raw_value") and len(path) and isinstance(
      path[-1], (jax.tree_util.GetAttrKey, jax.tree_util.DictKey)):
    names = names[:-1]
  return "/".join(names)


def is_lazy_or_array(x) -> bool:
  """Leaf predicate for our trees: lazy weights count as single leaves."""
  return isinstance(x, lazy.LazyWeight)


def flatten_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf), ...]`` in tree order; lazy weights are leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lazy_or_array)
  return [(path_str(p), x) for p, x in leaves]


def leaf_paths(tree: PyTree) -> list[str]:
  """All leaf paths of ``tree`` in order."""
  return [p for p, _ in flatten_with_paths(tree)]


def _describe_paths(tree: PyTree, limit: int = 40) -> str:
  items = flatten_with_paths(tree)
  lines = [f"  {p}  {tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}"
           for p, x in items[:limit]]
  if len(items) > limit:
    lines.append(f"  ... and {len(items) - limit} more")
  return "\n".join(lines)


def select(tree: PyTree, where: Where, *, allow_empty: bool = False) -> PyTree:
  """Boolean mask pytree (same structure as ``tree``) of the leaves ``where`` names.

  Args:
    tree: a parameter pytree.
    where: regex, list of regexes, predicate ``(path, leaf) -> bool``, a mask
      pytree, or ``None`` for every leaf.
    allow_empty: if False (default) a selection that matches nothing raises a
      ``ValueError`` listing the available paths.

  Returns:
    A pytree of Python bools with the structure of ``tree``.
  """
  treedef = jax.tree_util.tree_structure(tree, is_leaf=is_lazy_or_array)
  items = flatten_with_paths(tree)
  if where is None:
    flags = [True] * len(items)
  elif isinstance(where, Siblings):
    flags = where.flags(tree)
  elif isinstance(where, str):
    rx = re.compile(where)
    flags = [bool(rx.search(p)) for p, _ in items]
  elif callable(where):
    flags = [bool(where(p, x)) for p, x in items]
  elif isinstance(where, (list, tuple)) and all(isinstance(w, str) for w in where):
    rxs = [re.compile(w) for w in where]
    flags = [any(r.search(p) for r in rxs) for p, _ in items]
  else:
    mask_leaves, mask_def = jax.tree_util.tree_flatten(where)
    if len(mask_leaves) != len(items):
      raise ValueError(
          f"where= mask has {len(mask_leaves)} leaves but the tree has {len(items)}; "
          f"mask structure {mask_def} vs tree {treedef}")
    flags = [bool(m) for m in mask_leaves]
  if not allow_empty and not any(flags):
    raise ValueError(
        f"where={where!r} selects no leaf. Available paths:\n{_describe_paths(tree)}")
  return jax.tree_util.tree_unflatten(treedef, flags)


def partition(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits ``tree`` into ``(selected, rest)`` by a boolean ``mask`` (or a ``where``).

  Both outputs have the structure of ``tree`` with ``None`` where a leaf belongs to
  the other part, so ``jax.grad`` of a function of ``selected`` only sees the
  selected leaves. Inverse: :func:`combine`.
  """
  if not _is_bool_mask(tree, mask):
    mask = select(tree, mask)
  sel = jax.tree.map(lambda m, x: x if m else None, mask, tree, is_leaf=is_lazy_or_array)
  rest = jax.tree.map(lambda m, x: None if m else x, mask, tree, is_leaf=is_lazy_or_array)
  return sel, rest


def _is_bool_mask(tree, mask) -> bool:
  if isinstance(mask, (str, list, tuple, Siblings)) or callable(mask) or mask is None:
    return False
  try:
    leaves = jax.tree_util.tree_leaves(mask)
    return (jax.tree_util.tree_structure(mask) ==
            jax.tree_util.tree_structure(tree, is_leaf=is_lazy_or_array)
            and all(isinstance(m, (bool, np.bool_)) for m in leaves))
  except Exception:  # pragma: no cover - structure mismatch means "not a mask"
    return False


def combine(*trees: PyTree) -> PyTree:
  """Merges trees with ``None`` holes: the first non-None leaf wins (``equinox.combine``)."""
  def pick(*xs):
    for x in xs:
      if x is not None:
        return x
    return None
  return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None or is_lazy_or_array(x))


def map_selected(fn: Callable[[str, Any], Any], tree: PyTree, mask: PyTree,
                 other: Callable[[str, Any], Any] = lambda p, x: x) -> PyTree:
  """Applies ``fn(path, leaf)`` to selected leaves and ``other`` to the rest."""
  treedef = jax.tree_util.tree_structure(tree, is_leaf=is_lazy_or_array)
  items = flatten_with_paths(tree)
  flags = jax.tree_util.tree_leaves(mask)
  out = [fn(p, x) if m else other(p, x) for (p, x), m in zip(items, flags)]
  return jax.tree_util.tree_unflatten(treedef, out)


def dtype_bits(dtype) -> int:
  """Storage bits of one element of ``dtype``: the itemsize in bits, except the sub-byte
  types (``int4``/``uint4``, ``float4_e2m1fn``...: 4), which are stored two to a byte."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return int(jnp.iinfo(dtype).bits)
  if jnp.issubdtype(dtype, jnp.floating):
    return int(jnp.finfo(dtype).bits)
  return 8 * dtype.itemsize


def array_bytes(x) -> int:
  """Storage bytes of one array: ``ceil(size * dtype_bits / 8)`` (sub-byte codes packed,
  as XLA lays them out on TPU/GPU and as a packed checkpoint stores them; XLA:CPU keeps
  one byte per 4-bit element in memory)."""
  return -(-int(np.prod(x.shape)) * dtype_bits(x.dtype) // 8)


def count_params(tree: PyTree) -> int:
  """Number of scalar entries stored in the array leaves of ``tree`` (``None`` counts 0)."""
  return sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(tree) if hasattr(l, "shape"))


def count_bytes(tree: PyTree) -> int:
  """Bytes held by the array leaves of ``tree`` (:func:`array_bytes` each; a lazy weight or
  a codec counts its real buffers: codes, scales, factors)."""
  return sum(array_bytes(l) for l in jax.tree_util.tree_leaves(tree) if hasattr(l, "dtype"))


# --------------------------------------------------------------------------- subtree insertion
# For methods that add parameters to the model's tree (bottleneck adapters, prefixes).

def _dict_node(tree: PyTree, parts: Sequence[str], what: str):
  from collections.abc import Mapping
  node = tree
  for i, k in enumerate(parts):
    if not isinstance(node, Mapping) or k not in node:
      raise ValueError(f"{what}: no dict node '{'/'.join(parts[:i + 1])}' in the tree; keys there: "
                       f"{sorted(node) if isinstance(node, Mapping) else type(node).__name__}")
    node = node[k]
  if not isinstance(node, Mapping):
    raise ValueError(f"{what}: '{'/'.join(parts)}' is a {type(node).__name__}, not a dict node")
  return node


def _replace_node(tree: PyTree, parts: Sequence[str], fn: Callable[[Any], Any]) -> PyTree:
  if not parts:
    return fn(tree)
  return {**tree, parts[0]: _replace_node(tree[parts[0]], parts[1:], fn)}


def with_subtree(tree: PyTree, path: str, value: Any) -> PyTree:
  """A copy of a nested-dict ``tree`` with ``value`` added at the new key ``path`` ('/'-joined).

  Only the dicts along ``path`` are copied; every other node is shared with ``tree``.
  The parent must exist and ``path`` must not.
  """
  *parent, name = [p for p in path.split("/") if p]
  node = _dict_node(tree, parent, f"with_subtree('{path}')")
  if name in node:
    raise ValueError(f"with_subtree: '{path}' already exists in the tree")
  return _replace_node(tree, parent, lambda n: {**n, name: value})


def without_subtree(tree: PyTree, path: str) -> PyTree:
  """A copy of a nested-dict ``tree`` without the key ``path`` (inverse of :func:`with_subtree`)."""
  *parent, name = [p for p in path.split("/") if p]
  node = _dict_node(tree, parent, f"without_subtree('{path}')")
  if name not in node:
    raise ValueError(f"without_subtree: '{path}' is not in the tree")
  return _replace_node(tree, parent, lambda n: {k: v for k, v in n.items() if k != name})


def find_nodes(tree: PyTree, types: Union[type, tuple[type, ...]]) -> list:
  """Every node of ``tree`` that is an instance of ``types`` (e.g. the ``GaLoreState`` s
  nested inside a chained optax state), outermost first, in tree order."""
  return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, types))
          if isinstance(x, types)]
