"""Paged optimizer state: inner state kept in host memory, streamed to the device leaf by leaf.

The analogue of bitsandbytes' paged optimizers (unified memory pages that evict to
CPU RAM; Dettmers et al., QLoRA, arXiv 2305.14314) with JAX memory kinds: the
state of ``tx`` lives in ``pinned_host`` memory between steps. Inside the update
(under ``jit``) each *page* - the inner state of one parameter leaf, see
:func:`lowrank_jax.optim.leafwise.leafwise` - is copied to device memory, updated,
and copied back; an ``optimization_barrier`` makes page ``i+1``'s transfer wait for
page ``i``'s result, so device memory held by optimizer state is bounded by the
largest page (plus the gradient and update of that leaf), not the sum::

    tx = offload(optax.adamw(1e-4))          # same numbers as optax.adamw(1e-4)
    state = tx.init(params)                  # state arrays have memory_kind="pinned_host"
    step = jax.jit(train_step, donate_argnums=...)

Transfers use ``jax.device_put(x, jax.memory.Space.Host / .Device)``, which keeps each
array's sharding (a sharded state stays sharded, per-device pages).

Backends: GPU and TPU have a separate host memory space. On CPU device memory *is*
host memory: by default (``enabled=None``) the wrapper then runs without transfers and
says so once (a ``RuntimeWarning``); ``enabled=True`` forces the transfers (useful to
test the code path on CPU, where XLA supports them but nothing is saved).

The page split is per leaf, so ``tx`` must treat leaves independently (Adam, AdamW,
GaLore, 8-bit Adam, schedules); chain global transforms outside:
``optax.chain(optax.clip_by_global_norm(1.0), offload(optax.adamw(1e-4)))``.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional

import jax
import optax

from lowrank_jax import tree as tree_lib
from lowrank_jax.optim.leafwise import LeafwiseState, leafwise

PyTree = Any

__all__ = ["OffloadState", "offload", "offload_supported", "state_memory_kinds"]

_WARNED = False


class OffloadState(NamedTuple):
  """``pages``: the leafwise inner state, ``{path: state}``, in host memory when active."""
  pages: LeafwiseState


def offload_supported(memory_kind: str = "pinned_host", device=None) -> bool:
  """Whether ``device`` (default: the first) has a host memory distinct from its own.

  True on GPU/TPU when ``memory_kind`` is among ``device.addressable_memories()``; False
  on CPU, whose "device" memory is already host RAM.
  """
  device = jax.devices()[0] if device is None else device
  kinds = {m.kind for m in device.addressable_memories()}
  return device.platform != "cpu" and memory_kind in kinds


def _space(memory_kind: str):
  if memory_kind in ("pinned_host", "unpinned_host"):
    return jax.memory.Space.Host
  raise ValueError(f"offload: memory_kind must be 'pinned_host' or 'unpinned_host', got {memory_kind!r}")


def _warn_once(msg: str) -> None:
  global _WARNED
  if not _WARNED:
    _WARNED = True
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def offload(tx: optax.GradientTransformation, *, memory_kind: str = "pinned_host",
            enabled: Optional[bool] = None) -> optax.GradientTransformation:
  """Keeps ``tx``'s state in host memory and pages it through the device per leaf.

  Args:
    tx: an optax transformation acting on leaves independently.
    memory_kind: the host memory kind (``"pinned_host"``; GPUs support only that).
    enabled: ``None`` - offload where the backend has a separate host memory (GPU/TPU),
      otherwise run without transfers and warn once; ``True`` - always transfer (if the
      memory kind exists); ``False`` - never.

  Returns:
    An ``optax.GradientTransformation`` with :class:`OffloadState`; its updates equal
    ``tx``'s.
  """
  host = _space(memory_kind)
  inner = leafwise(tx)

  def active() -> bool:
    dev = jax.devices()[0]
    kinds = {m.kind for m in dev.addressable_memories()}
    if enabled is False:
      return False
    if enabled is True:
      if memory_kind not in kinds:
        raise ValueError(f"offload: backend {dev.platform} has no memory kind {memory_kind!r} "
                         f"(has {sorted(kinds)})")
      return True
    if offload_supported(memory_kind, dev):
      return True
    _warn_once(f"lowrank_jax.optim.offload: backend '{dev.platform}' has no device memory "
               f"separate from host memory; optimizer state stays where it is (no offload). "
               f"Pass enabled=True to force the transfers.")
    return False

  def to_host(x):
    return jax.device_put(x, host)

  def init(params):
    state = inner.init(params)
    if active():
      pages = {}
      for path, x in tree_lib.flatten_with_paths(params):
        if x is None:
          continue
        pages[path] = jax.tree.map(lambda s, x=x: _to_host_like(s, x, memory_kind, host),
                                   state.states[path])
      state = LeafwiseState(pages)
    return OffloadState(state)

  def update(updates, state: OffloadState, params=None, **extra):
    del extra
    if not active():
      u, s = inner.update(updates, state.pages, params)
      return u, OffloadState(s)
    treedef = jax.tree_util.tree_structure(updates, is_leaf=tree_lib.is_lazy_or_array)
    items = tree_lib.flatten_with_paths(updates)
    p_leaves = [None] * len(items) if params is None else treedef.flatten_up_to(params)
    pages, out, prev = dict(state.pages.states), [], None
    for (path, g), p in zip(items, p_leaves):
      page = pages[path]
      if prev is not None:  # page i+1 moves only once page i is done
        page, prev = jax.lax.optimization_barrier((page, prev))
      page = jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), page)
      u, new = tx.update({path: g}, page, None if p is None else {path: p})
      new = jax.tree.map(to_host, new)
      pages[path] = new
      prev = (u[path], new)
      out.append(u[path])
    return jax.tree_util.tree_unflatten(treedef, out), OffloadState(LeafwiseState(pages))

  return optax.GradientTransformation(init, update)


def _to_host_like(s, param, memory_kind, host):
  """Moves state leaf ``s`` to host memory on ``param``'s devices.

  Leaves that ``tx.init`` created without a placement (Adam's scalar ``count``, GaLore's
  projector) are replicated over the devices of the parameter they belong to, so a
  sharded parameter's page is never committed to a single device.
  """
  ps, ss = getattr(param, "sharding", None), getattr(s, "sharding", None)
  if isinstance(s, jax.core.Tracer) or ps is None or ss is None or ss.device_set == ps.device_set:
    return jax.device_put(s, host)
  if isinstance(ps, jax.sharding.NamedSharding):
    target = jax.sharding.NamedSharding(ps.mesh, jax.sharding.PartitionSpec(),
                                        memory_kind=memory_kind)
  else:
    target = jax.sharding.SingleDeviceSharding(next(iter(ps.device_set)), memory_kind=memory_kind)
  return jax.device_put(s, target)


def state_memory_kinds(state: PyTree) -> dict[str, int]:
  """Bytes of a (concrete) state by memory kind, e.g. ``{"pinned_host": ..., "device": ...}``."""
  out: dict[str, int] = {}
  for x in jax.tree.leaves(state):
    if not hasattr(x, "sharding"):
      continue
    kind = getattr(x.sharding, "memory_kind", None) or "device"
    out[kind] = out.get(kind, 0) + x.size * x.dtype.itemsize
  return out
