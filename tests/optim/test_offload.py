"""Offloaded / paged optimizer state: same numbers as the unwrapped transformation, state in
pinned_host memory when forced, one warning on CPU, page-by-page transfers in the jaxpr."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import importlib

off = importlib.import_module("lowrank_jax.optim.offload")  # the package exports the function `offload`
from lowrank_jax.optim.galore import galore_adamw


def _tree(seed, shapes={"w": (32, 16), "v": (16, 24), "b": (16,)}):
  ks = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {n: jax.random.normal(k, s) for k, (n, s) in zip(ks, shapes.items())}


def _run(tx, steps=3, jit=True):
  params = _tree(0)
  state = tx.init(params)
  upd = jax.jit(tx.update) if jit else tx.update
  for t in range(steps):
    u, state = upd(_tree(t + 1), state, params)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.mark.parametrize("make", [lambda: optax.adamw(1e-2, weight_decay=0.1),
                                  lambda: galore_adamw(1e-2, rank=4, update_proj_gap=2)])
def test_forced_offload_equals_unwrapped(make):
  p_ref, _ = _run(make())
  p_off, s_off = _run(off.offload(make(), enabled=True))
  chex.assert_trees_all_close(p_off, p_ref, atol=1e-6)
  kinds = off.state_memory_kinds(s_off)
  assert set(kinds) == {"pinned_host"} and kinds["pinned_host"] > 0


def test_cpu_default_runs_unchanged_and_warns_once(monkeypatch):
  if off.offload_supported():
    pytest.skip("backend has host offload; the CPU fallback is not used")
  monkeypatch.setattr(off, "_WARNED", False)
  with pytest.warns(RuntimeWarning, match="no device memory separate") as rec:
    p_off, s_off = _run(off.offload(optax.adam(1e-2)))
    _run(off.offload(optax.adam(1e-2)))
  assert sum("no device memory" in str(w.message) for w in rec) == 1
  p_ref, _ = _run(optax.adam(1e-2))
  chex.assert_trees_all_close(p_off, p_ref, atol=1e-6)
  assert "pinned_host" not in off.state_memory_kinds(s_off)


def test_pages_move_one_leaf_at_a_time_in_the_jaxpr():
  tx = off.offload(optax.adam(1e-2), enabled=True)
  params = _tree(0)
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  names = [e.primitive.name for e in jaxpr.eqns]
  assert names.count("optimization_barrier") == len(params) - 1
  assert names.count("device_put") >= 2 * len(params)  # to device and back, per page


def test_errors():
  with pytest.raises(ValueError, match="memory_kind"):
    off.offload(optax.adam(1e-2), memory_kind="hbm")


def test_sharded_state_stays_sharded():
  if len(jax.devices()) < 2:
    pytest.skip("needs >= 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])
  params = jax.device_put(_tree(0), {"w": NamedSharding(mesh, P("d", None)),
                                     "v": NamedSharding(mesh, P(None, "d")),
                                     "b": NamedSharding(mesh, P("d"))})
  tx = off.offload(optax.adam(1e-2), enabled=True)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(params, state, params)
  mu_w = state.pages.states["w"][0].mu["w"]
  assert mu_w.sharding.memory_kind == "pinned_host" and mu_w.sharding.spec == P("d", None)
  ref_u, _ = optax.adam(1e-2).update(params, optax.adam(1e-2).init(params))
  chex.assert_trees_all_close(u, ref_u, atol=1e-6)
