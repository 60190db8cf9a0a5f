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
``save_projection=True``: ``A = vera_A.T``, ``B = vera_B.T``). They are the method's
shared frozen buffers (peft's ``vera_A``/``vera_B`` buffers): regenerated from the key in
every ``apply`` by the :class:`~lowrank_jax.LeafMethod`'s ``prepare`` hook, not stored
in ``phi``, as nothing trains them. The scaled factors ``A diag(λ_d)`` and
``B diag(λ_b)`` feed the LoRA lazy weight, so ``x @ W = x @ W0 + ((x A) λ_d) B λ_b``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import tree as tree_lib
from lowrank_jax.methods._config import configured
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


def vera_method(a: Optional[jax.Array] = None, b: Optional[jax.Array] = None, *,
                key: Optional[jax.Array] = None, rank: Optional[int] = None,
                d_initial: float = 0.1, dropout: float = 0.0, dtype=jnp.float32) -> LeafMethod:
  """The per-leaf VeRA method over shared frozen projections.

  Either given, ``a [in_max, r]`` and ``b [r, out_max]``, or drawn from ``key`` with
  ``rank``: then :func:`vera_projections` sized to the largest input and output dimension
  of the selected leaves, regenerated in every ``apply`` (the method's ``prepare``) rather
  than stored: they are frozen, so they need no place in ``phi``, the optimizer state or
  a checkpoint (save them with :func:`shared_projections` if wanted).
  """
  if (a is None) != (b is None) or (a is None) == (key is None):
    raise ValueError("vera_method: pass the projections (a, b) or a key and rank, not both")
  if a is not None:
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
      raise ValueError(f"VeRA projections must be A [in, r] and B [r, out], got "
                       f"{tuple(a.shape)} and {tuple(b.shape)}")
    rank = a.shape[1]
  elif not isinstance(rank, int) or rank < 1:
    raise ValueError(f"VeRA rank must be a positive int, got {rank!r}")

  def validate(path, view: MatrixView):
    if a is not None and (view.d_in > a.shape[0] or view.d_out > b.shape[1]):
      raise ValueError(f"VeRA: leaf '{path}' of shape {view.shape} ({view.d_in} -> {view.d_out}) "
                       f"exceeds the shared projections A {tuple(a.shape)}, B {tuple(b.shape)}")

  def prepare(shared, views):
    del shared  # nothing shared is trained: λ_d, λ_b are per leaf
    if a is not None:
      return dict.fromkeys(views, (a, b))
    proj = vera_projections(key, max(v.d_in for v in views.values()),
                            max(v.d_out for v in views.values()), rank, dtype)
    return dict.fromkeys(views, proj)

  def init_leaf(key_, path, w, view):
    return {"lambda_d": jnp.full((rank,), d_initial, dtype), "lambda_b": jnp.zeros((view.d_out,), dtype)}

  def factors(phi, view, proj):
    pa, pb = proj
    return (pa[: view.d_in] * phi["lambda_d"][None, :].astype(pa.dtype),
            pb[:, : view.d_out] * phi["lambda_b"][None, :].astype(pb.dtype))

  def apply_leaf(w, phi, view, rng, proj):
    fa, fb = factors(phi, view, proj)
    return LoRAWeight(base=w, a=fa, b=fb, rng=rng if dropout > 0 else None, scale=1.0,
                      shape_=view.shape, dropout_rate=dropout)

  def unmerge_leaf(w, phi, view, proj):
    fa, fb = factors(phi, view, proj)
    return (w.astype(jnp.float32) - view.from_matrix(fa @ fb).astype(jnp.float32)).astype(w.dtype)

  return LeafMethod(name="VeRA", init_leaf=init_leaf, apply_leaf=apply_leaf,
                    unmerge_leaf=unmerge_leaf, validate=validate, prepare=prepare)


@configured("vera")
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
    A :class:`Reparam` producing LoRA lazy weights with factors ``A λ_d`` and ``B λ_b``;
    ``phi`` mirrors ``theta0`` with ``{"lambda_d": [r], "lambda_b": [out]}`` at the
    selected leaves.
  """
  if projections is not None:
    a, b = projections
    return adapt(vera_method(a, b, d_initial=d_initial, dropout=dropout, dtype=dtype), where)
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"VeRA rank must be a positive int, got {rank!r}")
  proj_key = jax.random.key(0) if key is None else key
  return adapt(vera_method(key=proj_key, rank=rank, d_initial=d_initial, dropout=dropout,
                           dtype=dtype), where)


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
