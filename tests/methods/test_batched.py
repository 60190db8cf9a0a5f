"""Per-matrix LoRA on expert stacks (methods.batched): one independent pair per expert,
against the dense per-expert formula, through the decoder's grouped expert matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.batched import BatchedWeight, batched_lora
from lowrank_jax.models import decoder

C = decoder.DecoderConfig(family="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, init_std=0.2)
fwd = jax.jit(decoder.decoder_forward, static_argnums=1)


@pytest.fixture(scope="module")
def setup():
  params = decoder.init_decoder(jax.random.key(0), C)
  r = batched_lora(r"(q_proj|experts/(gate|up|down)_proj)/kernel", rank=2, alpha=6.0)
  phi = r.init(jax.random.key(1), params)
  phi = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), phi)
  return params, r, phi


def test_layout_and_per_expert_formula(setup):
  params, r, phi = setup
  leaf = phi["layers"]["layer_0"]["mlp"]["experts"]["gate_proj"]["kernel"]
  assert leaf["a"].shape == (4, 32, 2) and leaf["b"].shape == (4, 2, 16)
  assert phi["layers"]["layer_0"]["attention"]["q_proj"]["kernel"]["a"].shape == (32, 2)
  # kaiming init per expert: the experts' A differ (independent keys), B starts at 0
  a0 = r.init(jax.random.key(1), params)["layers"]["layer_0"]["mlp"]["experts"]["down_proj"]["kernel"]
  assert float(jnp.abs(a0["a"][0] - a0["a"][1]).max()) > 0 and float(jnp.abs(a0["b"]).max()) == 0
  theta = r.apply(params, phi)
  w = theta["layers"]["layer_0"]["mlp"]["experts"]["gate_proj"]["kernel"]
  assert isinstance(w, BatchedWeight) and w.shape == (4, 32, 16)
  w0 = np.asarray(params["layers"]["layer_0"]["mlp"]["experts"]["gate_proj"]["kernel"], np.float64)
  ref = w0 + 3.0 * np.einsum("eir,ero->eio", np.asarray(leaf["a"], np.float64), np.asarray(leaf["b"], np.float64))
  np.testing.assert_allclose(lj.materialize(w), ref, atol=1e-6)
  x = jax.random.normal(jax.random.key(3), (4, 5, 32))
  np.testing.assert_allclose(w.matmul(x), np.einsum("end,edf->enf", x, ref), atol=1e-5)
  xs = jax.random.normal(jax.random.key(4), (9, 32))
  sizes = jnp.array([2, 0, 4, 3], jnp.int32)
  rows = np.repeat(np.arange(4), np.asarray(sizes))
  np.testing.assert_allclose(w.ragged_matmul(xs, sizes), np.einsum("nd,ndf->nf", xs, ref[rows]), atol=1e-5)


def test_decoder_lazy_equals_merged_and_grads(setup):
  params, r, phi = setup
  ids = np.random.default_rng(0).integers(0, C.vocab_size, (2, 6))
  theta = r.apply(params, phi)
  out = fwd(theta, C, ids)
  np.testing.assert_allclose(out, fwd(lj.merge(r, params, phi), C, ids), atol=1e-5)
  assert float(jnp.abs(out - fwd(params, C, ids)).max()) > 1e-3
  grads = jax.jit(jax.grad(lambda p: fwd(r.apply(params, p), C, ids).sum()))(phi)
  g = grads["layers"]["layer_1"]["mlp"]["experts"]["down_proj"]["kernel"]
  assert g["a"].shape == (4, 16, 2) and float(jnp.abs(g["b"]).max()) > 0
  back = lj.unmerge(r, lj.merge(r, params, phi), phi)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_rank_checked_per_matrix():
  params = decoder.init_decoder(jax.random.key(0), C)
  with pytest.raises(ValueError, match="rank 20 exceeds min\\(d_in, d_out\\) = 16"):
    batched_lora(r"experts/down_proj/kernel", rank=20).init(jax.random.key(0), params)


def test_rank_pattern_keeps_the_scale():
  """rank_pattern gives matching leaves another rank at the same scale s = alpha / r."""
  params = decoder.init_decoder(jax.random.key(0), C)
  r = batched_lora(r"(q_proj|experts/gate_proj)/kernel", rank=2, alpha=6.0, rank_pattern={r"experts/": 4})
  phi = r.init(jax.random.key(1), params)
  assert phi["layers"]["layer_0"]["mlp"]["experts"]["gate_proj"]["kernel"]["a"].shape == (4, 32, 4)
  assert phi["layers"]["layer_0"]["attention"]["q_proj"]["kernel"]["a"].shape == (32, 2)
  phi = jax.tree.map(lambda x: x + 0.05, phi)
  leaf = phi["layers"]["layer_1"]["mlp"]["experts"]["gate_proj"]["kernel"]
  w = lj.materialize(r.apply(params, phi)["layers"]["layer_1"]["mlp"]["experts"]["gate_proj"]["kernel"])
  w0 = params["layers"]["layer_1"]["mlp"]["experts"]["gate_proj"]["kernel"]
  np.testing.assert_allclose(w - w0, 3.0 * np.einsum("eir,ero->eio", leaf["a"], leaf["b"]), atol=1e-5)
