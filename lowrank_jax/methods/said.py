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
``O(D)`` memory; the dense ``D × d`` matrix is never formed. The reparam is
:func:`~lowrank_jax.adapt` of :func:`said_method`, whose parameters are all shared across
the leaves (``phi = {"z", "lam"}``). The random ``B, Π, G`` are regenerated inside
``apply`` (the method's ``prepare``) from the static ``seed`` (nothing extra stored in ``phi``
or the optimizer state) by a counter-based hash of the entry index, elementwise and
``O(D)``: ``Π`` is a keyed pseudo-random bijection of ``[0, L)`` (four rounds of
add-multiply-xorshift on ``log2 L`` bits), not a uniformly drawn permutation, which would
need an ``O(L log L)`` sort every step (far slower; bench/README.md, ``methods``).
A step still needs the dense gradient of every moved tensor (the backward pass of full
fine-tuning) plus the transforms, so it costs more than a full fine-tuning step
(``python -m bench.methods --methods lora,intrinsic_said,full``; figures in bench/README.md).

Differences from the reference code:

* JAX differentiates the FWHT exactly (``Hᵀ = H``); the reference's custom backward
  multiplies by ``1/√L`` instead, so its ``z`` gradients are ``1/L`` of the true ones.
* The reference reduces the intrinsic dimension by ``m + 1`` for SAID; we use the
  paper's ``d - m``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.reparam import LeafMethod, Reparam, adapt

__all__ = ["fwht", "FastfoodParams", "fastfood_params", "fastfood", "intrinsic_said", "said_method"]


_FWHT_RADIX = 5  # butterflies of 2^5 = 32 points as small GEMMs (faster than radix 2, bench/README.md)


def _sylvester(m: int, dtype) -> jax.Array:
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < m:
    h = np.block([[h, h], [h, -h]])
  return jnp.asarray(h, dtype)


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalised fast Walsh-Hadamard transform over the last axis: ``x @ H_L``.

  ``L = x.shape[-1]`` must be a power of two; ``H`` is Sylvester-ordered
  (``H_2n = [[H_n, H_n], [H_n, -H_n]]``, as ``scipy.linalg.hadamard``). ``O(L log L)``:
  as ``H_L = H_{m_1} ⊗ ... ⊗ H_{m_k}`` with ``m_i <= 32``, the last axis is viewed as
  ``[m_1, ..., m_k]`` and each factor is one small matmul (``L · Σ m_i`` multiply-adds in
  ``⌈log2 L / 5⌉`` passes over memory instead of ``log2 L`` butterfly passes), at full
  float32 precision on every backend.
  """
  n = x.shape[-1]
  if n < 1 or n & (n - 1):
    raise ValueError(f"fwht needs a power-of-two length, got {n} (shape {x.shape})")
  lead = x.shape[:-1]
  k, ms = n.bit_length() - 1, []
  while k > 0:
    c = min(_FWHT_RADIX, k)
    ms.append(1 << c)
    k -= c
  y = x.reshape((-1,) + tuple(ms))
  for i, m in enumerate(ms):
    y = jnp.tensordot(y, _sylvester(m, x.dtype), axes=[[1 + i], [0]],
                      precision=jax.lax.Precision.HIGHEST)
    y = jnp.moveaxis(y, -1, 1 + i)
  return y.reshape(lead + (n,))


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


def _hash32(x: jax.Array) -> jax.Array:
  """``lowbias32`` integer finaliser (C. Wellons): a bijection of uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _normal_from_bits(bits: jax.Array) -> jax.Array:
  """``Φ⁻¹(u)`` of ``u = (k + ½) / 2²³`` with ``k`` the top 23 bits: ``u`` is exact in
  float32 and inside ``(0, 1)`` (24 bits would round ``1 - 2⁻²⁵`` up to 1: an infinite ``g``)."""
  u = ((bits >> 9).astype(jnp.float32) + 0.5) * (2.0 ** -23)
  return jax.scipy.special.ndtri(u)


def _index(n: int) -> jax.Array:
  """``arange(n)`` as uint32 behind a barrier, so that XLA does not constant-fold the
  hashes of it at compile time (slow for millions of entries)."""
  return jax.lax.optimization_barrier(jnp.arange(n, dtype=jnp.uint32))


def _keyed_permutation(words: jax.Array, n: int) -> jax.Array:
  """A keyed bijection of ``[0, n)``, ``n = 2^k``: rounds of ``x ← ((x + c) · (a | 1)) mod n``,
  ``x ← x ⊕ (x >> ⌈k/2⌉)``, each invertible on ``k`` bits. ``words``: 2 uint32 per round."""
  k = n.bit_length() - 1
  x = _index(n)
  if k == 0:
    return x.astype(jnp.int32)
  mask, shift = jnp.uint32(n - 1), (k + 1) // 2
  for r in range(words.shape[0] // 2):
    x = ((x + words[2 * r]) * (words[2 * r + 1] | jnp.uint32(1))) & mask
    x = x ^ (x >> shift)
  return x.astype(jnp.int32)


def fastfood_params(key: jax.Array, d_out: int, dtype=jnp.float32) -> FastfoodParams:
  """Draws ``B, Π, G`` for a Fastfood transform to ``d_out`` entries.

  Only 10 words are drawn from ``key``; the ``L``-long diagonals are a counter-based hash
  of the index under those words (``O(L)`` elementwise work, no sort): ``b_j`` is the sign
  of one hash, ``g_j = Φ⁻¹(u_j)`` of a 23-bit uniform from another, ``Π`` a keyed bijection.
  """
  if d_out < 1:
    raise ValueError(f"fastfood: output size must be >= 1, got {d_out}")
  n = _padded_size(d_out)
  words = jax.random.bits(key, (10,), jnp.uint32)
  h = _hash32(_index(n))
  b = jnp.where(_hash32(h ^ words[0]) >> 31 == 1, 1.0, -1.0).astype(dtype)
  g = _normal_from_bits(_hash32(h ^ words[1])).astype(dtype)
  perm = _keyed_permutation(words[2:], n)
  divisor = jnp.sqrt(n * jnp.sum(g.astype(jnp.float32) ** 2)) * math.sqrt(d_out / n)
  return FastfoodParams(b=b, perm=perm, g=g, divisor=divisor.astype(dtype))


def fastfood(z: jax.Array, params: FastfoodParams, d_out: int) -> jax.Array:
  """``P(z) = (H G Π H B pad(z))[:d_out] / divisor`` for a vector ``z``.

  ``params`` may carry leading batch axes (``b, perm, g: [..., L]``, ``divisor: [...]``):
  one ``z`` then goes through every transform of the batch at once (``[..., d_out]``).
  """
  n = params.b.shape[-1]
  d = z.shape[0]
  v = jnp.pad(z, (0, n - d)) if d < n else z[:n]
  v = fwht(v.astype(params.g.dtype) * params.b)
  v = fwht(jnp.take_along_axis(v, params.perm, axis=-1) * params.g)
  return v[..., :d_out] / jnp.expand_dims(params.divisor, -1)


def _is_float(path: str, x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def said_method(d: int, *, said: bool = True, seed: int = 0, dtype=jnp.float32) -> LeafMethod:
  """SAID / DID as a :class:`~lowrank_jax.LeafMethod` with shared parameters only.

  ``init_shared`` draws ``phi = {"z": [d - m], "lam": [m]}`` for the ``m`` selected leaves
  (``λ_i`` is leaf ``i``'s in tree order: SAID's per-tensor scales live in the shared entry,
  one vector, as in the reference code); ``prepare`` computes every ``λ_i P_i(z)`` at once,
  the transforms of one padded size in one ``lax.map``; ``apply_leaf`` adds the leaf's.
  """
  if not isinstance(d, int) or d < 1:
    raise ValueError(f"intrinsic dimension d must be a positive int, got {d!r}")

  def _z_size(m: int) -> int:
    if not said:
      return d
    if d <= m:
      raise ValueError(f"intrinsic_said: d={d} must exceed the number of selected tensors m={m} "
                       f"(SAID spends m of the d dimensions on the per-tensor scales)")
    return d - m

  def init_shared(key, views):
    del key  # z = 0, λ = 1: nothing random to draw; the projection comes from `seed`
    m = len(views)
    phi = {"z": jnp.zeros((_z_size(m),), dtype)}
    if said:
      phi["lam"] = jnp.ones((m,), dtype)
    return phi

  def prepare(phi, views):
    m = len(views)
    z = phi["z"]
    if z.shape != (_z_size(m),):
      raise ValueError(f"intrinsic_said: phi['z'] has shape {z.shape}, expected ({_z_size(m)},) "
                       f"for d={d} and {m} selected tensors")
    # Transforms of one padded size L run in one lax.map over their keys (one FWHT pair
    # in the program per distinct L however many tensors move; each row stays in cache;
    # the backward recomputes a row's diagonals instead of storing [m, L] of them).
    # Tensor i keeps the key fold_in(seed, i) and its own divisor √(L Σ g²) · √(D_i / L).
    # The barrier keeps XLA from constant-folding the hashed diagonals at compile time.
    root = jax.random.wrap_key_data(jax.lax.optimization_barrier(
        jax.random.key_data(jax.random.key(seed))))
    groups: dict = {}
    for i, (path, view) in enumerate(views.items()):
      size = int(math.prod(view.shape))
      groups.setdefault(_padded_size(size), []).append((i, path, size))
    out = {}
    for n, members in groups.items():
      keys = jnp.stack([jax.random.fold_in(root, i) for i, _, _ in members])
      row = jax.checkpoint(lambda key, n=n: fastfood(z, fastfood_params(key, n, dtype), n))
      full = jax.lax.map(row, keys)  # [members, L], each divided by √(L Σ g²)
      for r, (i, path, size) in enumerate(members):
        delta = full[r, :size] * math.sqrt(n / size)
        if said:
          delta = phi["lam"][i] * delta
        out[path] = delta.reshape(views[path].shape)
    return out

  def apply_leaf(w, phi_leaf, view, rng, delta):
    return (lazy.materialize(w).astype(jnp.float32) + delta.astype(jnp.float32)).astype(w.dtype)

  def unmerge_leaf(w, phi_leaf, view, delta):
    return (w.astype(jnp.float32) - delta.astype(jnp.float32)).astype(w.dtype)

  return LeafMethod(name="intrinsic_said", init_leaf=None, apply_leaf=apply_leaf,
                    unmerge_leaf=unmerge_leaf, needs_matrix=False, init_shared=init_shared,
                    prepare=prepare)


@configured("intrinsic_said")
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
    A :class:`Reparam` (``adapt(said_method(...), where)``) with ``phi = {"z": [d - m],
    "lam": [m]}`` (``"lam"`` only with ``said``), ``z = 0`` and ``λ = 1`` at
    initialisation so ``apply(θ0, phi) = θ0``.
  """
  return adapt(said_method(d, said=said, seed=seed, dtype=dtype), _is_float if where is None else where)
