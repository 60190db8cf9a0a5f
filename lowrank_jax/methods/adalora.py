"""AdaLoRA: SVD-form low-rank adaptation with a budgeted rank allocator.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", ICLR 2023, arXiv 2303.10512.

The update of each adapted weight is written in SVD form (torch layout ``[out, in]``)::

    ΔW = P Λ Q · s,      s = alpha / (r + 1e-5)

with ``P`` ``[out, r]`` (left "singular vectors"), ``Λ = diag(e)`` and ``Q`` ``[r, in]``.
peft stores ``lora_B = P``, ``lora_E = e[:, None]``, ``lora_A = Q``; its ``ranknum`` is the
initial rank ``r`` and stays fixed when triplets are masked, so the factor ``s`` never
changes (we follow peft, including the ``+ 1e-5``). In our Flax layout ``W`` is
``[in, out]``, so ``phi = {"a": Qᵀ [in, r], "e": e [r], "b": Pᵀ [r, out]}`` and
``x @ W = x @ W0 + s ((x @ a) * e) @ b``; the update reuses :class:`LoRAWeight` with the
factor ``a * e``.

Training adds the orthogonality regulariser :func:`orthogonal_regularizer`
(``R = mean over matrices of ||QQᵀ - I||_F and ||PᵀP - I||_F``), and calls the rank
allocator (:func:`rank_allocator`, an ``(init, update)`` pair like an optax
transformation) after each gradient step. The allocator

* scores every entry ``θ`` of ``a``, ``e``, ``b`` by its sensitivity ``I = |θ ∇θ|``,
  smoothed ``Ī ← β1 Ī + (1 - β1) I`` and its uncertainty
  ``Ū ← β2 Ū + (1 - β2) |I - Ī|``; entry score ``s = Ī · Ū``;
* scores triplet ``i`` of a layer by ``S_i = s(e_i) + mean_j s(Q_ij) + mean_j s(P_ji)``;
* follows the cubic budget schedule
  ``b(t) = int((b0 - bT) (1 - (t - t_i)/(T - t_f - t_i))³ + bT)`` with ``b0 = Σ r`` and
  ``bT = target_r · n_layers`` (``b0`` while ``t <= tinit``, ``bT`` after ``T - tfinal``);
* every ``deltaT`` steps zeroes ``e_i`` of the triplets with ``S_i <= threshold``, where
  the threshold is the ``(b0 - b(t))``-th smallest score over all layers (torch's
  ``kthvalue``, which is why ties at the threshold are all masked);
* at ``t == T - tfinal`` forces a final mask and keeps re-applying that rank pattern
  afterwards.

Notes on peft parity:

* The paper writes the squared Frobenius norm in the regulariser; peft's code (the
  reference we match) uses the non-squared norm. :func:`orthogonal_regularizer` follows
  peft and takes ``squared=True`` for the paper's form.
* peft calls its allocator after ``optimizer.step()`` with the post-step parameters
  and the gradients of that step; pass the same to :func:`RankAllocator.update` to
  reproduce peft exactly (passing the pre-step parameters is the paper's form).
* Masking zeroes ``e`` only; ``a`` and ``b`` keep their values and a masked ``e_i`` can
  regrow until it is masked again (peft does not resize the tensors during training).
* When the budget equals ``Σ r`` (``k = 0``) nothing is masked (torch would raise).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import numpy as np

from lowrank_jax import tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.methods.lora import LoRAWeight
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt

__all__ = [
  "with_rank_allocator",
  "RankAllocationState",
  "adalora",
  "adalora_method",
  "adalora_scale",
  "orthogonal_regularizer",
  "rank_allocator",
  "RankAllocator",
  "RankAllocatorState",
  "budget_schedule",
  "rank_pattern",
  "to_peft",
  "from_peft",
]

PyTree = Any


def _is_adalora_leaf(x) -> bool:
  return isinstance(x, dict) and set(x) == {"a", "e", "b"}


def _is_hole_or_leaf(x) -> bool:
  return x is None or _is_adalora_leaf(x)


def adalora_scale(init_r: int, alpha: Optional[float]) -> float:
  """peft's effective factor ``alpha / (init_r + 1e-5)``; ``alpha <= 0`` or ``None`` means ``r``."""
  scaling = float(alpha) if alpha is not None and alpha > 0 else float(init_r)
  return scaling / (float(init_r) + 1e-5)


def adalora_method(init_r: int = 12, alpha: Optional[float] = 8.0, *, dropout: float = 0.0,
                   init_std: float = 0.02, dtype=jnp.float32, in_ndim: Any = None) -> LeafMethod:
  """The per-leaf AdaLoRA method (see :func:`adalora`)."""
  if not isinstance(init_r, int) or init_r < 1:
    raise ValueError(f"AdaLoRA init_r must be a positive int, got {init_r!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"AdaLoRA dropout must be in [0, 1), got {dropout}")
  scale = adalora_scale(init_r, alpha)

  def validate(path, view: MatrixView):
    if init_r > min(view.d_in, view.d_out):
      raise ValueError(f"AdaLoRA init_r {init_r} exceeds min(d_in, d_out) = "
                       f"{min(view.d_in, view.d_out)} for leaf '{path}' of shape {view.shape}")

  def init_leaf(key, path, w, view):
    ka, kb = jax.random.split(key)
    return {"a": init_std * jax.random.normal(ka, (view.d_in, init_r), dtype),
            "e": jnp.zeros((init_r,), dtype),
            "b": init_std * jax.random.normal(kb, (init_r, view.d_out), dtype)}

  def apply_leaf(w, phi, view, rng):
    return LoRAWeight(base=w, a=phi["a"] * phi["e"][None, :], b=phi["b"],
                      rng=rng if dropout > 0 else None, scale=scale, shape_=view.shape,
                      dropout_rate=dropout)

  def unmerge_leaf(w, phi, view):
    delta = view.from_matrix(scale * ((phi["a"] * phi["e"][None, :]) @ phi["b"]))
    return (w.astype(jnp.float32) - delta.astype(jnp.float32)).astype(w.dtype)

  return LeafMethod(name="AdaLoRA", init_leaf=init_leaf, apply_leaf=apply_leaf,
                    unmerge_leaf=unmerge_leaf, validate=validate, in_ndim=in_ndim)


@configured("adalora")
def adalora(where: tree_lib.Where, init_r: int = 12, alpha: Optional[float] = 8.0, *,
            dropout: float = 0.0, init_std: float = 0.02, dtype=jnp.float32,
            in_ndim: Any = None) -> Reparam:
  """AdaLoRA on the leaves ``where`` selects: ``W = W0 + s · Qᵀ diag(e) Pᵀ`` (Flax layout).

  Args:
    where: selection of the weights to adapt.
    init_r: the initial rank of every layer (peft's ``init_r``, default 12).
    alpha: peft's ``lora_alpha`` (default 8); ``s = alpha / (init_r + 1e-5)``.
    dropout: dropout on the adapter input (active when ``apply`` gets ``rng``).
    init_std: ``a`` and ``b`` start ``N(0, init_std²)`` (peft: 0.02); ``e`` starts at 0,
      so the adapted model equals the base at initialisation.
    dtype: dtype of the adapter parameters.
    in_ndim: for N-d weights, the number of leading input axes.

  Returns:
    A :class:`Reparam` with ``phi`` leaves ``{"a": [in, r], "e": [r], "b": [r, out]}``.
    Train with :func:`orthogonal_regularizer` added to the loss and :func:`rank_allocator`.
  """
  return adapt(adalora_method(init_r, alpha, dropout=dropout, init_std=init_std, dtype=dtype,
                              in_ndim=in_ndim), where)


def _adapter_leaves(phi: PyTree) -> list[dict]:
  return [x for x in jax.tree_util.tree_leaves(phi, is_leaf=_is_hole_or_leaf) if _is_adalora_leaf(x)]


def orthogonal_regularizer(phi: PyTree, *, squared: bool = False) -> jax.Array:
  """``mean over the 2n factor matrices of ||QQᵀ - I||_F`` and ``||PᵀP - I||_F``.

  With ``Q = aᵀ`` and ``P = bᵀ`` both Gram matrices are ``[r, r]``: ``aᵀa`` and ``b bᵀ``.
  Multiply by peft's ``orth_reg_weight`` (0.5 by default) and add to the loss.

  Args:
    phi: AdaLoRA parameters (``None`` holes allowed).
    squared: use the paper's squared norm instead of peft's non-squared one.

  Returns:
    A scalar; 0.0 when ``phi`` holds no AdaLoRA leaf.
  """
  terms = []
  for leaf in _adapter_leaves(phi):
    for gram in (leaf["a"].T @ leaf["a"], leaf["b"] @ leaf["b"].T):
      diff = gram - jnp.eye(gram.shape[0], dtype=gram.dtype)
      sq = jnp.sum(diff * diff)
      terms.append(sq if squared else jnp.sqrt(sq))
  if not terms:
    return jnp.zeros((), jnp.float32)
  return sum(terms) / len(terms)


@dataclasses.dataclass(frozen=True)
class RankAllocator:
  """``(init, update)`` pair of the AdaLoRA budget (see :func:`rank_allocator`).

  Attributes:
    init: ``phi -> RankAllocatorState``.
    update: ``(state, phi, grads, step) -> (phi', state')``; ``phi'`` has the masked
      ``e`` entries set to zero. Pure and jit-compatible (``step`` may be traced).
  """
  init: Any
  update: Any
  target_r: int
  total_step: int
  tinit: int
  tfinal: int
  deltaT: int
  beta1: float
  beta2: float


class RankAllocatorState(NamedTuple):
  """State of the rank allocator (a pytree).

  Attributes:
    ipt: EMA of the sensitivity ``|θ ∇θ|``, mirroring ``phi``.
    unc: EMA of the uncertainty ``|I - Ī|``, mirroring ``phi``.
    keep: per adapted leaf, a bool ``[r]`` of the triplets kept by the last mask (the
      rank pattern; all True before the first mask).
    budget: the last scheduled total rank budget (int32 scalar).
  """
  ipt: PyTree
  unc: PyTree
  keep: PyTree
  budget: jax.Array


def budget_schedule(step, init_budget: int, target_budget: int, total_step: int,
                    tinit: int = 0, tfinal: int = 0, deltaT: int = 1):
  """peft's cubic budget schedule: ``(budget, mask_now)`` as int32 / bool arrays.

  ``step <= tinit``: ``(init_budget, False)``; ``step > total_step - tfinal``:
  ``(target_budget, True)``; otherwise
  ``int((b0 - bT)(1 - (step - tinit)/(total_step - tfinal - tinit))³ + bT)`` and a mask
  every ``deltaT`` steps.
  """
  span = total_step - tfinal - tinit
  if isinstance(step, (int, np.integer)) and not isinstance(step, bool):  # concrete: exactly peft's Python float arithmetic
    if step <= tinit:
      return jnp.int32(init_budget), jnp.bool_(False)
    if step > total_step - tfinal:
      return jnp.int32(target_budget), jnp.bool_(True)
    coeff = 1 - (step - tinit) / span
    return (jnp.int32(int((init_budget - target_budget) * coeff ** 3 + target_budget)),
            jnp.bool_(step % deltaT == 0))
  # traced: float32, which can differ from peft's float64 by one when the cubic is within
  # ~1e-6 relative of an integer
  step = jnp.asarray(step)
  coeff = (span - (step - tinit)).astype(jnp.float32) / span
  cubic = jnp.floor((init_budget - target_budget) * coeff ** 3 + target_budget).astype(jnp.int32)
  budget = jnp.where(step <= tinit, init_budget,
                     jnp.where(step > total_step - tfinal, target_budget, cubic)).astype(jnp.int32)
  mask_now = jnp.where(step <= tinit, False,
                       jnp.where(step > total_step - tfinal, True, step % deltaT == 0))
  return budget, mask_now


def _triplet_scores(ipt_leaf: dict, unc_leaf: dict) -> jax.Array:
  s = {k: ipt_leaf[k] * unc_leaf[k] for k in ("a", "e", "b")}
  return s["e"] + jnp.mean(s["a"], axis=0) + jnp.mean(s["b"], axis=1)


def rank_allocator(target_r: int = 8, *, total_step: int, tinit: int = 0, tfinal: int = 0,
                   deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85) -> RankAllocator:
  """AdaLoRA's budgeted rank allocator as pure functions (peft's ``RankAllocator``).

  Usage inside a training step (after computing ``grads`` and the optimizer update)::

      alloc = rank_allocator(target_r=4, total_step=1000, tinit=100, tfinal=200)
      state = alloc.init(phi)
      ...
      phi = optax.apply_updates(phi, updates)
      phi, state = alloc.update(state, phi, grads, step)

  Args:
    target_r: average final rank per layer (``bT = target_r · n_layers``).
    total_step: total number of training steps ``T``.
    tinit: warm-up steps without masking.
    tfinal: final steps with the rank pattern frozen.
    deltaT: mask every ``deltaT`` steps during the cubic phase.
    beta1: EMA coefficient of the sensitivity.
    beta2: EMA coefficient of the uncertainty.

  Returns:
    A :class:`RankAllocator`.
  """
  if not 0.0 < beta1 < 1.0 or not 0.0 < beta2 < 1.0:
    raise ValueError(f"beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
  if not tinit < total_step - tfinal:
    raise ValueError(f"AdaLoRA needs tinit < total_step - tfinal, got tinit={tinit}, "
                     f"tfinal={tfinal}, total_step={total_step}")
  if deltaT < 1:
    raise ValueError(f"deltaT must be >= 1, got {deltaT}")

  def _budgets(phi):
    leaves = _adapter_leaves(phi)
    if not leaves:
      raise ValueError("rank_allocator: phi holds no AdaLoRA leaf ({'a', 'e', 'b'} dicts)")
    return sum(int(l["e"].shape[0]) for l in leaves), target_r * len(leaves)

  def init(phi) -> RankAllocatorState:
    b0, _ = _budgets(phi)
    zeros = jax.tree.map(jnp.zeros_like, phi)
    keep = jax.tree.map(lambda l: None if l is None else jnp.ones(l["e"].shape, bool), phi,
                        is_leaf=_is_hole_or_leaf)
    # two separate zero trees: aliased buffers could not be donated to a jitted step
    return RankAllocatorState(ipt=zeros, unc=jax.tree.map(jnp.zeros_like, phi), keep=keep,
                              budget=jnp.asarray(b0, jnp.int32))

  def update(state: RankAllocatorState, phi, grads, step):
    b0, bT = _budgets(phi)
    budget, mask_now = budget_schedule(step, b0, bT, total_step, tinit, tfinal, deltaT)
    step = jnp.asarray(step)
    t_final = total_step - tfinal
    # 1. importance EMAs, only while step < T - tfinal
    learning = step < t_final
    ipt_now = jax.tree.map(lambda p, g: jnp.abs(p * g), phi, grads)
    ipt_new = jax.tree.map(lambda m, i: beta1 * m + (1 - beta1) * i, state.ipt, ipt_now)
    unc_new = jax.tree.map(lambda u, i, m: beta2 * u + (1 - beta2) * jnp.abs(i - m),
                           state.unc, ipt_now, ipt_new)
    ipt = jax.tree.map(lambda n, o: jnp.where(learning, n, o), ipt_new, state.ipt)
    unc = jax.tree.map(lambda n, o: jnp.where(learning, n, o), unc_new, state.unc)
    # 2. schedule and the score threshold over all triplets of all layers
    forced = step == t_final
    frozen = step > t_final
    ipt_leaves = _adapter_leaves(ipt)
    unc_leaves = _adapter_leaves(unc)
    scores = [_triplet_scores(i, u) for i, u in zip(ipt_leaves, unc_leaves)]
    flat = jnp.sort(jnp.concatenate(scores))
    k = b0 - budget  # number of triplets to drop (kthvalue is 1-indexed)
    threshold = jnp.where(k > 0, flat[jnp.clip(k - 1, 0, flat.shape[0] - 1)], -jnp.inf)
    do_mask = (mask_now | forced) & ~frozen
    # 3. new keep pattern and masked e
    keep_leaves = _adapter_leaves_keep(state.keep)
    new_keep = []
    for s, kp in zip(scores, keep_leaves):
      new_keep.append(jnp.where(do_mask, s > threshold, kp))
    apply_mask = do_mask | frozen
    treedef = jax.tree_util.tree_structure(phi, is_leaf=_is_hole_or_leaf)
    phi_items = treedef.flatten_up_to(phi)
    it = iter(new_keep)
    out_phi, out_keep = [], []
    for leaf in phi_items:
      if leaf is None:
        out_phi.append(None)
        out_keep.append(None)
        continue
      kp = next(it)
      e = jnp.where(apply_mask & ~kp, jnp.zeros_like(leaf["e"]), leaf["e"])
      out_phi.append({**leaf, "e": e})
      out_keep.append(kp)
    # peft resets the importance after the final mask
    ipt = jax.tree.map(lambda x: jnp.where(forced, jnp.zeros_like(x), x), ipt)
    unc = jax.tree.map(lambda x: jnp.where(forced, jnp.zeros_like(x), x), unc)
    new_state = RankAllocatorState(ipt=ipt, unc=unc,
                                   keep=jax.tree_util.tree_unflatten(treedef, out_keep),
                                   budget=jnp.where(do_mask | frozen, budget, state.budget
                                                    ).astype(jnp.int32))
    return jax.tree_util.tree_unflatten(treedef, out_phi), new_state

  return RankAllocator(init=init, update=update, target_r=target_r, total_step=total_step,
                       tinit=tinit, tfinal=tfinal, deltaT=deltaT, beta1=beta1, beta2=beta2)


def _adapter_leaves_keep(keep: PyTree) -> list[jax.Array]:
  return [x for x in jax.tree_util.tree_leaves(keep) if x is not None]


def rank_pattern(state: RankAllocatorState) -> dict[str, list[bool]]:
  """``{path: [kept?] * r}`` of the last mask, as peft's ``config.rank_pattern``."""
  return {p: [bool(v) for v in jax.device_get(k)]
          for p, k in tree_lib.flatten_with_paths(state.keep) if k is not None}


def to_peft(phi_leaf: dict) -> dict[str, jax.Array]:
  """peft tensors of one leaf: ``lora_A [r, in]``, ``lora_E [r, 1]``, ``lora_B [out, r]``."""
  return {"lora_A": phi_leaf["a"].T, "lora_E": phi_leaf["e"][:, None], "lora_B": phi_leaf["b"].T}


def from_peft(lora_A, lora_E, lora_B) -> dict[str, jax.Array]:
  """Inverse of :func:`to_peft`."""
  return {"a": jnp.asarray(lora_A).T, "e": jnp.asarray(lora_E).reshape(-1),
          "b": jnp.asarray(lora_B).T}


class RankAllocationState(NamedTuple):
  """State of :func:`with_rank_allocator`: the inner optimizer's, the allocator's, the step."""
  inner: Any
  alloc: RankAllocatorState
  count: jax.Array


def _adalora_only(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x if _is_adalora_leaf(x) else None, tree,
                      is_leaf=lambda x: x is None or _is_adalora_leaf(x))


def with_rank_allocator(tx: optax.GradientTransformation,
                        allocator: RankAllocator) -> optax.GradientTransformation:
  """Runs ``tx``, then AdaLoRA's budget on the updated adapters, as one optax transformation.

  This is peft's ``optimizer.step(); model.base_model.update_and_allocate(step)``: the
  allocator sees the parameters after the update and the raw gradients of the step, and
  masks the least important triplets; the returned updates move ``params`` to the masked
  parameters. Non-AdaLoRA leaves of ``params`` (e.g. a classifier head) are untouched by
  the allocator. The step counter starts at 0.
  """

  def init(params):
    return RankAllocationState(tx.init(params), allocator.init(_adalora_only(params)),
                               jnp.zeros([], jnp.int32))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("with_rank_allocator needs params in update(grads, state, params)")
    updates, inner = tx.update(grads, state.inner, params)
    new = optax.apply_updates(params, updates)
    masked, alloc = allocator.update(state.alloc, _adalora_only(new), _adalora_only(grads), state.count)
    new = tree_lib.combine(masked, new)
    updates = jax.tree.map(lambda n, p: n - p, new, params)
    return updates, RankAllocationState(inner, alloc, state.count + 1)

  return optax.GradientTransformation(init, update)
