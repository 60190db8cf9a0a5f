"""The generic train step: gradients only w.r.t. phi, regularizer hook, donation, batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lj
from lowrank_jax import train


def _setup():
  theta0 = {"w": jax.random.normal(jax.random.key(0), (6, 4))}
  batch = {"x": jax.random.normal(jax.random.key(1), (8, 6)), "y": jnp.arange(8) % 4}
  reparam = lj.lora("w", rank=2)
  phi = jax.tree.map(lambda a: a + 0.1, reparam.init(jax.random.key(2), theta0))

  def loss_fn(theta, b, rng):
    return train.softmax_cross_entropy(lj.dot(b["x"], theta["w"]), b["y"])
  return theta0, batch, reparam, phi, loss_fn


def test_step_equals_manual_sgd_and_regularizer():
  theta0, batch, reparam, phi, loss_fn = _setup()
  reg = lambda p: 0.5 * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  step = train.make_train_step(reparam, optax.sgd(0.1), loss_fn, regularizer=reg, donate=False)
  new_phi, _, m = step(phi, optax.sgd(0.1).init(phi), theta0, batch, None)

  def total(p):
    return loss_fn(lj.materialize(reparam.apply(theta0, p)), batch, None)[0] + reg(p)
  g = jax.grad(total)(phi)
  chex.assert_trees_all_close(new_phi, jax.tree.map(lambda p, d: p - 0.1 * d, phi, g), atol=1e-6)
  np.testing.assert_allclose(m["regularizer"], reg(phi), rtol=1e-6)
  np.testing.assert_allclose(m["loss"], total(phi) - reg(phi), rtol=1e-6)
  np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(g), rtol=1e-5)


def test_batches_cover_and_shuffle():
  data = {"a": np.arange(10), "b": np.arange(10) * 2}
  out = list(train.batches(data, 3))
  assert [len(b["a"]) for b in out] == [3, 3, 3]
  out = list(train.batches(data, 3, rng=np.random.default_rng(0), drop_last=False))
  assert sorted(np.concatenate([b["a"] for b in out]).tolist()) == list(range(10))
  assert all((b["b"] == 2 * b["a"]).all() for b in out)
  assert train.peak_rss_bytes() > 10 * 2**20


def test_step_timer_skips_warmup_and_falls_back():
  timer = train.StepTimer(warmup=2)
  assert np.isnan(timer.median)
  fn = lambda x: x + 1
  timer.time(fn, jnp.zeros(()))
  assert timer.times == [] and np.isnan(timer.median)
  timer.time(fn, jnp.zeros(()))
  assert timer.times == timer.all_times[1:] and timer.median == timer.all_times[1]
  for _ in range(3):
    timer.time(fn, jnp.zeros(()))
  assert len(timer.all_times) == 5 and timer.times == timer.all_times[2:]
  assert timer.median == float(np.median(timer.all_times[2:]))


def test_check_finite_flags_non_finite_loss_gradients_or_parameters():
  theta0, batch, reparam, phi, loss_fn = _setup()
  ok = train.make_train_step(reparam, optax.sgd(0.1), loss_fn, donate=False, check_finite=True)
  assert bool(ok(phi, optax.sgd(0.1).init(phi), theta0, batch, None)[2]["finite"])
  blowup = optax.scale(float("inf"))
  huge = train.make_train_step(reparam, blowup, loss_fn, donate=False, check_finite=True)
  _, _, m = huge(phi, blowup.init(phi), theta0, batch, None)
  assert np.isfinite(m["loss"]) and not bool(m["finite"])  # the update overflowed the parameters
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), phi)
  assert not bool(ok(bad, optax.sgd(0.1).init(bad), theta0, batch, None)[2]["finite"])
  assert "finite" not in train.make_train_step(reparam, optax.sgd(0.1), loss_fn, donate=False)(
      phi, optax.sgd(0.1).init(phi), theta0, batch, None)[2]
  assert bool(train.all_finite({"a": jnp.ones(2), "n": jnp.arange(3)})) and bool(train.all_finite({}))
