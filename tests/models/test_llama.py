"""Llama-style decoder (models.llama, aliases over models.decoder): causality, RoPE in closed
form, GQA, parameter count, lazy weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import tree as tree_lib
from lowrank_jax.models import llama

CFG = llama.LlamaConfig.tiny()
fwd = jax.jit(llama.llama_forward, static_argnums=(1,),
              static_argnames=("remat", "attention_impl"))


@pytest.fixture(scope="module")
def params():
  return llama.init_llama(jax.random.PRNGKey(0), CFG)


def _tokens(b=2, t=12, seed=0):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t))


def test_shapes_and_count(params):
  tokens = _tokens()
  logits = fwd(params, CFG, tokens)
  assert logits.shape == (2, 12, CFG.vocab_size) and logits.dtype == jnp.float32
  assert tree_lib.count_params(params) == llama.llama_param_count(CFG)
  paths = set(tree_lib.leaf_paths(params))
  assert "layers/layer_1/attention/q_proj/kernel" in paths and "lm_head/kernel" in paths
  assert params["layers"]["layer_0"]["attention"]["k_proj"]["kernel"].shape == (64, 2 * 16)
  tied = dataclasses.replace(CFG, tie_word_embeddings=True)
  p_tied = llama.init_llama(jax.random.PRNGKey(0), tied, jnp.bfloat16)
  assert "lm_head" not in p_tied
  assert tree_lib.count_params(p_tied) == llama.llama_param_count(tied)
  out = fwd(p_tied, tied, tokens)
  assert out.shape == (2, 12, CFG.vocab_size) and out.dtype == jnp.float32   # decoder logits are float32
  # Tied head: logits = h @ E^T.
  h = jax.jit(llama.llama_hidden, static_argnums=1)(p_tied, tied, tokens)
  ref = h.astype(jnp.float32) @ p_tied["embed_tokens"]["embedding"].astype(jnp.float32).T
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.05, rtol=0.05)


def test_causal_masking(params):
  tokens = _tokens(b=1, t=10)
  base = np.asarray(fwd(params, CFG, tokens))
  j = 6
  changed = tokens.copy()
  changed[0, j] = (changed[0, j] + 1) % CFG.vocab_size
  out = np.asarray(fwd(params, CFG, changed))
  np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-6)
  assert np.abs(out[:, j:] - base[:, j:]).max(axis=-1).min() > 1e-6


def test_rope_closed_form():
  """Rotate-half RoPE == multiplying z_j = x_j + i x_{j+hd/2} by exp(i t theta^(-2j/hd))."""
  rng = np.random.default_rng(1)
  t, h, hd = 9, 3, 8
  x = rng.normal(size=(2, t, h, hd)).astype(np.float32)
  pos = np.arange(t) + 5
  cos, sin = llama.rope_angles(pos, hd, 10000.0)
  out = np.asarray(llama.rope(jnp.asarray(x), cos, sin))
  w = 10000.0 ** (-np.arange(hd // 2) * 2.0 / hd)
  z = (x[..., : hd // 2] + 1j * x[..., hd // 2:]) * np.exp(1j * pos[:, None] * w)[None, :, None, :]
  ref = np.concatenate([z.real, z.imag], axis=-1)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  # Norm preserved; dot products depend only on the relative offset.
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  q, k = rng.normal(size=(1, 1, 1, hd)), rng.normal(size=(1, 1, 1, hd))
  def score(m, n):
    cq, sq = llama.rope_angles(np.array([m]), hd)
    ck, sk = llama.rope_angles(np.array([n]), hd)
    return float(jnp.sum(llama.rope(jnp.asarray(q, jnp.float32), cq, sq)
                         * llama.rope(jnp.asarray(k, jnp.float32), ck, sk)))
  assert abs(score(7, 3) - score(104, 100)) < 1e-4


def test_gqa_equals_repeated_kv_heads(params):
  """K shared key/value heads == H heads whose k/v kernels repeat each group's head."""
  tokens = _tokens()
  full_cfg = dataclasses.replace(CFG, num_kv_heads=None)
  g = CFG.num_heads // CFG.kv_heads
  hd = CFG.dim_head
  p = jax.tree.map(lambda x: x, params)
  for i in range(CFG.num_layers):
    att = p["layers"][f"layer_{i}"]["attention"]
    for name in ("k_proj", "v_proj"):
      w = att[name]["kernel"].reshape(CFG.hidden_size, CFG.kv_heads, hd)
      att[name] = {"kernel": jnp.repeat(w, g, axis=1).reshape(CFG.hidden_size, CFG.num_heads * hd)}
  np.testing.assert_allclose(np.asarray(fwd(p, full_cfg, tokens)),
                             np.asarray(fwd(params, CFG, tokens)), atol=1e-5)


def test_impls_remat_and_padding(params):
  tokens = _tokens()
  a = fwd(params, CFG, tokens, attention_impl="dpa")
  b = fwd(params, CFG, tokens, attention_impl="einsum", remat=True)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Left padding masked out: the real tokens' logits equal those of the unpadded sequence
  # when positions are given explicitly.
  real = tokens[:1, 4:]
  mask = np.ones_like(tokens[:1])
  mask[:, :4] = 0
  pos = np.maximum(np.arange(tokens.shape[1]) - 4, 0)
  padded = fwd(params, CFG, tokens[:1], attention_mask=mask, positions=pos)
  np.testing.assert_allclose(np.asarray(padded[:, 4:]), np.asarray(fwd(params, CFG, real)), atol=1e-5)


def test_lora_lazy_equals_materialised(params):
  tokens = _tokens()
  r = lj.lora(where=r"(q_proj|v_proj|down_proj)/kernel", rank=4, alpha=8)
  phi = r.init(jax.random.PRNGKey(1), params)
  phi = jax.tree.map(lambda x: x + 0.05, phi)  # b != 0
  theta = r.apply(params, phi)
  assert isinstance(theta["layers"]["layer_0"]["mlp"]["down_proj"]["kernel"], lj.LoRAWeight)
  lazy_out = fwd(theta, CFG, tokens)
  dense_out = fwd(lj.materialize(theta), CFG, tokens)
  np.testing.assert_allclose(np.asarray(lazy_out), np.asarray(dense_out), atol=1e-5)
  assert float(jnp.abs(lazy_out - fwd(params, CFG, tokens)).max()) > 1e-4


def test_1b_config_abstract():
  cfg = llama.LlamaConfig.llama_1b()
  abstract = jax.eval_shape(lambda k: llama.init_llama(k, cfg, jnp.bfloat16), jax.random.PRNGKey(0))
  n = tree_lib.count_params(abstract)
  assert n == llama.llama_param_count(cfg) == 1_100_048_384  # TinyLlama-1.1B
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(abstract))
  logits = jax.eval_shape(lambda p: llama.llama_forward(p, cfg, jnp.zeros((1, 16), jnp.int32)), abstract)
  assert logits.shape == (1, 16, 32000)


def test_config_validation():
  with pytest.raises(ValueError, match="divisible"):
    llama.LlamaConfig(hidden_size=64, num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="even"):
    llama.LlamaConfig(hidden_size=60, num_heads=4)
