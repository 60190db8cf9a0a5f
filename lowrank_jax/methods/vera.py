"""VeRA: vector-based random matrix adaptation.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454.

One pair of frozen random matrices is shared by every adapted layer; each layer
trains only two scaling vectors. In Flax layout (``W`` is ``[in, out]``)::

    ΔW = A[:in] diag(λ_d) B[:, :out] diag(λ_b)        (paper: ΔWᵀ = Λ_b B Λ_d A)

with ``A [in_max, r]``, ``B [r, out_max]`` sliced to each layer's shape as peft does,
``λ_d [r]`` initialised to ``d_initial`` (0.1) and ``λ_b [out]`` to 0, so the adapted
model starts equal to the base. ``A`` and ``B`` are drawn from an explicit JAX key with
peft's kaiming-uniform bounds (``√(6/in_max)`` and ``√(6/r)``), or given
(``projections=``, e.g. loaded from a peft checkpoint saved with
``save_projection=True``: ``A = vera_A.T``, ``B = vera_B.T``). They live in the reparam,
not in ``phi``: nothing trains them. The scaled factors ``A diag(λ_d)`` and
``B diag(λ_b)`` feed the LoRA lazy weight, so ``x @ W = x @ W0 + ((x A) λ_d) B λ_b``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods.lora import LoRAWeight
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = ["vera", "vera_projections", "vera_method", "shared_projections"]


def vera_projections(key: jax.Array, d_in: int, d_out: int, rank: int,
                     dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """The shared frozen ``(A [d_in, r], B [r, d_out])``, kaiming-uniform as in peft.

  Bounds: ``√(6 / d_in)`` for ``A`` (peft ``vera_A [r, in]``, fan-in ``in``) and
  ``√(6 / r)`` for ``B`` (peft ``vera_B [out, r]``, fan-in ``r``).
  """
  ka, kb = jax.random.split(key)
  ba, bb = math.sqrt(6.0 / d_in), math.sqrt(6.0 / rank)
  return (jax.random.uniform(ka, (d_in, rank), dtype, -ba, ba),
          jax.random.uniform(kb, (rank, d_out), dtype, -bb, bb))


def vera_method(a: jax.Array, b: jax.Array, *, d_initial: float = 0.1, dropout: float = 0.0,
                dtype=jnp.float32) -> LeafMethod:
  """The per-leaf VeRA method over given shared projections ``a [in_max, r]``, ``b [r, out_max]``."""
  rank = a.shape[1]

  def validate(path, view: MatrixView):
    if view.d_in > a.shape[0] or view.d_out > b.shape[1]:
      raise ValueError(f"VeRA: leaf '{path}' of shape {view.shape} ({view.d_in} -> {view.d_out}) "
                       f"exceeds the shared projections A {tuple(a.shape)}, B {tuple(b.shape)}")

  def init_leaf(key, path, w, view):
    return {"lambda_d": jnp.full((rank,), d_initial, dtype), "lambda_b": jnp.zeros((view.d_out,), dtype)}

  def factors(phi, view):
    return (a[: view.d_in] * phi["lambda_d"][None, :].astype(a.dtype),
            b[:, : view.d_out] * phi["lambda_b"][None, :].astype(b.dtype))

  def apply_leaf(w, phi, view, rng):
    fa, fb = factors(phi, view)
    return LoRAWeight(base=w, a=fa, b=fb, rng=rng if dropout > 0 else None, scale=1.0,
                      shape_=view.shape, dropout_rate=dropout)

  def unmerge_leaf(w, phi, view):
    fa, fb = factors(phi, view)
    return (w.astype(jnp.float32) - view.from_matrix(fa @ fb).astype(jnp.float32)).astype(w.dtype)

  return LeafMethod(name="VeRA", init_leaf=init_leaf, apply_leaf=apply_leaf,
                    unmerge_leaf=unmerge_leaf, validate=validate)


def vera(where: tree_lib.Where, rank: int = 256, *, key: Optional[jax.Array] = None,
         projections: Optional[tuple[Any, Any]] = None, d_initial: float = 0.1,
         dropout: float = 0.0, dtype=jnp.float32) -> Reparam:
  """VeRA on the leaves ``where`` selects.

  Args:
    where: selection of the weights to adapt (2-d kernels).
    rank: ``r``, the width of the shared projections.
    key: PRNG key of the shared projections (default ``jax.random.key(0)``); with the
      same key and the same selected shapes they are the same in every run.
    projections: ``(A [in_max, r], B [r, out_max])`` to use instead of drawing them
      (e.g. a peft checkpoint's ``vera_A.T``, ``vera_B.T``).
    d_initial: initial value of ``λ_d``.
    dropout: dropout on the adapter input.
    dtype: dtype of the projections and vectors.

  Returns:
    A :class:`Reparam` producing LoRA lazy weights with factors ``A λ_d`` and ``B λ_b``.
  """
  if projections is None and (not isinstance(rank, int) or rank < 1):
    raise ValueError(f"VeRA rank must be a positive int, got {rank!r}")
  proj_key = jax.random.key(0) if key is None else key

  def method_for(theta0) -> Reparam:
    if projections is not None:
      a, b = (jnp.asarray(p, dtype) for p in projections)
      if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"VeRA projections must be A [in, r] and B [r, out], got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    else:
      a, b = shared_projections(proj_key, theta0, where, rank, dtype)
    return adapt(vera_method(a, b, d_initial=d_initial, dropout=dropout, dtype=dtype), where)

  def init_with_base(key, theta0):
    return method_for(theta0).init_with_base(key, theta0)

  def init(key, theta0):
    return method_for(theta0).init(key, theta0)

  def apply(theta0, phi, rng=None):
    return method_for(theta0).apply(theta0, phi, rng)

  def unmerge(theta, phi):
    return method_for(theta).unmerge(theta, phi)

  return Reparam(init=init, apply=apply, init_with_base=init_with_base, unmerge=unmerge)


def shared_projections(reparam_key: jax.Array, theta0, where: tree_lib.Where, rank: int,
                       dtype=jnp.float32):
  """The ``(A, B)`` that ``vera(where, rank, key=reparam_key)`` draws for ``theta0``.

  Sized to the largest input and output dimension over the selected 2-d leaves; use it
  to save the projections beside a checkpoint.
  """
  mask = tree_lib.select(theta0, where)
  dims = [(int(w.shape[0]), int(math.prod(w.shape[1:])))
          for (p, w), m in zip(tree_lib.flatten_with_paths(theta0), jax.tree_util.tree_leaves(mask)) if m]
  return vera_projections(reparam_key, max(d for d, _ in dims), max(d for _, d in dims), rank, dtype)
