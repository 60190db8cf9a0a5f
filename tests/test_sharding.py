"""Sharded training steps equal unsharded ones (8 fake CPU devices in CI)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj
from lowrank_jax import sharding, train

needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices "
                             "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def test_make_mesh_parsing():
  n = len(jax.devices())
  mesh = sharding.make_mesh("data:1,model:-1")
  assert mesh.shape == {"data": 1, "model": n}
  with pytest.raises(ValueError, match=f"needs {2 * n} devices, {n} available"):
    sharding.make_mesh(f"a:{n * 2}")
  with pytest.raises(ValueError, match="expected 'name:size'"):
    sharding.make_mesh("data")


def _mlp_setup(key):
  k = jax.random.split(key, 4)
  theta0 = {"l1": {"kernel": jax.random.normal(k[0], (32, 64)) / 6, "bias": jnp.zeros(64)},
            "l2": {"kernel": jax.random.normal(k[1], (64, 16)) / 8, "bias": jnp.zeros(16)}}
  batch = {"x": jax.random.normal(k[2], (16, 32)), "y": jax.random.randint(k[3], (16,), 0, 16)}
  return theta0, batch


def _loss(theta, batch, rng):
  h = jax.nn.gelu(lj.dot(batch["x"], theta["l1"]["kernel"]) + theta["l1"]["bias"])
  logits = lj.dot(h, theta["l2"]["kernel"]) + theta["l2"]["bias"]
  return train.softmax_cross_entropy(logits, batch["y"])


@needs_8
def test_sharded_lora_step_matches_unsharded():
  theta0, batch = _mlp_setup(jax.random.key(0))
  reparam = lj.lora(r"kernel", rank=4, alpha=8)
  phi = jax.tree.map(lambda a: a + 0.01, reparam.init(jax.random.key(1), theta0))
  opt = optax.sgd(0.1, momentum=0.9)  # linear in the gradients: no amplification of rounding
  step = train.make_train_step(reparam, opt, _loss, donate=False)
  ref_phi, ref_state = phi, opt.init(phi)
  for _ in range(3):
    ref_phi, ref_state, ref_m = step(ref_phi, ref_state, theta0, batch, None)

  mesh = sharding.make_mesh("data:2,model:4")
  specs = sharding.partition_specs(theta0, [(r"l1/kernel", P(None, "model")), (r"l1/bias", P("model")),
                                            (r"l2/kernel", P("model", None))], mesh)
  t0 = sharding.shard(theta0, specs, mesh)
  pspecs = sharding.phi_specs(phi, theta0, specs)
  assert pspecs["l1"]["kernel"]["b"] == P(None, "model") and pspecs["l1"]["kernel"]["a"] == P()
  assert pspecs["l2"]["kernel"]["a"] == P("model", None)
  sphi = sharding.shard(phi, pspecs, mesh)
  sstate = sharding.like(opt.init(phi), phi, pspecs, mesh)
  assert sstate[0].trace["l1"]["kernel"]["b"].sharding.spec == P(None, "model")
  sbatch = sharding.shard(batch, {"x": P("data"), "y": P("data")}, mesh)
  for _ in range(3):
    sphi, sstate, m = step(sphi, sstate, t0, sbatch, None)
  chex.assert_trees_all_close(sphi, ref_phi, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
  # the compiled step kept the adapter factor sharded like its base weight's output axis
  assert sphi["l1"]["kernel"]["b"].sharding.spec == P(None, "model")


@needs_8
def test_fsdp_specs_and_errors():
  mesh = sharding.make_mesh("fsdp:8")
  tree = {"big": jnp.zeros((8 * 300, 64)), "small": jnp.zeros(10), "odd": jnp.zeros((129, 131))}
  specs = sharding.fsdp_specs(tree, mesh, min_size=1000)
  assert specs == {"big": P("fsdp"), "small": P(), "odd": P()}
  placed = sharding.shard(tree, specs, mesh)
  assert placed["big"].addressable_shards[0].data.shape == (300, 64)
  with pytest.raises(ValueError, match=r"leaf 'odd' of shape \(129, 131\): axis 0"):
    sharding.partition_specs(tree, [("odd", P("fsdp"))], mesh)
