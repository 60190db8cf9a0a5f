"""GaLore: galore-torch golden trajectory, optax.contrib.galore, closed-form truncated SVD,
jit without retrace, sharding, per-layer updates, state size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
import chex

from lowrank_jax.optim import galore as gl
from lowrank_jax.optim.leafwise import leafwise, map_layers
from tests.conftest import load_golden

NAMES = ("W1", "W2", "b")


def _align(p_ours, p_ref, side):
  """Flips the sign of each singular vector of ``p_ours`` to match ``p_ref``."""
  axis = 0 if side == "left" else 1  # left: columns [m, r]; right: rows [r, n]
  dots = jnp.sum(p_ours * p_ref, axis=axis, keepdims=True)
  return p_ours * jnp.where(dots < 0, -1.0, 1.0)


def _galore_torch_run(cfg):
  """``(arrays, config, steps, want)``: galore-torch's inputs (tests/golden/galore_adamw.npz),
  the projectors it used (galore_adamw_extra.npz) and ``want(k, name)``, its parameters after
  step k: the stored snapshots of galore_adamw.npz for ``main`` (its own config), the extra
  file's for ``alt`` (reverse_std, gap 2, weight decay 0.1)."""
  base, meta = load_golden("galore_adamw")
  extra, emeta = load_golden("galore_adamw_extra")
  arrays = {**base, **extra}
  c = emeta["configs"][cfg]
  if cfg == "main":  # the extra file's main config is the stored run's
    g = meta["galore"]
    assert (c["rank"], c["gap"], c["scale"], c["proj_type"], c["lr"], c["eps"], c["wd"]) == (
        g["rank"], g["update_proj_gap"], g["scale"], g["proj_type"], meta["lr"], meta["eps"],
        meta["weight_decay"])
  prefix = "" if cfg == "main" else f"{cfg}/"
  return arrays, c, meta["steps"], lambda k, n: arrays[f"{prefix}step{k}/param/{n}"]


@pytest.mark.parametrize("cfg", ["main", "alt"])
def test_matches_galore_torch_step_by_step(cfg):
  arrays, c, steps, want = _galore_torch_run(cfg)

  def make(refs):
    def svd(path, g, side, rank, key):
      u, _, vt = jnp.linalg.svd(g, full_matrices=False)
      p = u[:, :rank] if side == "left" else vt[:rank]
      return _align(p, refs[path], side)  # torch's singular vectors up to LAPACK's sign choice
    return gl.galore_adamw(c["lr"], rank=c["rank"], update_proj_gap=c["gap"], scale=c["scale"],
                           proj_type=c["proj_type"], eps=c["eps"], weight_decay=c["wd"],
                           where=["W1", "W2"], compat="galore_torch", svd=svd)

  @jax.jit
  def step(grads, state, params, refs):
    return make(refs).update(grads, state, params)

  params = {n: jnp.asarray(arrays[f"init/{n}"]) for n in NAMES}
  state = make(None).init(params)
  for k in range(steps):
    refs = {n: jnp.asarray(arrays[f"{cfg}/step{k}/projector/{n}"]) for n in ("W1", "W2")}
    grads = {n: jnp.asarray(arrays[f"step{k}/grad/{n}"]) for n in NAMES}
    u, state = step(grads, state, params, refs)
    params = optax.apply_updates(params, u)
    chex.assert_trees_all_close(params, {n: want(k, n) for n in NAMES}, atol=1e-5, rtol=0)
    proj = state[0].projector
    for n in ("W1", "W2"):  # the projector in use is torch's (after sign alignment)
      np.testing.assert_allclose(proj[n], refs[n], atol=5e-5)  # fp32 SVDs of two LAPACKs


def test_projectors_equal_torch_up_to_sign_and_first_period_unaligned():
  arrays, c, _, want = _galore_torch_run("main")
  params = {n: jnp.asarray(arrays[f"init/{n}"]) for n in NAMES}
  tx = gl.galore_adamw(c["lr"], rank=c["rank"], update_proj_gap=c["gap"], scale=c["scale"],
                       proj_type="std", eps=c["eps"], where=["W1", "W2"], compat="galore_torch")
  state = tx.init(params)
  step = jax.jit(tx.update)
  for k in range(c["gap"]):  # before the first refresh the SVD sign cancels out exactly
    grads = {n: jnp.asarray(arrays[f"step{k}/grad/{n}"]) for n in NAMES}
    u, state = step(grads, state, params)
    params = optax.apply_updates(params, u)
    chex.assert_trees_all_close(params, {n: want(k, n) for n in NAMES}, atol=1e-5, rtol=0)
    for n, side in (("W1", "right"), ("W2", "left")):  # std: right for 64x32, left for 32x64
      ours, ref = state[0].projector[n], arrays[f"main/step{k}/projector/{n}"]
      dots = np.abs(np.sum(np.asarray(ours) * ref, axis=0 if side == "left" else 1))
      np.testing.assert_allclose(dots, 1.0, atol=1e-5)


def _rand_tree(key, shapes):
  ks = jax.random.split(key, len(shapes))
  return {n: jax.random.normal(k, s) for k, (n, s) in zip(ks, shapes.items())}


SHAPES = {"w_tall": (24, 10), "w_wide": (8, 20), "bias": (10,)}


def test_equals_optax_contrib_galore():
  """optax projects the moments' side (our reverse_std) with an fp32 projector."""
  params = _rand_tree(jax.random.PRNGKey(0), SHAPES)
  ours = gl.scale_by_galore(optax.scale_by_adam(), rank=4, update_proj_gap=3, scale=0.5,
                            proj_type="reverse_std")
  ref = optax.contrib.scale_by_galore(rank=4, update_proj_gap=3, scale=0.5,
                                      base_optimizer=optax.scale_by_adam())
  s1, s2 = ours.init(params), ref.init(params)
  for t in range(7):
    g = _rand_tree(jax.random.PRNGKey(10 + t), SHAPES)
    u1, s1 = jax.jit(ours.update)(g, s1)
    u2, s2 = jax.jit(ref.update)(g, s2)
    chex.assert_trees_all_close(u1, u2, atol=1e-5, rtol=1e-5)


@settings(max_examples=5, deadline=None)
@given(m=st.integers(2, 16), n=st.integers(2, 16), rank=st.integers(1, 5),
       proj=st.sampled_from(["std", "reverse_std", "left", "right"]))
def test_identity_inner_is_truncated_svd(m, n, rank, proj):
  """With an identity inner transformation, P P^T G (or G Q^T Q) is the rank-r SVD truncation."""
  g = np.asarray(jax.random.normal(jax.random.PRNGKey(m * 31 + n), (m, n)), np.float64)
  tx = gl.scale_by_galore(optax.identity(), rank=rank, update_proj_gap=5, scale=0.5, proj_type=proj)
  u, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init({"w": jnp.zeros((m, n))}))
  uu, s, vt = np.linalg.svd(g, full_matrices=False)
  r = min(rank, m, n)
  want = 0.5 * (uu[:, :r] * s[:r]) @ vt[:r]
  np.testing.assert_allclose(u["w"], want, atol=2e-4 * max(1.0, np.abs(g).max()))


def test_nd_leaf_with_in_ndim_and_where():
  g = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 8))
  tx = gl.scale_by_galore(optax.identity(), rank=2, where="attn", in_ndim=2)
  tree = {"attn": g, "other": jnp.ones((5, 5))}
  u, _ = tx.update(tree, tx.init(tree))
  m = np.asarray(g).reshape(12, 8)
  uu, s, vt = np.linalg.svd(m, full_matrices=False)
  np.testing.assert_allclose(np.asarray(u["attn"]).reshape(12, 8), (uu[:, :2] * s[:2]) @ vt[:2],
                             atol=1e-4)
  np.testing.assert_array_equal(u["other"], tree["other"])  # not selected: identity


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="rank"):
    gl.scale_by_galore(rank=0)
  with pytest.raises(ValueError, match="proj_type"):
    gl.scale_by_galore(proj_type="diag")
  with pytest.raises(ValueError, match="'b'.*not a matrix"):
    gl.scale_by_galore(where="b").init({"b": jnp.ones(3), "w": jnp.ones((3, 3))})


def test_jit_no_retrace_across_refresh_steps():
  traces = []
  tx = gl.galore_adamw(1e-2, rank=2, update_proj_gap=2)
  params = _rand_tree(jax.random.PRNGKey(0), SHAPES)

  @jax.jit
  def step(params, state, g):
    traces.append(1)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  projs = []
  for t in range(5):
    params, state = step(params, state, _rand_tree(jax.random.PRNGKey(t), SHAPES))
    projs.append(np.asarray(state[0].projector["w_tall"], np.float32))
  assert len(traces) == 1
  assert np.array_equal(projs[0], projs[1]) and not np.array_equal(projs[1], projs[2])


def test_randomized_svd_finds_the_dominant_subspace():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  low = jax.random.normal(k1, (64, 6)) @ jax.random.normal(k2, (6, 48)) * 3
  g = low + 0.01 * jax.random.normal(k3, (64, 48))
  for side in ("left", "right"):
    tx = gl.scale_by_galore(optax.identity(), rank=6, proj_type=side, svd="randomized")
    u, _ = jax.jit(tx.update)({"w": g}, tx.init({"w": g}))
    uu, s, vt = np.linalg.svd(np.asarray(g), full_matrices=False)
    np.testing.assert_allclose(u["w"], (uu[:, :6] * s[:6]) @ vt[:6], atol=2e-3)


def test_state_is_at_most_35_percent_of_adamw_at_rank_d_over_4():
  d = 256
  params = {"w": jnp.zeros((d, d)), "v": jnp.zeros((d, 2 * d))}
  adam = optax.adamw(1e-3).init(params)
  ours = gl.galore_adamw(1e-3, rank=d // 4).init(params)
  fp32_proj = gl.galore_adamw(1e-3, rank=d // 4, projector_dtype=jnp.float32).init(params)
  from lowrank_jax.tree import count_bytes
  ratio = count_bytes(ours) / count_bytes(adam)
  assert ratio <= 0.35, ratio
  # closed form: square d x d: 2 d r fp32 moments + d r bf16 projector vs 2 d^2 fp32
  sq = gl.galore_adamw(1e-3, rank=d // 4).init({"w": jnp.zeros((d, d))})
  assert count_bytes(sq) - 8 == 2 * d * (d // 4) * 4 + d * (d // 4) * 2  # + 2 int32 counts
  assert count_bytes(fp32_proj) / count_bytes(adam) > ratio
  b = gl.galore_state_bytes(ours)
  assert b["projector"] == (d * (d // 4) + d * (d // 4)) * 2 and b["total"] == count_bytes(ours)


def test_leafwise_and_update_leaf_equal_whole_tree():
  params = _rand_tree(jax.random.PRNGKey(0), SHAPES)
  tx = gl.galore_adamw(1e-2, rank=3, update_proj_gap=2, weight_decay=0.1)
  lw = leafwise(tx)
  s_whole, s_lw, s_one = tx.init(params), lw.init(params), lw.init(params)
  p_whole = p_lw = p_one = params
  leaf_step = jax.jit(lw.update_leaf, static_argnums=0)
  whole_step = jax.jit(tx.update)
  for t in range(4):
    g = _rand_tree(jax.random.PRNGKey(100 + t), SHAPES)
    u, s_whole = whole_step(g, s_whole, p_whole)
    p_whole = optax.apply_updates(p_whole, u)
    u, s_lw = jax.jit(lw.update)(g, s_lw, p_lw)
    p_lw = optax.apply_updates(p_lw, u)
    new = {}
    for path in ("bias", "w_tall", "w_wide"):  # one layer at a time, e.g. from a loop over layers
      ul, s_one = leaf_step(path, g[path], s_one, p_one[path])
      new[path] = p_one[path] + ul
    p_one = new
  chex.assert_trees_all_close(p_lw, p_whole, atol=1e-6)
  chex.assert_trees_all_close(p_one, p_whole, atol=1e-6)
  with pytest.raises(KeyError, match="nope"):
    lw.update_leaf("nope", g["bias"], s_one)


def test_map_layers_equals_independent_per_layer_optimizers():
  L = 3
  params = {"k": jax.random.normal(jax.random.PRNGKey(0), (L, 12, 6))}
  tx = gl.galore_adamw(1e-2, rank=2, update_proj_gap=2)
  stacked = map_layers(tx, axis_size=L)
  s = stacked.init(params)
  per = [tx.init({"k": params["k"][i]}) for i in range(L)]
  p, pl = params, [{"k": params["k"][i]} for i in range(L)]
  one = jax.jit(tx.update)
  for t in range(3):
    g = {"k": jax.random.normal(jax.random.PRNGKey(t + 1), (L, 12, 6))}
    u, s = jax.jit(stacked.update)(g, s, p)
    p = optax.apply_updates(p, u)
    for i in range(L):
      ui, per[i] = one(({"k": g["k"][i]}), per[i], pl[i])
      pl[i] = optax.apply_updates(pl[i], ui)
  chex.assert_trees_all_close(p["k"], jnp.stack([q["k"] for q in pl]), atol=1e-6)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_params_and_grads(axis_type):
  """FSDP-style sharded weights: the SVD refresh gathers (optax.contrib.galore raises a
  ShardingTypeError under an explicit mesh); results equal the unsharded run."""
  if len(jax.devices()) < 2:
    pytest.skip("needs >= 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  from jax.sharding import NamedSharding, PartitionSpec as P
  n = 2 if len(jax.devices()) < 4 else 4
  mesh = jax.make_mesh((n,), ("fsdp",), devices=jax.devices()[:n],
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  shapes = {"w": (32, 16), "v": (16, 40), "b": (16,)}
  params = _rand_tree(jax.random.PRNGKey(0), shapes)
  specs = {"w": P("fsdp", None), "v": P(None, "fsdp"), "b": P("fsdp")}
  shard = {k: NamedSharding(mesh, specs[k]) for k in shapes}
  tx = gl.galore_adamw(1e-2, rank=4, update_proj_gap=2, weight_decay=0.01)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p_sh = jax.device_put(params, shard)
  s_sh = tx.init(p_sh)
  p_ref, s_ref = params, tx.init(params)
  jstep, ref_step = jax.jit(step), jax.jit(step)
  for t in range(3):
    g = _rand_tree(jax.random.PRNGKey(t + 5), shapes)
    p_sh, s_sh = jstep(p_sh, s_sh, jax.device_put(g, shard))
    p_ref, s_ref = ref_step(p_ref, s_ref, g)
  chex.assert_trees_all_close(jax.device_get(p_sh), p_ref, atol=1e-5)
  assert p_sh["w"].sharding.spec == specs["w"] or len(p_sh["w"].sharding.device_set) == n


def test_where_that_matches_nothing_raises_with_the_paths():
  params = {"enc": {"kernel": {"w": jnp.ones((8, 4))}}, "bias": jnp.zeros((4,))}
  tx = gl.galore_adamw(1e-3, rank=2, where=r"enc/kernel$")
  with pytest.raises(ValueError, match="enc/kernel/w"):
    tx.init(params)
