"""Checks of inputs that would otherwise give a silently wrong result.

* :func:`check_token_ids`: token ids outside ``[0, vocab_size)`` make ``jnp.take`` read
  outside the embedding table (NaN hidden states at or above the vocabulary size) or wrap
  around (negative ids). Concrete ids are checked at once (a :class:`TokenIdError` naming
  the first bad id, its position and the vocabulary size); traced ids (inside ``jit`` or
  ``grad``) get a :func:`jax.experimental.checkify.debug_check`, free unless the caller
  opts in by transforming the function with ``checkify``::

      from jax.experimental import checkify
      checked = checkify.checkify(loss_fn, errors=checkify.user_checks)
      err, loss = jax.jit(checked)(params, batch)
      err.throw()        # raises checkify.JaxRuntimeError naming the id and its position

  The models' forwards (``bert_forward``, ``decoder_forward``) call it on their
  ``input_ids``.
* :func:`check_finite`: NaN or infinite values in a tree that was read from somewhere
  (a PEFT folder, a safetensors file, a checkpoint) are reported with their paths
  (:class:`NonFiniteError`).
* :class:`CorruptFileError`: a file that cannot be parsed, raised with the file (and the
  tensor or leaf where known) in the message and the underlying error as ``__cause__``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from lowrank_jax import tree as tree_lib

__all__ = ["TokenIdError", "NonFiniteError", "CorruptFileError", "check_token_ids",
           "check_finite", "corrupt_file"]

PyTree = Any


class TokenIdError(ValueError):
  """A token id outside ``[0, vocab_size)``."""


class NonFiniteError(ValueError):
  """NaN or infinite values where a finite tree was expected (the message lists the paths)."""


class CorruptFileError(ValueError):
  """A file that cannot be read as what it claims to be; ``__cause__`` is the reader's error."""


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_token_ids(ids, vocab_size: int, *, what: str = "input_ids") -> None:
  """Checks that every id of ``ids`` lies in ``[0, vocab_size)``.

  Args:
    ids: integer token ids, any shape (numpy, a concrete ``jax.Array`` or a tracer).
    vocab_size: the number of rows of the embedding table.
    what: the argument's name, for the message.

  Raises:
    TypeError: ``ids`` are not integers.
    TokenIdError: (concrete ids) the first id out of range, with its position, the
      vocabulary size and how many ids are out of range. Traced ids are checked only
      under ``checkify`` (see the module docstring).
  """
  dtype = np.dtype(ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype)
  if not np.issubdtype(dtype, np.integer):
    raise TypeError(f"{what}: token ids must be integers, got dtype {dtype} "
                    f"(shape {tuple(np.shape(ids))})")
  if _is_traced(ids):
    if np.size(ids) == 0:
      return
    flat = jnp.ravel(ids)
    bad = (flat < 0) | (flat >= vocab_size)
    i = jnp.argmax(bad)
    pos = jnp.unravel_index(i, jnp.shape(ids))
    checkify.debug_check(
        ~jnp.any(bad),
        f"{what}: token id {{}} at position ({', '.join(['{}'] * len(pos))}) is outside the "
        f"vocabulary [0, {vocab_size}) (vocab_size={vocab_size})", flat[i], *pos)
    return
  a = np.asarray(ids)
  bad = (a < 0) | (a >= vocab_size)
  if not bad.any():
    return
  pos = tuple(int(p) for p in np.argwhere(bad)[0])
  value = int(a[pos])
  why = (" (a negative id would wrap around to the end of the embedding table)" if value < 0 else
         " (an id at or above vocab_size reads outside the embedding table)")
  raise TokenIdError(f"{what}: token id {value} at position {pos} (shape {a.shape}) is outside the "
                     f"vocabulary [0, {vocab_size}) (vocab_size={vocab_size}){why}; "
                     f"{int(bad.sum())} of {a.size} ids are out of range")


def _nonfinite_counts(x) -> Optional[tuple[int, int]]:
  """``(NaN count, infinity count)`` of a floating array, ``None`` when all finite."""
  if isinstance(x, np.ndarray):  # (numpy's ufuncs cover ml_dtypes' bfloat16 and float8 too)
    if np.isfinite(x).all():
      return None
    return int(np.isnan(x).sum()), int(np.isinf(x).sum())
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # many processes: the local shards
    parts = [_nonfinite_counts(s.data) for s in x.addressable_shards]
    parts = [c for c in parts if c is not None]
    return (sum(c[0] for c in parts), sum(c[1] for c in parts)) if parts else None
  if bool(jnp.isfinite(x).all()):
    return None
  return int(jnp.isnan(x).sum()), int(jnp.isinf(x).sum())


def check_finite(tree: PyTree, *, what: str, limit: int = 10) -> PyTree:
  """Raises :class:`NonFiniteError` if a floating array of ``tree`` holds NaN or infinity.

  Args:
    tree: any pytree (lazy weights are looked into); non-floating leaves, ``None`` and
      abstract leaves (``jax.ShapeDtypeStruct``) are skipped. An array spread over several
      processes is checked in the shards this process holds (counts are local).
    what: what the tree is (``"adapter ./out/adapter_model.safetensors"``), for the message.
    limit: how many bad paths the message lists.

  Returns:
    ``tree`` unchanged, so the check composes: ``phi = check_finite(load(...), what=...)``.

  Raises:
    TypeError: a leaf is traced (the check is for concrete values read from files).
    NonFiniteError: naming every bad leaf's path (up to ``limit``), shape, dtype and the
      number of NaN and infinite values.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  bad = []
  for path, x in leaves:
    if not hasattr(x, "dtype") or isinstance(x, jax.ShapeDtypeStruct):
      continue
    if not jnp.issubdtype(x.dtype, jnp.floating):
      continue
    if _is_traced(x):
      raise TypeError(f"check_finite({what}): leaf '{tree_lib.path_str(path)}' is traced; "
                      f"the check runs on concrete values")
    counts = _nonfinite_counts(x)
    if counts is not None:
      bad.append((tree_lib.path_str(path) or "<root>", tuple(x.shape), x.dtype, counts))
  if bad:
    rows = "; ".join(f"'{p}' {s} {d}: {n} NaN, {i} inf" for p, s, d, (n, i) in bad[:limit])
    more = f"; and {len(bad) - limit} more leaves" if len(bad) > limit else ""
    raise NonFiniteError(f"{what}: non-finite values in {len(bad)} "
                         f"{'leaves' if len(bad) > 1 else 'leaf'}: {rows}{more}")
  return tree


def corrupt_file(path: str | os.PathLike, reason: BaseException, *, what: str = "file",
                 leaf: Optional[str] = None) -> CorruptFileError:
  """The :class:`CorruptFileError` for ``path``; raise it ``from reason``::

      except (OSError, ValueError) as e:
        raise validate.corrupt_file(path, e, what="checkpoint", leaf="phi/a/kernel") from e
  """
  at = f" (leaf '{leaf}')" if leaf else ""
  return CorruptFileError(f"cannot read the {what} {os.fspath(path)}{at}: it is corrupt or truncated "
                          f"({type(reason).__name__}: {reason})")
