"""AdaLoRA against peft's golden data, peft's own RankAllocator, closed-form math and a
synthetic rank-allocation problem."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import lowrank_jax as lj
from lowrank_jax.methods import adalora as ad
from tests.conftest import load_golden
from tests.methods import peft_harness as H

PFX = "param/base_model.model.lin."
GPFX = "grad/base_model.model.lin."


def _golden():
  g, meta = load_golden("peft_adalora")
  theta0 = {"lin": {"kernel": jnp.asarray(g[PFX + "base_layer.weight"].T),
                    "bias": jnp.asarray(g[PFX + "base_layer.bias"])}}
  phi = {"lin": {"kernel": ad.from_peft(g[PFX + "lora_A.default"], g[PFX + "lora_E.default"],
                                        g[PFX + "lora_B.default"]),
                 "bias": None}}
  return g, meta["config"], theta0, phi


def _delta(g, cfg):
  """peft's SVDLinear update ``s·B (A ⊙ E)`` ``[out, in]``, in float64 from the stored params."""
  A, E, B = (np.asarray(g[PFX + f"lora_{n}.default"], np.float64) for n in "AEB")
  return B @ (A * E) * (cfg["lora_alpha"] / (cfg["init_r"] + 1e-5))


def test_matches_peft_golden():
  """``y``, gradients and merge (lazy and dense paths) against the golden file; its merge is
  peft's formula; :func:`ad.from_peft` / :func:`ad.to_peft` translate params and gradients."""
  g, cfg, theta0, phi = _golden()
  reparam = ad.adalora("lin/kernel", init_r=cfg["init_r"], alpha=cfg["lora_alpha"])
  H.assert_merge_is(g, _delta(g, cfg))
  spec = {f"lin/kernel/{n.lower()}": f"lora_{n.upper()}.default" for n in "aeb"}
  *_, phi_h = H.check_against_peft("peft_adalora", reparam, spec, lazy_type=lj.LoRAWeight)
  chex.assert_trees_all_equal(phi_h, phi)

  x, G = jnp.asarray(g["x"]), jnp.asarray(g["G"])
  grads = jax.grad(lambda phi: jnp.sum(H.forward(reparam.apply(theta0, phi), x) * G))(phi)
  ours = ad.to_peft(grads["lin"]["kernel"])
  for name in ("lora_A", "lora_E", "lora_B"):
    np.testing.assert_allclose(ours[name], g[GPFX + name + ".default"], rtol=1e-4, atol=1e-5)


def test_peft_itself_agrees():
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  g, cfg, theta0, phi = _golden()

  pm = H.peft_linear(peft.AdaLoraConfig(init_r=cfg["init_r"], target_r=cfg["target_r"],
                                      lora_alpha=cfg["lora_alpha"], total_step=100,
                                      target_modules=["lin"]))
  pm.load_state_dict({k[len("param/"):]: torch.tensor(v) for k, v in g.items()
                      if k.startswith("param/") and "ranknum" not in k}, strict=False)
  y_peft = pm(torch.tensor(g["x"])).detach().numpy()
  np.testing.assert_allclose(y_peft, g["y"], rtol=1e-5, atol=1e-5)
  reparam = ad.adalora("lin/kernel", init_r=cfg["init_r"], alpha=cfg["lora_alpha"])
  y = H.forward(reparam.apply(theta0, phi), jnp.asarray(g["x"]))
  np.testing.assert_allclose(y, y_peft, rtol=1e-5, atol=1e-5)


def test_init_is_identity_and_layout():
  theta0 = {"w": jax.random.normal(jax.random.key(0), (20, 12)), "v": jnp.ones(3)}
  r = ad.adalora("w", init_r=5)
  phi = r.init(jax.random.key(1), theta0)
  assert phi["v"] is None
  assert phi["w"]["a"].shape == (20, 5) and phi["w"]["e"].shape == (5,) and phi["w"]["b"].shape == (5, 12)
  np.testing.assert_allclose(np.std(np.asarray(phi["w"]["a"])), 0.02, rtol=0.2)
  chex.assert_trees_all_close(lj.merge(r, theta0, phi), theta0)
  with pytest.raises(ValueError, match="init_r 13 exceeds"):
    ad.adalora("w", init_r=13).init(jax.random.key(0), theta0)


@settings(max_examples=5, deadline=None)
@given(d_in=st.integers(2, 9), d_out=st.integers(2, 9), r=st.integers(1, 2), seed=st.integers(0, 99))
def test_lazy_matmul_equals_dense(d_in, d_out, r, seed):
  k = jax.random.split(jax.random.key(seed), 5)
  theta0 = {"w": jax.random.normal(k[0], (d_in, d_out))}
  phi = {"w": {"a": jax.random.normal(k[1], (d_in, r)), "e": jax.random.normal(k[2], (r,)),
               "b": jax.random.normal(k[3], (r, d_out))}}
  x = jax.random.normal(k[4], (3, d_in))
  s = 8.0 / (r + 1e-5)
  w = ad.adalora("w", init_r=r, alpha=8.0).apply(theta0, phi)["w"]
  dense = np.asarray(theta0["w"]) + s * (np.asarray(phi["w"]["a"]) * np.asarray(phi["w"]["e"])) @ np.asarray(phi["w"]["b"])
  np.testing.assert_allclose(lj.dot(x, w), np.asarray(x) @ dense, rtol=1e-4, atol=1e-4)


def test_orthogonal_regularizer_closed_form():
  k = jax.random.split(jax.random.key(0), 4)
  phi = {"l1": {"a": jax.random.normal(k[0], (10, 3)), "e": jnp.ones(3), "b": jax.random.normal(k[1], (3, 7))},
         "l2": None,
         "l3": {"a": jax.random.normal(k[2], (6, 2)), "e": jnp.ones(2), "b": jax.random.normal(k[3], (2, 5))}}
  norms, sq = [], []
  for n in ("l1", "l3"):
    Q = np.asarray(phi[n]["a"]).T           # peft lora_A [r, in]
    P = np.asarray(phi[n]["b"]).T           # peft lora_B [out, r]
    for M in (Q @ Q.T, P.T @ P):
      norms.append(np.linalg.norm(M - np.eye(M.shape[0]), "fro"))
      sq.append(norms[-1] ** 2)
  np.testing.assert_allclose(ad.orthogonal_regularizer(phi), np.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(ad.orthogonal_regularizer(phi, squared=True), np.mean(sq), rtol=1e-5)
  # orthonormal factors give zero
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 3)))
  orth = {"w": {"a": jnp.asarray(q), "e": jnp.ones(3), "b": jnp.asarray(q.T)}}
  assert float(ad.orthogonal_regularizer(orth)) < 1e-5


def test_budget_schedule_closed_form():
  # b0=12, bT=4, T=20, tinit=2, tfinal=4: span=14
  f = lambda t, dT=1: ad.budget_schedule(t, 12, 4, 20, 2, 4, dT)
  assert [int(f(t)[0]) for t in (0, 2)] == [12, 12] and not bool(f(2)[1])
  assert int(f(3)[0]) == int(8 * (1 - 1 / 14) ** 3 + 4) == 10
  assert int(f(9)[0]) == int(8 * 0.5 ** 3 + 4) == 5
  assert int(f(16)[0]) == 4 and int(f(17)[0]) == 4 and bool(f(17)[1])
  assert bool(f(4, 2)[1]) and not bool(f(5, 2)[1])
  # traced and concrete paths agree
  traced = jax.jit(lambda t: ad.budget_schedule(t, 12, 4, 20, 2, 4, 1))
  for t in range(0, 22):
    assert int(traced(t)[0]) == int(f(t)[0]), t


def _random_phi(rng, shapes, r):
  return {n: {"a": jnp.asarray(rng.normal(size=(i, r)), jnp.float32),
              "e": jnp.asarray(rng.normal(size=(r,)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(r, o)), jnp.float32)} for n, (i, o) in shapes.items()}


def test_rank_allocator_matches_peft():
  """Drives peft's AdaLoraModel.update_and_allocate and ours with the same params and grads."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  shapes = {"l1": (16, 12), "l2": (10, 14)}
  r, T, tinit, tfinal = 4, 12, 2, 3

  class M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.l1 = torch.nn.Linear(16, 12)
      self.l2 = torch.nn.Linear(10, 14)

  pm = peft.get_peft_model(M(), peft.AdaLoraConfig(init_r=r, target_r=2, lora_alpha=8, total_step=T,
                                                   tinit=tinit, tfinal=tfinal, deltaT=2,
                                                   target_modules=["l1", "l2"]))
  alloc = ad.rank_allocator(target_r=2, total_step=T, tinit=tinit, tfinal=tfinal, deltaT=2)
  rng = np.random.default_rng(0)
  phi = _random_phi(rng, shapes, r)
  state = alloc.init(phi)
  update = jax.jit(alloc.update)
  named = dict(pm.named_parameters())

  def tp(n, k):
    return named[f"base_model.model.{n}.lora_{k}.default"]

  for step in range(T + 2):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), phi)
    # the values after "optimizer.step()": perturb phi, then both allocators see them
    phi = jax.tree.map(lambda p, g: p - 0.05 * g, phi, grads)
    with torch.no_grad():
      for n in shapes:
        t = ad.to_peft(phi[n])
        tg = ad.to_peft(grads[n])
        for k in ("A", "E", "B"):
          tp(n, k).data.copy_(torch.tensor(np.asarray(t["lora_" + k])))
          tp(n, k).grad = torch.tensor(np.asarray(tg["lora_" + k]))
    pm.base_model.update_and_allocate(step)
    phi, state = update(state, phi, grads, step)
    for n in shapes:
      np.testing.assert_allclose(np.asarray(phi[n]["e"]), tp(n, "E").detach().numpy().ravel(),
                                 rtol=1e-6, atol=1e-7, err_msg=f"step {step} layer {n}")
    if step < T - tfinal:
      ra = pm.base_model.rankallocator
      for n in shapes:
        for k in ("A", "E", "B"):
          name = next(m for m in ra.exp_avg_ipt if m.endswith(f"{n}.lora_{k}.default"))
          ours = ad.to_peft(state.ipt[n])["lora_" + k]
          np.testing.assert_allclose(np.asarray(ours), ra.exp_avg_ipt[name].numpy(), rtol=1e-5, atol=1e-7)
  # final pattern: target_r * 2 layers = 4 triplets kept in all
  pattern = ad.rank_pattern(state)
  assert sum(sum(v) for v in pattern.values()) == 4
  assert set(pattern) == {"l1", "l2"}


def test_allocator_moves_rank_to_the_layer_that_needs_it():
  """Two layers whose target updates have true rank 1 and 5; budget 6 of 12 initial triplets."""
  d, r = 12, 6
  rng = np.random.default_rng(1)

  def low_rank(k):
    return (rng.normal(size=(d, k)) @ rng.normal(size=(k, d))).astype(np.float32) / np.sqrt(k)

  targets = {"easy": jnp.asarray(low_rank(1)), "hard": jnp.asarray(low_rank(5))}
  theta0 = {"easy": jnp.zeros((d, d)), "hard": jnp.zeros((d, d))}
  reparam = ad.adalora(["easy", "hard"], init_r=r, alpha=float(r))
  phi = reparam.init(jax.random.key(0), theta0)
  x = jnp.asarray(rng.normal(size=(64, d)), jnp.float32)
  T = 400
  alloc = ad.rank_allocator(target_r=3, total_step=T, tinit=100, tfinal=100, deltaT=10)
  opt = optax.adam(1e-2)

  def loss(phi):
    theta = lj.materialize(reparam.apply(theta0, phi))
    fit = sum(jnp.mean((x @ theta[n] - x @ targets[n]) ** 2) for n in targets)
    return fit + 0.1 * ad.orthogonal_regularizer(phi)

  @jax.jit
  def step_fn(phi, opt_state, alloc_state, step):
    l, g = jax.value_and_grad(loss)(phi)
    upd, opt_state = opt.update(g, opt_state, phi)
    phi = optax.apply_updates(phi, upd)
    phi, alloc_state = alloc.update(alloc_state, phi, g, step)
    return phi, opt_state, alloc_state, l

  opt_state, alloc_state = opt.init(phi), alloc.init(phi)
  for t in range(T):
    phi, opt_state, alloc_state, l = step_fn(phi, opt_state, alloc_state, t)
  kept = {n: int(np.sum(np.asarray(alloc_state.keep[n]))) for n in targets}
  assert kept["easy"] + kept["hard"] == 6
  assert kept["hard"] >= 4 and kept["easy"] <= 2, kept
  assert np.count_nonzero(np.asarray(phi["hard"]["e"])) == kept["hard"]
  # the masked model still fits the hard layer's rank-5 target well
  theta = lj.materialize(reparam.apply(theta0, phi))
  rel = float(jnp.linalg.norm(theta["hard"] - targets["hard"]) / jnp.linalg.norm(targets["hard"]))
  assert rel < 0.2, rel


def test_allocator_errors():
  with pytest.raises(ValueError, match="tinit < total_step - tfinal"):
    ad.rank_allocator(total_step=10, tinit=5, tfinal=5)
  with pytest.raises(ValueError, match="no AdaLoRA leaf"):
    ad.rank_allocator(total_step=10).init({"w": None})


def test_with_rank_allocator_equals_manual_loop():
  """The optax wrapper equals `tx.update; apply; allocator.update` done by hand, and leaves a head alone."""
  import optax
  from lowrank_jax.methods.adalora import adalora, rank_allocator, with_rank_allocator
  key = jax.random.key(0)
  theta0 = {"l1": {"kernel": jax.random.normal(key, (12, 10))}, "l2": {"kernel": jnp.ones((10, 8))},
            "head": jnp.ones((8, 3))}
  reparam = lj.chain(adalora(r"l\d/kernel", init_r=4, alpha=4), lj.full(r"^head$"))
  phi = jax.tree.map(lambda x: x + 0.1, reparam.init(jax.random.key(1), theta0))
  alloc = rank_allocator(target_r=2, total_step=6, tinit=1, tfinal=1)
  tx = optax.sgd(0.05)
  wrapped = with_rank_allocator(tx, alloc)
  x = jax.random.normal(jax.random.key(2), (5, 12))

  def loss(phi):
    t = reparam.apply(theta0, phi)
    return jnp.sum(jnp.tanh(lj.dot(lj.dot(x, t["l1"]["kernel"]), t["l2"]["kernel"]) @ t["head"]))

  s_w = wrapped.init(phi)
  p_w = phi
  p_m, s_tx, s_al = phi, tx.init(phi), alloc.init((phi[0],))
  for step in range(6):
    g = jax.grad(loss)(p_w)
    u, s_w = jax.jit(wrapped.update)(g, s_w, p_w)
    p_w = optax.apply_updates(p_w, u)
    g = jax.grad(loss)(p_m)
    u, s_tx = tx.update(g, s_tx, p_m)
    p_m = optax.apply_updates(p_m, u)
    masked, s_al = alloc.update(s_al, (p_m[0],), (g[0],), step)
    p_m = (masked[0], p_m[1])
  chex.assert_trees_all_close(p_w, p_m, atol=1e-6)
  kept = [int(k.sum()) for k in jax.tree.leaves(s_w.alloc.keep)]
  assert sum(kept) == 4  # the final budget: target_r x 2 layers
  assert not np.allclose(p_w[1]["head"]["w"], phi[1]["head"]["w"])  # the head trained normally
