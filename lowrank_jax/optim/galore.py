"""GaLore: gradient low-rank projection as an optax wrapper.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507. For a selected matrix gradient ``G`` (``m x n``)
a projector is taken from the SVD ``G = U S V^T`` every ``update_proj_gap`` steps
(steps ``0, T, 2T, ...``, inside ``jit`` with ``lax.cond``):

* left projection:  ``P = U[:, :r]`` (``m x r``),  ``R = P^T G`` (``r x n``),
  back: ``scale * P N``;
* right projection: ``Q = V^T[:r]`` (``r x n``),   ``R = G Q^T`` (``m x r``),
  back: ``scale * N Q``;

where ``N = inner(R)`` is the inner transformation's (e.g. Adam's) output on the
low-rank gradient. The inner state (Adam's moments) lives in the ``r``-dim space
and is *kept* across projector refreshes, as in galore-torch. ``proj_type``
chooses the side as galore-torch does: ``"std"`` right if ``m >= n`` else left
(the projector is the smaller factor), ``"reverse_std"`` the opposite (the
moments are the smaller factor: least state for rectangular matrices; this is
the side ``optax.contrib.galore`` always uses), ``"left"``/``"right"`` fixed.

Differences from ``optax.contrib.galore`` (both are optax wrappers):

* ``galore_adamw(..., compat="galore_torch")`` reproduces ``galore_torch.GaLoreAdamW``
  step for step (its eps placement ``m / (sqrt(v) + eps) * sqrt(1-b2^t)/(1-b1^t)``
  and weight decay applied to the already-updated parameter);
* the projector can be stored in bfloat16 (default of :func:`galore_adamw`):
  at rank ``d/4`` on a square ``d x d`` matrix the state is
  ``2 (d r) * 4 + (d r) * 2`` bytes = 31% of AdamW's ``2 d^2 * 4`` (37.5% with an
  fp32 projector);
* any inner transformation, including 8-bit Adam (:func:`lowrank_jax.optim.adam8bit`);
* leaves chosen by path (``where=``, the core selection) and N-d weights seen as
  matrices with ``in_ndim`` (:class:`lowrank_jax.MatrixView`);
* ``svd="randomized"``: a randomized range finder (Halko et al. 2011, as GaLore 2,
  arXiv 2504.20437) replaces the full SVD on refresh steps; it is made of matmuls
  and small ``(r+p) x (r+p)`` eigendecompositions, much cheaper than a full SVD;
* works under ``jax.jit`` with sharded gradients and parameters (GSPMD places the
  SVD), and per layer with :func:`lowrank_jax.optim.leafwise` / ``map_layers``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.optim.adam8bit import scale_by_adam_8bit
from lowrank_jax.reparam import MatrixView

PyTree = Any
ProjType = Literal["std", "reverse_std", "left", "right"]

__all__ = [
  "GaLoreState",
  "ScaleByAdamHFState",
  "scale_by_galore",
  "scale_by_adam_hf",
  "decay_after_update",
  "galore_adamw",
  "galore_state_bytes",
  "projection_side",
]


class GaLoreState(NamedTuple):
  """``count``: steps taken; ``projector``: per selected leaf ``U_r`` (left,
  ``[m, r]``) or ``V^T_r`` (right, ``[r, n]``), ``None`` elsewhere;
  ``inner_state``: the inner transformation's state on the projected tree."""
  count: jax.Array
  projector: PyTree
  inner_state: optax.OptState


def projection_side(m: int, n: int, proj_type: ProjType) -> str:
  """``"left"`` or ``"right"`` for an ``m x n`` gradient, as galore-torch decides."""
  if proj_type == "std":
    return "right" if m >= n else "left"
  if proj_type == "reverse_std":
    return "left" if m >= n else "right"
  if proj_type in ("left", "right"):
    return proj_type
  raise ValueError(f"unknown GaLore proj_type {proj_type!r}; expected std, reverse_std, left or right")


class _Spec(NamedTuple):
  path: str
  view: MatrixView
  side: str
  rank: int


def _leaf_specs(tree, where, in_ndim, rank, proj_type) -> list[Optional[_Spec]]:
  """One spec per leaf (``None`` for leaves that are passed through unprojected)."""
  items = tree_lib.flatten_with_paths(tree)
  if where is None:
    flags = [getattr(x, "ndim", 0) >= 2 and (in_ndim is not None or x.ndim == 2) for _, x in items]
  else:
    flags = jax.tree_util.tree_leaves(tree_lib.select(tree, where, allow_empty=False))
  specs = []
  for (path, x), m in zip(items, flags):
    if not m:
      specs.append(None)
      continue
    nd = in_ndim(path) if callable(in_ndim) else (1 if in_ndim is None else in_ndim)
    if not 0 < nd < x.ndim:
      raise ValueError(f"GaLore: leaf '{path}' of shape {tuple(x.shape)} is not a matrix; "
                       f"pass in_ndim= (leading input axes) for N-d weights or leave it out of where=")
    view = MatrixView(tuple(x.shape), nd)
    side = projection_side(view.d_in, view.d_out, proj_type)
    specs.append(_Spec(path, view, side, min(rank, view.d_in, view.d_out)))
  return specs


def _low_shape(spec: _Spec) -> tuple[int, int]:
  m, n = spec.view.d_in, spec.view.d_out
  return (spec.rank, n) if spec.side == "left" else (m, spec.rank)


def _proj_shape(spec: _Spec) -> tuple[int, int]:
  m, n = spec.view.d_in, spec.view.d_out
  return (m, spec.rank) if spec.side == "left" else (spec.rank, n)


def _orthonormalize(a: jax.Array) -> jax.Array:
  """Orthonormal basis of the columns of ``a`` ``[m, l]`` via the ``l x l`` Gram matrix.

  ``a^T a = W diag(lam) W^T`` gives ``Q = a W diag(lam)^(-1/2)``; done twice (as in
  CholeskyQR2) for accuracy. Directions with ``lam`` below ``1e-12 max(lam)`` (a
  rank-deficient gradient) are dropped (zero columns). Only matmuls and a small
  ``eigh``, which every backend runs well; ``python -m bench.galore --orthonormalize``
  times it against ``jnp.linalg.qr`` (bench/README.md).
  """
  for _ in range(2):
    lam, w = jnp.linalg.eigh(a.T @ a)
    keep = lam > 1e-12 * jnp.max(lam)
    a = a @ (w * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0))
  return a


def _randomized_range(g: jax.Array, k: int, key, oversample: int, power_iters: int) -> jax.Array:
  """``[m, k]``: the dominant left singular vectors of ``g`` (randomized SVD).

  Halko, Martinsson, Tropp (2011), Alg. 4.4 (subspace iteration) then Alg. 5.1: the
  left singular vectors of the small ``(k+p) x n`` matrix ``B = Q^T g`` come from
  ``eigh(B B^T)``, and ``U_k = Q U_B[:, :k]``.
  """
  m, n = g.shape
  l = min(k + oversample, m, n)
  omega = jax.random.normal(key, (n, l), g.dtype)
  q = _orthonormalize(g @ omega)
  for _ in range(power_iters):
    z = _orthonormalize(g.T @ q)
    q = _orthonormalize(g @ z)
  b = q.T @ g
  _, ub = jnp.linalg.eigh(b @ b.T)  # ascending eigenvalues
  return q @ ub[:, ::-1][:, :k]


def _replicated(x: jax.Array) -> jax.Array:
  """``x`` resharded to replicated when it is sharded over an explicit mesh axis.

  LAPACK-style decompositions need whole matrices: under sharding-in-types
  (``AxisType.Explicit``) ``jnp.linalg.svd`` rejects a sharded operand, so the
  gradient is gathered for the refresh; under auto sharding GSPMD does it.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is not None and any(a is not None for a in spec):
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
  return x


def _projector(g2: jax.Array, spec: _Spec, svd, key, oversample: int, power_iters: int):
  g32 = _replicated(g2.astype(jnp.float32))
  r = spec.rank
  if callable(svd):
    return svd(spec.path, g32, spec.side, r, key)
  if svd == "full":
    u, _, vt = jnp.linalg.svd(g32, full_matrices=False)
    return u[:, :r] if spec.side == "left" else vt[:r]
  if svd == "randomized":
    if spec.side == "left":
      return _randomized_range(g32, r, key, oversample, power_iters)
    return _randomized_range(g32.T, r, key, oversample, power_iters).T
  raise ValueError(f"unknown GaLore svd {svd!r}; expected full or randomized")


def _project(g2, p, side):
  p = p.astype(g2.dtype)
  return p.T @ g2 if side == "left" else g2 @ p.T


def _project_back(n2, p, side):
  p = p.astype(n2.dtype)
  return p @ n2 if side == "left" else n2 @ p


def scale_by_galore(inner: Optional[optax.GradientTransformation] = None, *,
                    rank: int = 128, update_proj_gap: int = 200, scale: float = 1.0,
                    proj_type: ProjType = "std", where: tree_lib.Where = None,
                    in_ndim: Any = None, projector_dtype=None, svd: str = "full",
                    oversample: int = 8, power_iters: int = 2, seed: int = 0
                    ) -> optax.GradientTransformation:
  """Wraps ``inner`` so that it runs on low-rank projections of matrix gradients.

  Args:
    inner: the transformation applied in the projected space (and, unprojected, to
      the other leaves); default ``optax.scale_by_adam()``. It receives
      ``params=None`` (the projected tree has no parameter counterpart); put weight
      decay after this wrapper.
    rank: target rank ``r`` (clipped to ``min(m, n)`` per leaf).
    update_proj_gap: refresh the projector on steps ``0, T, 2T, ...``.
    scale: factor applied to the back-projected update (galore-torch ``scale``).
    proj_type: ``"std"``, ``"reverse_std"``, ``"left"`` or ``"right"`` (module doc).
    where: leaves to project (regex / list / predicate / mask, as
      :func:`lowrank_jax.select`); default every 2-D leaf (every N-d leaf with
      ``ndim >= 2`` when ``in_ndim`` is given).
    in_ndim: leading input axes of N-d leaves (int or ``path -> int``); default 1.
    projector_dtype: storage dtype of the projector (default: the gradient's);
      ``jnp.bfloat16`` halves it. Projections are computed in the gradient dtype.
    svd: ``"full"`` (exact, as galore-torch), ``"randomized"``, or a function
      ``(path, g, side, rank, key) -> projector`` returning ``U_r`` ``[m, r]`` for
      ``side == "left"`` or ``V^T_r`` ``[r, n]`` for ``"right"`` from the fp32 matrix
      gradient ``g`` (e.g. a quantised or sign-normalised SVD).
    oversample, power_iters, seed: randomized SVD parameters.

  Returns:
    An ``optax.GradientTransformation`` with :class:`GaLoreState`.
  """
  inner = optax.scale_by_adam() if inner is None else inner
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"GaLore rank must be a positive int, got {rank!r}")
  if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
    raise ValueError(f"GaLore update_proj_gap must be a positive int, got {update_proj_gap!r}")
  projection_side(2, 1, proj_type)  # validates proj_type
  if not callable(svd) and svd not in ("full", "randomized"):
    raise ValueError(f"unknown GaLore svd {svd!r}; expected full, randomized or a function")

  def specs_of(tree):
    return _leaf_specs(tree, where, in_ndim, rank, proj_type)

  def init(params):
    treedef = jax.tree_util.tree_structure(params, is_leaf=tree_lib.is_lazy_or_array)
    leaves = [x for _, x in tree_lib.flatten_with_paths(params)]
    specs = specs_of(params)
    projs, proxies = [], []
    for x, s in zip(leaves, specs):
      if s is None:
        projs.append(None)
        proxies.append(x)
      else:
        dt = projector_dtype or x.dtype
        projs.append(jnp.zeros(_proj_shape(s), dt))
        proxies.append(jax.ShapeDtypeStruct(_low_shape(s), x.dtype))
    proxies = jax.tree_util.tree_unflatten(treedef, proxies)
    inner_state = inner.init(jax.tree.map(
        lambda z: jnp.zeros(z.shape, z.dtype) if isinstance(z, jax.ShapeDtypeStruct) else z,
        proxies))
    return GaLoreState(jnp.zeros([], jnp.int32), jax.tree_util.tree_unflatten(treedef, projs),
                       inner_state)

  def update(updates, state: GaLoreState, params=None, **extra):
    del params, extra
    treedef = jax.tree_util.tree_structure(updates, is_leaf=tree_lib.is_lazy_or_array)
    leaves = [x for _, x in tree_lib.flatten_with_paths(updates)]
    specs = specs_of(updates)
    old_projs = treedef.flatten_up_to(state.projector)
    refresh = (state.count % update_proj_gap) == 0
    key = jax.random.fold_in(jax.random.PRNGKey(seed), state.count)
    low, projs = [], []
    for i, (g, s, p_old) in enumerate(zip(leaves, specs, old_projs)):
      if s is None:
        low.append(g)
        projs.append(None)
        continue
      g2 = s.view.to_matrix(g)
      k = jax.random.fold_in(key, i)
      p = jax.lax.cond(
          refresh,
          lambda g2=g2, s=s, k=k, p_old=p_old: _projector(
              g2, s, svd, k, oversample, power_iters).astype(p_old.dtype),
          lambda p_old=p_old: p_old)
      low.append(_project(g2, p, s.side))
      projs.append(p)
    low_tree = jax.tree_util.tree_unflatten(treedef, low)
    n_tree, inner_state = inner.update(low_tree, state.inner_state, None)
    n_leaves = treedef.flatten_up_to(n_tree)
    out = []
    for g, s, p, n in zip(leaves, specs, projs, n_leaves):
      if s is None:
        out.append(n)
      else:
        full = _project_back(n, p, s.side) * scale
        out.append(s.view.from_matrix(full).astype(g.dtype))
    return (jax.tree_util.tree_unflatten(treedef, out),
            GaLoreState(optax.safe_int32_increment(state.count),
                        jax.tree_util.tree_unflatten(treedef, projs), inner_state))

  return optax.GradientTransformation(init, update)


class ScaleByAdamHFState(NamedTuple):
  count: jax.Array
  mu: PyTree
  nu: PyTree


def scale_by_adam_hf(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                     correct_bias: bool = True) -> optax.GradientTransformation:
  """Adam normalisation as in HF ``transformers.AdamW`` / galore-torch's AdamW.

  ``u = m / (sqrt(v) + eps) * sqrt(1 - b2^t) / (1 - b1^t)``: ``eps`` is added to
  the *uncorrected* ``sqrt(v)``, unlike ``optax.scale_by_adam``
  (``m_hat / (sqrt(v_hat) + eps)``); the two differ by ``eps * sqrt(1 - b2^t)``.
  """

  def init(params):
    z = jax.tree.map(jnp.zeros_like, params)
    return ScaleByAdamHFState(jnp.zeros([], jnp.int32), z, jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    t = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    tf = t.astype(jnp.float32)
    c = jnp.sqrt(1 - b2 ** tf) / (1 - b1 ** tf) if correct_bias else 1.0
    out = jax.tree.map(lambda m, v: (m / (jnp.sqrt(v) + eps) * c).astype(m.dtype), mu, nu)
    return out, ScaleByAdamHFState(t, mu, nu)

  return optax.GradientTransformation(init, update)


def decay_after_update(rate: float) -> optax.GradientTransformation:
  """Weight decay applied to the *updated* parameter (HF/galore-torch AdamW order).

  ``p' = (p + u) (1 - rate)``, i.e. the update becomes ``u - rate (p + u)``; ``rate``
  is ``lr * weight_decay``.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if rate == 0:
      return updates, state
    if params is None:
      raise ValueError("decay_after_update needs params")
    return jax.tree.map(lambda u, p: u - rate * (p + u), updates, params), state

  return optax.GradientTransformation(init, update)


def galore_adamw(learning_rate: optax.ScalarOrSchedule, rank: int = 128, *,
                 update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: ProjType = "std", b1: float = 0.9, b2: float = 0.999,
                 eps: Optional[float] = None, weight_decay: float = 0.0,
                 where: tree_lib.Where = None, in_ndim: Any = None,
                 compat: Optional[Literal["galore_torch"]] = None,
                 moments: Literal["fp32", "8bit"] = "fp32",
                 projector_dtype: Any = "auto", svd: Any = "full",
                 weight_decay_mask: Any = None) -> optax.GradientTransformation:
  """AdamW with GaLore projection on the selected matrices (plain AdamW elsewhere).

  Args:
    learning_rate: float or optax schedule.
    rank, update_proj_gap, scale, proj_type, where, in_ndim, svd: see
      :func:`scale_by_galore` (defaults: galore-torch README, ``scale=0.25``).
    b1, b2: Adam betas.
    eps: Adam eps; default ``1e-8`` (optax) or ``1e-6`` with ``compat="galore_torch"``.
    weight_decay: decoupled weight decay.
    compat: ``"galore_torch"`` reproduces ``galore_torch.GaLoreAdamW`` exactly (HF
      eps placement, decay after the update, fp32 projector); ``None`` uses optax's
      Adam (``optax.scale_by_adam``) and ``optax.add_decayed_weights``.
    moments: ``"8bit"`` stores the Adam moments with the blockwise 8-bit dynamic
      codec (:func:`lowrank_jax.optim.adam8bit.scale_by_adam_8bit`).
    projector_dtype: ``"auto"`` = bfloat16, or float32 under ``compat``; or a dtype
      (``None`` keeps the gradient's dtype).
    weight_decay_mask: mask for ``add_decayed_weights`` (non-compat mode).

  Returns:
    An ``optax.GradientTransformation``.
  """
  if compat not in (None, "galore_torch"):
    raise ValueError(f"unknown compat {compat!r}; expected None or 'galore_torch'")
  if projector_dtype == "auto":
    projector_dtype = None if compat else jnp.bfloat16
  if moments == "8bit":
    inner = scale_by_adam_8bit(b1=b1, b2=b2, eps=1e-8 if eps is None else eps,
                               eps_placement="hf" if compat else "optax")
  elif moments == "fp32":
    if compat:
      inner = scale_by_adam_hf(b1, b2, 1e-6 if eps is None else eps)
    else:
      inner = optax.scale_by_adam(b1, b2, 1e-8 if eps is None else eps)
  else:
    raise ValueError(f"unknown moments {moments!r}; expected fp32 or 8bit")
  galore = scale_by_galore(inner, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                           proj_type=proj_type, where=where, in_ndim=in_ndim,
                           projector_dtype=projector_dtype, svd=svd)
  if compat:
    if callable(learning_rate):
      raise ValueError("compat='galore_torch' needs a constant learning rate (its decay uses lr)")
    return optax.chain(galore, optax.scale_by_learning_rate(learning_rate),
                       decay_after_update(learning_rate * weight_decay))
  return optax.chain(galore, optax.add_decayed_weights(weight_decay, weight_decay_mask),
                     optax.scale_by_learning_rate(learning_rate))


def galore_state_bytes(state: PyTree) -> dict[str, int]:
  """Bytes of a GaLore state split into ``projector``, ``inner`` and ``total``."""
  found = tree_lib.find_nodes(state, GaLoreState)
  proj = sum(tree_lib.count_bytes(s.projector) for s in found)
  total = tree_lib.count_bytes(state)
  return {"projector": proj, "inner": total - proj, "total": total}
