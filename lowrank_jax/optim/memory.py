"""Memory report: bytes of frozen params, trainable params, gradients and optimizer state.

::

    rep = memory_report(frozen=theta0, trainable=phi, opt_state=opt_state)
    print(rep)                       # a table by partition, in MiB
    rep.total("opt_state")           # bytes

Works on concrete arrays and on ``jax.ShapeDtypeStruct`` trees (``jax.eval_shape``), so
a configuration can be sized before anything is allocated. Packed codecs (NF4, 8-bit
blockwise) count their real buffers. Optimizer state in host memory
(:func:`lowrank_jax.optim.offload`) is reported in its own column.

Partitions: each parameter leaf gets a label from ``partition`` - ``None`` (the first
path component, e.g. ``encoder`` / ``classifier``), a function ``path -> label``, or a
dict ``{label: where}`` (first match wins; the rest is ``"other"``). An optimizer-state
leaf belongs to the parameter whose path it contains (optax states mirror the
parameter tree: ``mu/<path>``, GaLore's ``projector/<path>``, 8-bit ``mu/<path>/codes``);
leaves that belong to no parameter (step counts) go to ``"(shared)"``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Union

import jax

from lowrank_jax import tree as tree_lib

PyTree = Any
Partition = Union[None, Callable[[str], str], dict]

__all__ = ["MemoryReport", "memory_report", "human_bytes"]

COLUMNS = ("frozen", "trainable", "grads", "opt_state", "opt_state_host")


def _nbytes(x) -> int:
  """:func:`lowrank_jax.tree.array_bytes` of an array leaf, 0 for anything else."""
  if x is None or not hasattr(x, "dtype") or not hasattr(x, "shape"):
    return 0
  return tree_lib.array_bytes(x)


def _is_host(x) -> bool:
  kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
  return kind in ("pinned_host", "unpinned_host")


def _labeller(partition: Partition) -> Callable[[str], str]:
  if partition is None:
    return lambda path: path.split("/", 1)[0] if path else "(root)"
  if callable(partition):
    return partition
  if isinstance(partition, dict):
    rules = []
    for label, where in partition.items():
      rxs = [re.compile(w) for w in ([where] if isinstance(where, str) else where)]
      rules.append((label, rxs))

    def lab(path):
      for label, rxs in rules:
        if any(r.search(path) for r in rxs):
          return label
      return "other"
    return lab
  raise TypeError(f"partition must be None, a function path -> label or a dict label -> where; "
                  f"got {type(partition).__name__}")


def _leaves(tree) -> list[tuple[str, Any]]:
  if tree is None:
    return []
  items, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tree_lib.path_str(p), x) for p, x in items]


@dataclasses.dataclass
class MemoryReport:
  """Bytes by partition. ``rows[label][column]``; columns: :data:`COLUMNS`."""
  rows: dict

  def total(self, column: Optional[str] = None) -> int:
    """Total bytes of one column, or of all columns."""
    cols = COLUMNS if column is None else (column,)
    return sum(r[c] for r in self.rows.values() for c in cols)

  def as_dict(self) -> dict:
    out = {k: dict(v) for k, v in self.rows.items()}
    out["total"] = {c: self.total(c) for c in COLUMNS}
    return out

  def __str__(self) -> str:
    head = f"{'partition':<24}" + "".join(f"{c:>16}" for c in COLUMNS) + f"{'all':>12}"
    lines = ["memory (bytes, KiB/MiB/GiB = 2^10/2^20/2^30)", head, "-" * len(head)]
    for label, r in self.as_dict().items():
      if label == "total":
        lines.append("-" * len(head))
      lines.append(f"{label:<24}" + "".join(f"{human_bytes(r[c]):>16}" for c in COLUMNS)
                   + f"{human_bytes(sum(r.values())):>12}")
    return "\n".join(lines)


def human_bytes(b: int) -> str:
  """``1536 -> '1.50 KiB'``."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b} B"


def memory_report(frozen: PyTree = None, trainable: PyTree = None, opt_state: PyTree = None,
                  grads: PyTree = None, *, partition: Partition = None) -> MemoryReport:
  """Bytes of each part of a training setup, by partition.

  Args:
    frozen: the frozen base parameters (``theta0``), or ``None``.
    trainable: the trainable parameters (``phi``, or the full tree for full fine-tuning).
    opt_state: the optimizer state (concrete or from ``jax.eval_shape``).
    grads: the gradient tree; default: one gradient per trainable leaf with its shape
      and dtype (what ``jax.grad`` w.r.t. ``trainable`` returns).
    partition: how to label parameter leaves (see the module docstring).

  Returns:
    A :class:`MemoryReport`; ``print`` it for a table.
  """
  label = _labeller(partition)
  rows: dict = {}

  def add(lab, col, b):
    rows.setdefault(lab, dict.fromkeys(COLUMNS, 0))[col] += b

  param_paths = []
  for col, tree in (("frozen", frozen), ("trainable", trainable)):
    for path, x in _leaves(tree):
      add(label(path), col, _nbytes(x))
      param_paths.append(path)
  for path, x in _leaves(trainable if grads is None else grads):
    add(label(path), "grads", _nbytes(x))
  # longest parameter path contained in the state path owns the state leaf
  owners = sorted({p for p in param_paths if p}, key=len, reverse=True)
  for spath, x in _leaves(opt_state):
    wrapped = f"/{spath}/"
    owner = next((p for p in owners if f"/{p}/" in wrapped), None)
    add("(shared)" if owner is None else label(owner),
        "opt_state_host" if _is_host(x) else "opt_state", _nbytes(x))
  return MemoryReport(rows)
