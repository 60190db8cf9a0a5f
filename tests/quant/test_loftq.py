"""LoftQ: the error decreases with T and beats plain quantization at the same bits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.loftq import loftq, loftq_decompose
from lowrank_jax.quant.nf4 import nf4_encode
from lowrank_jax.quant.qlora import QuantizedWeight


def _lowrank_plus_noise(seed=0, d_in=128, d_out=192, r=8):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((d_in, r)) @ rng.standard_normal((r, d_out)) * 0.3
  return jnp.asarray(w + 0.05 * rng.standard_normal((d_in, d_out)), jnp.float32)


def test_error_decreases_with_iterations_and_beats_plain_quantization():
  w = _lowrank_plus_noise()
  plain = float(jnp.linalg.norm(w - nf4_encode(w, 64, False).decode()))
  errs = []
  for t in (1, 2, 4):
    q, a, b = loftq_decompose(w, rank=8, num_iter=t, scale=2.0)
    errs.append(float(jnp.linalg.norm(w - (q.decode() + 2.0 * a @ b))))
  assert errs[0] < plain
  assert errs[0] >= errs[1] >= errs[2] and errs[2] < errs[0]


def test_reparam_rewrites_base_and_matches_decomposition():
  theta = {"dense": {"kernel": _lowrank_plus_noise(1), "bias": jnp.zeros((192,))}}
  reparam = loftq(r"kernel$", rank=8, alpha=16, num_iter=2)
  base, phi = lj.initialize(reparam, jax.random.PRNGKey(0), theta)
  assert isinstance(base["dense"]["kernel"], QuantizedWeight)
  w_init = lj.materialize(reparam.apply(base, phi))["dense"]["kernel"]
  q, a, b = loftq_decompose(theta["dense"]["kernel"], 8, 2, scale=2.0)
  chex.assert_trees_all_close(w_init, q.decode() + 2.0 * a @ b, atol=1e-5)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 128))
  chex.assert_trees_all_close(lj.dot(x, reparam.apply(base, phi)["dense"]["kernel"]), x @ w_init,
                              atol=1e-4)


def test_old_module_paths_and_top_level_names():
  """LoftQ, QA-LoRA and L4Q moved to lowrank_jax.methods; the old quant.* paths are aliases."""
  from lowrank_jax.methods import l4q as l4q_mod, loftq as loftq_mod, qalora as qalora_mod
  from lowrank_jax.quant import l4q as old_l4q, loftq as old_loftq, qalora as old_qalora
  assert old_loftq.loftq is loftq_mod.loftq is lj.loftq
  assert old_loftq.loftq_decompose is loftq_decompose
  assert old_qalora.qalora is qalora_mod.qalora is lj.qalora
  assert old_qalora.qalora_merge is lj.qalora_merge and old_qalora.QALoRAWeight is qalora_mod.QALoRAWeight
  assert old_l4q.l4q is l4q_mod.l4q is lj.l4q and old_l4q.l4q_merge is lj.l4q_merge
  assert old_l4q.fake_quantize is l4q_mod.fake_quantize
  for mod in (old_loftq, old_qalora, old_l4q):
    assert all(getattr(mod, n) is not None for n in mod.__all__)


def test_unknown_codec_is_named_when_the_reparam_is_built():
  with pytest.raises(ValueError, match="unknown codec 'nf5'; did you mean 'nf4'"):
    loftq(r"kernel$", rank=4, codec="nf5")
