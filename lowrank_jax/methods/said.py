"""Intrinsic SAID: fine-tuning in a random ``d``-dimensional subspace (Fastfood projection).

Aghajanyan, Zettlemoyer and Gupta, "Intrinsic Dimensionality Explains the Effectiveness
of Language Model Fine-Tuning", arXiv 2012.13255 (building on Li et al., "Measuring the
Intrinsic Dimension of Objective Landscapes", arXiv 1804.08838, and Le et al.,
"Fastfood", ICML 2013).

Every selected tensor ``i`` (``D_i`` entries) moves along a fixed random projection of
one shared trainable vector ``z`` (``θ^d``, zero at initialisation)::

    θ_i = θ0_i + λ_i · P_i(z)                      (SAID; DID has no λ)
    P_i(z) = (H G Π H B pad(z))[:D_i] / (√(L_i Σ G²) · √(D_i / L_i))

with ``L_i = 2^⌈log2 D_i⌉``, ``H`` the (unnormalised, Sylvester-ordered) Walsh-Hadamard
matrix of size ``L_i``, ``B`` a random ±1 diagonal, ``Π`` a random permutation
(``(Π v)_j = v[π_j]``), ``G`` a standard-normal diagonal and ``pad`` zero-padding (or
truncation, if ``d > L_i``) of ``z`` to ``L_i``: the normalisation of Aghajanyan's
reference code (``fastfood_torched``). ``λ`` (one scalar per tensor, initialised to 1)
is trained with ``z``; as in the paper the total budget ``d`` counts them, so ``z`` has
``d - m`` entries for ``m`` tensors (``said=False`` gives plain DID with ``d`` entries).

Cost: each ``P_i`` is two fast Walsh-Hadamard transforms, ``O(D log D)`` time and
``O(D)`` memory; the dense ``D × d`` matrix is never formed. The random ``B, Π, G`` are
regenerated inside :func:`apply` from the static ``seed`` (``O(D)`` work per call,
nothing extra stored in ``phi`` or the optimizer state).

Differences from the reference code:

* JAX differentiates the FWHT exactly (``Hᵀ = H``); the reference's custom backward
  multiplies by ``1/√L`` instead, so its ``z`` gradients are ``1/L`` of the true ones.
* The reference reduces the intrinsic dimension by ``m + 1`` for SAID; we use the
  paper's ``d - m``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.reparam import Reparam

__all__ = ["fwht", "FastfoodParams", "fastfood_params", "fastfood", "intrinsic_said"]

PyTree = Any


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalised fast Walsh-Hadamard transform over the last axis: ``x @ H_L``.

  ``L = x.shape[-1]`` must be a power of two; ``H`` is Sylvester-ordered
  (``H_2n = [[H_n, H_n], [H_n, -H_n]]``, as ``scipy.linalg.hadamard``). ``O(L log L)``.
  """
  n = x.shape[-1]
  if n < 1 or n & (n - 1):
    raise ValueError(f"fwht needs a power-of-two length, got {n} (shape {x.shape})")
  lead = x.shape[:-1]
  h = 1
  while h < n:
    y = x.reshape(lead + (n // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
    h *= 2
  return x


class FastfoodParams(NamedTuple):
  """Random diagonals of one Fastfood transform of output size ``D``.

  Attributes:
    b: ±1 signs ``[L]``.
    perm: permutation indices ``[L]`` (``(Π v)_j = v[perm_j]``).
    g: standard-normal ``[L]``.
    divisor: ``√(L Σ g²) · √(D / L)``.
  """
  b: jax.Array
  perm: jax.Array
  g: jax.Array
  divisor: jax.Array


def _padded_size(d_out: int) -> int:
  return 1 << max(0, math.ceil(math.log2(d_out))) if d_out > 1 else 1


def fastfood_params(key: jax.Array, d_out: int, dtype=jnp.float32) -> FastfoodParams:
  """Draws ``B, Π, G`` for a Fastfood transform to ``d_out`` entries."""
  if d_out < 1:
    raise ValueError(f"fastfood: output size must be >= 1, got {d_out}")
  n = _padded_size(d_out)
  kb, kp, kg = jax.random.split(key, 3)
  b = jnp.where(jax.random.bernoulli(kb, 0.5, (n,)), 1.0, -1.0).astype(dtype)
  perm = jax.random.permutation(kp, n)
  g = jax.random.normal(kg, (n,), dtype)
  divisor = jnp.sqrt(n * jnp.sum(g * g)) * math.sqrt(d_out / n)
  return FastfoodParams(b=b, perm=perm, g=g, divisor=divisor)


def fastfood(z: jax.Array, params: FastfoodParams, d_out: int) -> jax.Array:
  """``P(z) = (H G Π H B pad(z))[:d_out] / divisor`` for a vector ``z``."""
  n = params.b.shape[0]
  d = z.shape[0]
  v = jnp.pad(z, (0, n - d)) if d < n else z[:n]
  v = fwht(v.astype(params.g.dtype) * params.b)
  v = fwht(v[params.perm] * params.g)
  return v[:d_out] / params.divisor


def intrinsic_said(d: int, where: tree_lib.Where = None, *, said: bool = True, seed: int = 0,
                   dtype=jnp.float32) -> Reparam:
  """Intrinsic-dimension fine-tuning of the selected leaves (whole-tree reparam).

  Args:
    d: the intrinsic dimension (total trainable budget, including the ``m`` scalars
      ``λ`` when ``said``).
    where: leaves that move (default: every floating-point leaf).
    said: learn one scale ``λ_i`` per tensor (SAID); ``False`` gives DID.
    seed: seed of the fixed random projections (static, part of the reparam).
    dtype: dtype of ``z``, ``λ`` and the projection arithmetic.

  Returns:
    A :class:`Reparam` with ``phi = {"z": [d - m], "lam": [m]}`` (``"lam"`` only with
    ``said``), ``z = 0`` and ``λ = 1`` at initialisation so ``apply(θ0, phi) = θ0``.
  """
  if not isinstance(d, int) or d < 1:
    raise ValueError(f"intrinsic dimension d must be a positive int, got {d!r}")

  def _selected(theta0):
    sel = where
    if sel is None:
      sel = lambda p, x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    mask = tree_lib.select(theta0, sel)
    items = tree_lib.flatten_with_paths(theta0)
    flags = jax.tree_util.tree_leaves(mask)
    for (p, x), m in zip(items, flags):
      if m and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"intrinsic_said: leaf '{p}' has dtype {x.dtype}; only floating-point "
                        f"leaves can move (shape {tuple(x.shape)})")
    return items, flags

  def _z_size(m: int) -> int:
    if not said:
      return d
    if d <= m:
      raise ValueError(f"intrinsic_said: d={d} must exceed the number of selected tensors m={m} "
                       f"(SAID spends m of the d dimensions on the per-tensor scales)")
    return d - m

  def init(key, theta0):
    del key  # z = 0, λ = 1: nothing random to draw; the projection comes from `seed`
    _, flags = _selected(theta0)
    m = sum(flags)
    phi = {"z": jnp.zeros((_z_size(m),), dtype)}
    if said:
      phi["lam"] = jnp.ones((m,), dtype)
    return phi

  def _deltas(theta0, phi):
    items, flags = _selected(theta0)
    m = sum(flags)
    z = phi["z"]
    if z.shape != (_z_size(m),):
      raise ValueError(f"intrinsic_said: phi['z'] has shape {z.shape}, expected ({_z_size(m)},) "
                       f"for d={d} and {m} selected tensors")
    root = jax.random.key(seed)
    out, i = [], 0
    for (path, w), sel in zip(items, flags):
      if not sel:
        out.append(None)
        continue
      size = int(math.prod(w.shape))
      params = fastfood_params(jax.random.fold_in(root, i), size, dtype)
      delta = fastfood(z, params, size)
      if said:
        delta = phi["lam"][i] * delta
      out.append(delta.reshape(w.shape))
      i += 1
    return items, out

  def apply(theta0, phi, rng: Optional[jax.Array] = None):
    items, deltas = _deltas(theta0, phi)
    treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
    new = [w if dl is None else (lazy.materialize(w).astype(jnp.float32) + dl.astype(jnp.float32)
                                 ).astype(w.dtype)
           for (_, w), dl in zip(items, deltas)]
    return jax.tree_util.tree_unflatten(treedef, new)

  def init_with_base(key, theta0):
    return theta0, init(key, theta0)

  def unmerge(theta, phi):
    items, deltas = _deltas(theta, phi)
    treedef = jax.tree_util.tree_structure(theta, is_leaf=lazy.is_lazy)
    new = [w if dl is None else (w.astype(jnp.float32) - dl.astype(jnp.float32)).astype(w.dtype)
           for (_, w), dl in zip(items, deltas)]
    return jax.tree_util.tree_unflatten(treedef, new)

  return Reparam(init=init, apply=apply, init_with_base=init_with_base, unmerge=unmerge)
