"""Combining LoRA adapters: composition, weighted merging and SVD extraction.

Three tools:

* :func:`stack` composes several adapters on one base with :func:`~lowrank_jax.chain`
  (``W = W0 + Σ_i s_i a_i b_i``, every adapter kept separate and trainable).
* :func:`add_weighted_adapter` merges adapters into one, like peft's
  ``LoraModel.add_weighted_adapter`` (combination types ``cat``, ``linear``, ``svd``,
  ``ties``, ``ties_svd``, ``dare_linear``, ``dare_ties``, ``dare_linear_svd``,
  ``dare_ties_svd``, ``magnitude_prune``, ``magnitude_prune_svd``), built on the
  task-vector merges :func:`task_arithmetic`, :func:`ties`, :func:`dare_linear`,
  :func:`dare_ties` and :func:`magnitude_prune` (Yadav et al., "TIES-Merging",
  arXiv 2306.01708; Yu et al., "Language Models are Super Mario" (DARE), arXiv 2311.03099).
* :func:`extract_lora` turns a dense fine-tuned weight into rank-``r`` LoRA factors by
  truncated SVD of ``ΔW = W_ft - W0`` (Eckart-Young: the best rank-``r`` approximation in
  Frobenius and spectral norm).

LoRA ``phi`` leaves are ``{"a": [in, r], "b": [r, out]}`` (Flax layout) and adapter ``i``
contributes ``ΔW_i = s_i a_i b_i``. A merged adapter has ``alpha = rank`` (scale 1), as
in peft.

Two modes of :func:`add_weighted_adapter`:

* ``peft_compatible=True`` reproduces peft 0.21.2 bit-for-bit (up to float rounding),
  including its approximations: ``linear``, ``ties``, ``dare_*`` and ``magnitude_prune``
  act on the factors ``A`` and ``B`` *separately*, with weights ``sign(w_i s_i) √|w_i s_i|``
  on A and ``√|w_i s_i|`` on B. For ``linear`` this gives
  ``(Σ_i c_i b_i)(Σ_j c_j a_j) ≠ Σ_i w_i ΔW_i``: the cross terms ``a_i b_j`` (peft#3004).
  Pruning or sign election on the factors is not pruning of the update either.
* the default (``peft_compatible=False``) does the mathematically stated operation on
  the updates ``ΔW_i``: ``linear`` returns the exact ``Σ w_i ΔW_i`` as concatenated
  factors (rank ``Σ r_i``, or truncated by SVD to ``svd_rank`` if given); ``ties``,
  ``dare_*`` and ``magnitude_prune`` prune/elect on the dense ``ΔW_i`` and refactor the
  (generally full-rank) result by truncated SVD to ``svd_rank`` or ``max r_i`` (so
  ``ties`` equals ``ties_svd``). ``cat`` and the ``*_svd`` types are the same in both
  modes (peft 0.21.2 no longer double-scales the SVD path).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods.lora import lora, lora_scale
from lowrank_jax.reparam import MatrixView, Reparam, chain

__all__ = [
  "COMBINATIONS",
  "MergedAdapter",
  "add_weighted_adapter",
  "stack",
  "extract_lora",
  "adapter_mask",
  "task_arithmetic",
  "magnitude_prune_tensor",
  "random_prune_tensor",
  "majority_sign_mask",
  "disjoint_merge",
  "ties",
  "dare_linear",
  "dare_ties",
  "magnitude_prune",
  "combine_tensors",
]

PyTree = Any
COMBINATIONS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
_EQUAL_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                  "magnitude_prune", "magnitude_prune_svd")


# ----------------------------------------------------------------------------------------
# Task-vector merges on dense tensors (the math of peft's merge_utils, in JAX).


def _stack_weights(tensors: Sequence[jax.Array], weights) -> tuple[jax.Array, jax.Array]:
  t = jnp.stack([jnp.asarray(x) for x in tensors])
  w = jnp.asarray(weights, t.dtype).reshape((-1,) + (1,) * (t.ndim - 1))
  return t, w


def task_arithmetic(tensors: Sequence[jax.Array], weights) -> jax.Array:
  """``Σ_i w_i T_i``."""
  t, w = _stack_weights(tensors, weights)
  return jnp.sum(t * w, axis=0)


def magnitude_prune_tensor(t: jax.Array, density: float) -> jax.Array:
  """Keeps the ``int(density · numel)`` entries of largest magnitude, zeroes the rest.

  ``density >= 1`` keeps everything (as peft, which only warns).
  """
  if density >= 1:
    return t
  if density < 0:
    raise ValueError(f"density must be >= 0, got {density}")
  k = int(density * t.size)
  flat = t.reshape(-1)
  if k == 0:
    return jnp.zeros_like(t)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  mask = jnp.zeros(flat.shape, bool).at[idx].set(True)
  return jnp.where(mask, flat, 0).reshape(t.shape)


def random_prune_tensor(key: jax.Array, t: jax.Array, density: float, rescale: bool = True) -> jax.Array:
  """DARE: keeps each entry with probability ``density``, rescaled by ``1/density``."""
  if density >= 1:
    return t
  if density < 0:
    raise ValueError(f"density must be >= 0, got {density}")
  keep = jax.random.bernoulli(key, density, t.shape)
  out = jnp.where(keep, t, 0)
  return out / density if rescale and density > 0 else out


def majority_sign_mask(stacked: jax.Array, method: Literal["total", "frequency"] = "total") -> jax.Array:
  """TIES sign election over axis 0: ``sign(T_i) == sign(Σ T_i)`` (``"total"``) or the
  sign of ``Σ sign(T_i)`` (``"frequency"``); a zero sum elects ``+``."""
  sign = jnp.sign(stacked)
  if method == "total":
    mag = jnp.sum(stacked, axis=0)
  elif method == "frequency":
    mag = jnp.sum(sign, axis=0)
  else:
    raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
  return sign == jnp.where(mag >= 0, 1, -1).astype(sign.dtype)


def disjoint_merge(stacked: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over axis 0 of the entries that agree with the elected sign."""
  total = jnp.sum(stacked * mask, axis=0)
  count = jnp.sum(mask, axis=0).astype(stacked.dtype)
  return total / jnp.maximum(count, 1.0)


def ties(tensors: Sequence[jax.Array], weights, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> jax.Array:
  """TIES: magnitude-prune each ``T_i``, elect signs (on the unweighted pruned tensors,
  as peft), then the disjoint mean of ``w_i T_i``."""
  pruned = [magnitude_prune_tensor(jnp.asarray(x), density) for x in tensors]
  t, w = _stack_weights(pruned, weights)
  return disjoint_merge(t * w, majority_sign_mask(t, majority_sign_method))


def dare_linear(key: jax.Array, tensors: Sequence[jax.Array], weights, density: float) -> jax.Array:
  """DARE: random-prune and rescale each ``T_i``, then ``Σ w_i T_i``."""
  keys = jax.random.split(key, len(tensors))
  pruned = [random_prune_tensor(k, jnp.asarray(x), density) for k, x in zip(keys, tensors)]
  return task_arithmetic(pruned, weights)


def dare_ties(key: jax.Array, tensors: Sequence[jax.Array], weights, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> jax.Array:
  """DARE pruning followed by TIES sign election and disjoint merge."""
  keys = jax.random.split(key, len(tensors))
  pruned = [random_prune_tensor(k, jnp.asarray(x), density) for k, x in zip(keys, tensors)]
  t, w = _stack_weights(pruned, weights)
  return disjoint_merge(t * w, majority_sign_mask(t, majority_sign_method))


def magnitude_prune(tensors: Sequence[jax.Array], weights, density: float) -> jax.Array:
  """Magnitude-prune each ``T_i``, then ``Σ w_i T_i``."""
  return task_arithmetic([magnitude_prune_tensor(jnp.asarray(x), density) for x in tensors], weights)


def combine_tensors(combination: str, tensors: Sequence[jax.Array], weights, *,
                    density: Optional[float] = None, majority_sign_method="total",
                    key: Optional[jax.Array] = None) -> jax.Array:
  """Dispatches a task-vector merge by name (the base name, without ``_svd``)."""
  base = combination[:-4] if combination.endswith("_svd") else combination
  if base in ("linear", "svd"):
    return task_arithmetic(tensors, weights)
  if base == "ties":
    return ties(tensors, weights, density, majority_sign_method)
  if base == "magnitude_prune":
    return magnitude_prune(tensors, weights, density)
  if base in ("dare_linear", "dare_ties"):
    if key is None:
      raise ValueError(f"combination {combination!r} is random: pass key=jax.random.key(...)")
    if base == "dare_linear":
      return dare_linear(key, tensors, weights, density)
    return dare_ties(key, tensors, weights, density, majority_sign_method)
  raise ValueError(f"unknown combination {combination!r}; expected one of {COMBINATIONS}")


# ----------------------------------------------------------------------------------------
# LoRA adapters.


def _is_lora_leaf(x) -> bool:
  return isinstance(x, dict) and "a" in x and "b" in x


def _is_hole_or_lora(x) -> bool:
  return x is None or _is_lora_leaf(x)


def adapter_mask(phi: PyTree) -> PyTree:
  """Boolean mask (the ``where=`` of the base tree) of the leaves ``phi`` adapts."""
  return jax.tree.map(lambda x: x is not None, phi, is_leaf=_is_hole_or_lora)


class MergedAdapter(NamedTuple):
  """A merged LoRA adapter: ``phi`` with ``rank`` and ``alpha = rank`` (scale 1)."""
  phi: PyTree
  rank: int
  alpha: float

  def reparam(self) -> Reparam:
    """The LoRA :class:`Reparam` that applies ``phi`` (``where`` = the adapted leaves)."""
    return lora(adapter_mask(self.phi), rank=self.rank, alpha=self.alpha)


def _svd_factors(delta_torch: jax.Array, rank: int, clamp: Optional[float]):
  """peft's refactoring of a torch-layout ``[out, in]`` update: ``B = U_r S_r``, ``A = Vh_r``.

  Returns Flax-layout ``(a [in, r], b [r, out])``.
  """
  u, s, vh = jnp.linalg.svd(delta_torch.astype(jnp.float32), full_matrices=False)
  u = u[:, :rank] * s[None, :rank]
  vh = vh[:rank]
  if clamp is not None:
    hi = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
    u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
  return vh.T, u.T


def _pad_rank(a, b, rank):
  r = a.shape[1]
  if r == rank:
    return a, b
  return (jnp.pad(a, ((0, 0), (0, rank - r))), jnp.pad(b, ((0, rank - r), (0, 0))))


def add_weighted_adapter(phis: Sequence[PyTree], weights: Sequence[float], scales: Sequence[float],
                         combination: str = "svd", *, svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, density: Optional[float] = None,
                         majority_sign_method: Literal["total", "frequency"] = "total",
                         key: Optional[jax.Array] = None,
                         peft_compatible: bool = False) -> MergedAdapter:
  """Merges LoRA adapters into one (peft's ``add_weighted_adapter``).

  Args:
    phis: LoRA parameter trees of the same base (``None`` where an adapter does not
      touch a leaf; such adapters are skipped there, as in peft).
    weights: one weight per adapter (may be negative).
    scales: each adapter's LoRA scale ``s_i`` (``alpha_i / r_i``, see :func:`lora_scale`).
    combination: one of :data:`COMBINATIONS`; with a single adapter peft forces
      ``"linear"`` (so do we in ``peft_compatible`` mode).
    svd_rank: rank of the SVD-based results (default ``max r_i``).
    svd_clamp: quantile for clamping the SVD factors (peft's ``svd_clamp``).
    density: fraction kept by the ``ties``/``dare``/``magnitude_prune`` types.
    majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
    key: PRNG key for the ``dare_*`` types.
    peft_compatible: reproduce peft's factor-wise approximations (see module docstring).

  Returns:
    A :class:`MergedAdapter` ``(phi, rank, alpha=rank)``; ``.reparam()`` applies it.
  """
  if not (len(phis) == len(weights) == len(scales)) or not phis:
    raise ValueError(f"need as many weights ({len(weights)}) and scales ({len(scales)}) as "
                     f"adapters ({len(phis)}), and at least one adapter")
  if combination not in COMBINATIONS:
    raise ValueError(f"unknown combination {combination!r}; expected one of {COMBINATIONS}")
  if peft_compatible and len(phis) == 1:
    combination = "linear"
  if combination in _NEEDS_DENSITY and density is None:
    raise ValueError(f"combination {combination!r} needs density=")
  treedef = jax.tree_util.tree_structure(phis[0], is_leaf=_is_hole_or_lora)
  columns = [treedef.flatten_up_to(p) for p in phis]
  paths = [p for p, _ in tree_lib.flatten_with_paths(jax.tree.map(
      lambda x: 0, phis[0], is_leaf=_is_hole_or_lora))]
  for col in columns:
    for path, l in zip(paths, col):
      if l is not None and set(l) != {"a", "b"}:
        raise ValueError(f"add_weighted_adapter merges plain LoRA leaves {{'a', 'b'}}; leaf '{path}' has "
                         f"keys {sorted(l)} (DoRA's magnitude or AdaLoRA's e cannot be merged this way)")
  ranks = sorted({int(l["a"].shape[1]) for col in columns for l in col if l is not None})
  if not ranks:
    raise ValueError("add_weighted_adapter: the adapters hold no LoRA leaf ({'a', 'b'} dicts)")
  exact_linear = combination == "linear" and not peft_compatible
  if combination in _EQUAL_RANK and peft_compatible and len(ranks) != 1:
    raise ValueError(f"combination {combination!r} needs adapters of equal rank, got ranks {ranks}")
  if combination == "cat" or (exact_linear and svd_rank is None):
    new_rank = None  # sum of the ranks present, fixed below from the first adapted leaf
  elif combination.endswith("svd") or not peft_compatible:
    new_rank = svd_rank or max(ranks)
  else:
    new_rank = ranks[0]
  keys = (jax.random.split(key, len(columns[0])) if key is not None else [None] * len(columns[0]))

  out = []
  for j, path in enumerate(paths):
    present = [(col[j], w, s) for col, w, s in zip(columns, weights, scales) if col[j] is not None]
    if not present:
      out.append(None)
      continue
    if combination == "cat" or (exact_linear and svd_rank is None):
      a = jnp.concatenate([l["a"] * (w * s) for l, w, s in present], axis=1)
      b = jnp.concatenate([l["b"] for l, _, _ in present], axis=0)
      total = sum(int(l["a"].shape[1]) for col in columns for l in [col[j]] if l is not None)
      new_rank = new_rank or total
      if total != new_rank:
        raise ValueError(f"'cat' merge: leaf '{path}' has total rank {total} but another leaf "
                         f"{new_rank}; one LoRA rank per merged adapter is required")
      out.append({"a": a, "b": b})
      continue
    if peft_compatible and not combination.endswith("svd"):
      c = [w * s for _, w, s in present]
      wa = [float(np.sign(x) if x != 0 else 1.0) * float(np.sqrt(abs(x))) for x in c]
      wb = [float(np.sqrt(abs(x))) for x in c]
      ka, kb = (jax.random.split(keys[j]) if keys[j] is not None else (None, None))
      a = combine_tensors(combination, [l["a"] for l, _, _ in present], wa, density=density,
                          majority_sign_method=majority_sign_method, key=ka)
      b = combine_tensors(combination, [l["b"] for l, _, _ in present], wb, density=density,
                          majority_sign_method=majority_sign_method, key=kb)
      out.append({"a": a.astype(present[0][0]["a"].dtype), "b": b.astype(present[0][0]["b"].dtype)})
      continue
    # update-space merges, refactored by truncated SVD (torch layout [out, in], as peft)
    deltas = [(s * (l["a"] @ l["b"])).T for l, _, s in present]
    merged = combine_tensors(combination, deltas, [w for _, w, _ in present], density=density,
                             majority_sign_method=majority_sign_method, key=keys[j])
    a, b = _svd_factors(merged, new_rank, svd_clamp)
    a, b = _pad_rank(a, b, new_rank)
    out.append({"a": a.astype(present[0][0]["a"].dtype), "b": b.astype(present[0][0]["b"].dtype)})
  return MergedAdapter(phi=jax.tree_util.tree_unflatten(treedef, out), rank=int(new_rank),
                       alpha=float(new_rank))


def stack(*adapters: tuple[Reparam, PyTree]) -> tuple[Reparam, tuple]:
  """Composes ``(reparam, phi)`` pairs on one base: ``W = W0 + Σ_i ΔW_i`` for LoRA.

  Each adapter stays separate (and trainable); :func:`lowrank_jax.merge` of the result
  equals the ``cat`` merge with unit weights.

  Returns:
    ``(chain(*reparams), (phi_1, ..., phi_n))``.
  """
  if not adapters:
    raise ValueError("stack needs at least one (reparam, phi) pair")
  return chain(*[r for r, _ in adapters]), tuple(p for _, p in adapters)


def extract_lora(theta_ft: PyTree, theta0: PyTree, rank: int, *,
                 where: tree_lib.Where = lambda p, x: getattr(x, "ndim", 0) == 2,
                 alpha: Optional[float] = None, rslora: bool = False,
                 in_ndim: Optional[int] = None) -> tuple[Reparam, PyTree]:
  """Rank-``r`` LoRA factors of ``ΔW = W_ft - W0`` by truncated SVD.

  With ``ΔW = U S Vᵀ`` (matrix view ``[in, out]``), ``a = U_r √S_r / √s`` and
  ``b = √S_r V_rᵀ / √s`` so that ``s a b = U_r S_r V_rᵀ``, the best rank-``r``
  approximation of ``ΔW`` (Eckart-Young); the error is ``√(Σ_{k>r} σ_k²)``.

  Args:
    theta_ft: fine-tuned weights (same structure as ``theta0``; lazy leaves are materialised).
    theta0: base weights.
    rank: the LoRA rank.
    where: leaves to extract (default: every 2-d leaf).
    alpha, rslora: the LoRA scale of the returned reparam (default ``s = 1``).
    in_ndim: leading input axes of N-d weights.

  Returns:
    ``(reparam, phi)`` with ``lj.merge(reparam, theta0, phi) ≈ theta_ft`` on the
    selected leaves.
  """
  reparam = lora(where, rank=rank, alpha=alpha, rslora=rslora, in_ndim=in_ndim)
  scale = lora_scale(rank, alpha, rslora)
  mask = tree_lib.select(theta0, where)

  def one(path, w0, wft):
    view = MatrixView(tuple(w0.shape), in_ndim or 1)
    if rank > min(view.d_in, view.d_out):
      raise ValueError(f"extract_lora: rank {rank} exceeds min(d_in, d_out) of leaf '{path}' "
                       f"of shape {tuple(w0.shape)}")
    if tuple(wft.shape) != tuple(w0.shape):
      raise ValueError(f"extract_lora: leaf '{path}' has shape {tuple(wft.shape)} in theta_ft but "
                       f"{tuple(w0.shape)} in theta0")
    delta = view.to_matrix(lazy.materialize(wft).astype(jnp.float32)
                           - lazy.materialize(w0).astype(jnp.float32))
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    root = jnp.sqrt(s[:rank] / scale)
    return {"a": u[:, :rank] * root[None, :], "b": root[:, None] * vt[:rank]}

  items0 = tree_lib.flatten_with_paths(theta0)
  itemsf = tree_lib.flatten_with_paths(theta_ft)
  if [p for p, _ in items0] != [p for p, _ in itemsf]:
    raise ValueError("extract_lora: theta_ft and theta0 have different structures")
  flags = jax.tree_util.tree_leaves(mask)
  out = [one(p, w0, wf) if m else None for (p, w0), (_, wf), m in zip(items0, itemsf, flags)]
  treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
  return reparam, jax.tree_util.tree_unflatten(treedef, out)
