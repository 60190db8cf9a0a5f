"""Decoder families against transformers' logits (tests/golden/decoders, made by its
make_decoders.py), and the decoder's own semantics: packing, prefixes, adapters, MoE."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import tree as tree_lib
from lowrank_jax.io.hf import unflatten
from lowrank_jax.models import decoder, hf_decoder
from lowrank_jax.models.decoder import DecoderConfig

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "decoders"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "qwen3_moe", "mixtral"]
fwd = jax.jit(decoder.decoder_forward, static_argnums=(1,), static_argnames=("remat", "attention_impl"))


@pytest.fixture(scope="module")
def loaded():
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = hf_decoder.load_pretrained(GOLDEN / name)
    return cache[name]
  return get


def _golden(name):
  return dict(np.load(GOLDEN / f"{name}.npz"))


def _max_diff(out, g, key="logits"):
  m = g["attention_mask"].astype(bool)
  return float(np.abs(np.asarray(out) - g[key])[m].max())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family, loaded):
  """float32, batch 3 (no / left / right padding), GQA 4:2, windows of 4 < 12 tokens."""
  config, params = loaded(family)
  assert config.family == family and config.num_kv_heads < config.num_heads
  g = _golden(family)
  out = fwd(params, config, g["input_ids"], attention_mask=g["attention_mask"])
  assert out.dtype == jnp.float32 and out.shape == g["logits"].shape
  assert _max_diff(out, g) < 1e-5
  assert np.abs(g["logits"]).max() > 1.0   # not a degenerate reference


# Each golden model exercises its family's switches: turning one off changes the logits.
SWITCHES = [
  ("llama", dict(rope_scaling=None)),
  ("llama", dict(qkv_bias=False, o_bias=False, mlp_bias=False)),
  ("mistral", dict(sliding_window=None)),
  ("qwen2", dict(layer_types=None, sliding_window=None)),
  ("qwen3", dict(rms_norm_eps=1e-2)),
  ("gemma", dict(scale_embeddings=False)),
  ("gemma2", dict(attn_logit_softcapping=None)),
  ("gemma2", dict(final_logit_softcapping=None)),
  ("gemma2", dict(query_pre_attn_scalar=None)),
  ("gemma2", dict(layer_types=("full_attention",) * 2)),
  ("gemma3", dict(rope_local_theta=None)),
  ("gemma3", dict(rope_scaling=None)),
  ("qwen3_moe", dict(norm_topk_prob=False)),
  ("mixtral", dict(num_experts_per_tok=1)),
]


@pytest.mark.parametrize("family,change", SWITCHES, ids=[f"{f}-{'-'.join(c)}" for f, c in SWITCHES])
def test_switches_matter(family, change, loaded):
  config, params = loaded(family)
  params = _drop_unused(params, dataclasses.replace(config, **change))
  g = _golden(family)
  out = fwd(params, dataclasses.replace(config, **change), g["input_ids"],
                                attention_mask=g["attention_mask"])
  assert _max_diff(out, g) > 1e-2


def _drop_unused(params, config):
  shapes = decoder.param_shapes(config)
  flat = {p: x for p, x in tree_lib.flatten_with_paths(params) if p in shapes}
  return unflatten(flat)


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_rope_scaling_variants(kind, loaded):
  """Same weights under linear and dynamic NTK scaling (positions past max_position_embeddings)."""
  _, params = loaded("llama")
  variants = json.loads((GOLDEN / "llama_rope_variants.json").read_text())
  config = DecoderConfig.from_hf(variants[kind])
  assert config.rope_scaling.rope_type == kind
  g = _golden("llama")
  out = fwd(params, config, g["input_ids"], attention_mask=g["attention_mask"])
  assert _max_diff(out, g, f"logits_{kind}") < 1e-5
  assert _max_diff(out, g, "logits") > 1e-2


def test_bfloat16_folder():
  g = _golden("llama_bf16")
  config, params = hf_decoder.load_pretrained(GOLDEN / "llama_bf16")
  leaves = jax.tree.leaves(params)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  # float32 compute on the stored bf16 weights equals transformers' float32 run of them.
  _, p32 = hf_decoder.load_pretrained(GOLDEN / "llama_bf16", dtype=jnp.float32)
  for a, b in zip(leaves, jax.tree.leaves(p32)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
  out32 = fwd(p32, config, g["input_ids"], attention_mask=g["attention_mask"])
  assert _max_diff(out32, g, "logits_f32") < 1e-5
  # bf16 compute follows transformers' bf16 run to bf16 accuracy.
  out16 = fwd(params, config, g["input_ids"], attention_mask=g["attention_mask"])
  assert out16.dtype == jnp.float32
  assert _max_diff(out16, g, "logits") < 0.15 * np.abs(g["logits"]).max()


def test_sharded_folder_is_read_through_its_index():
  assert (GOLDEN / "qwen2" / "model.safetensors.index.json").exists()
  assert not (GOLDEN / "qwen2" / "model.safetensors").exists()
  files = {s.files[0] for s in hf_decoder.checkpoint_plan(GOLDEN / "qwen2")[1]}
  assert len(files) > 1


def test_leaf_source_slices_match_the_full_leaf():
  """The per-leaf reads a sharded loader uses: a slice in our layout == slicing the leaf."""
  config, sources = hf_decoder.checkpoint_plan(GOLDEN / "qwen3_moe")
  by_path = {s.path: s for s in sources}
  for path, index in [("layers/layer_0/attention/q_proj/kernel", (slice(8, 40), slice(16, 48))),
                      ("layers/layer_1/mlp/experts/down_proj/kernel", (slice(1, 3), slice(4, 12))),
                      ("embed_tokens/embedding", (slice(100, 130),))]:
    src = by_path[path]
    full = src.read()
    part = src.read(jnp.bfloat16, index)
    np.testing.assert_array_equal(part, full[index].astype(jnp.bfloat16))
    assert part.dtype == jnp.bfloat16


# --------------------------------------------------------------------------- semantics


def _tiny(family="llama", **kw):
  base = dict(family=family, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=64, init_std=0.2)
  return DecoderConfig(**{**base, **kw})


TINY = {
  "llama": _tiny(),
  "mistral": _tiny("mistral", sliding_window=3),
  "gemma2": _tiny("gemma2", norm_plus_one=True, scale_embeddings=True, sandwich_norms=True,
                  attn_logit_softcapping=2.0, final_logit_softcapping=5.0, sliding_window=3,
                  layer_types=("sliding_attention", "full_attention"), hidden_act="gelu_pytorch_tanh"),
  "qwen3_moe": _tiny("qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_packed_segments_equal_separate_sequences(name):
  c = TINY[name]
  params = decoder.init_decoder(jax.random.key(0), c)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, c.vocab_size, (1, 5)), rng.integers(0, c.vocab_size, (1, 4))
  packed = np.concatenate([a, b, np.zeros((1, 2), np.int64)], axis=1)
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 2])
  out = fwd(params, c, packed, segment_ids=seg)
  np.testing.assert_allclose(out[:, :5], fwd(params, c, a), atol=2e-5)
  np.testing.assert_allclose(out[:, 5:9], fwd(params, c, b), atol=2e-5)
  np.testing.assert_array_equal(decoder.default_positions(packed, segment_ids=seg),
                                [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]])


def test_padding_and_impls_agree():
  c = TINY["mistral"]
  params = decoder.init_decoder(jax.random.key(1), c)
  ids = np.random.default_rng(1).integers(0, c.vocab_size, (2, 9))
  mask = np.ones_like(ids)
  mask[0, :3] = 0
  base = fwd(params, c, ids, attention_mask=mask)
  for impl in ("einsum", "vjp", "dpa"):
    np.testing.assert_allclose(fwd(params, c, ids, attention_mask=mask, attention_impl=impl), base, atol=1e-5)
  np.testing.assert_allclose(fwd(params, c, ids, attention_mask=mask, remat=True), base, atol=1e-5)
  # Left padding: the real tokens see what the unpadded sequence sees.
  np.testing.assert_allclose(base[0, 3:], fwd(params, c, ids[:1, 3:])[0], atol=1e-5)


def _layer0_kv(params, c, ids):
  """Post-RoPE keys/values of layer 0 computed by hand (what a KV cache holds)."""
  p = params["layers"]["layer_0"]
  x = jnp.take(params["embed_tokens"]["embedding"], ids, axis=0)
  h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + c.rms_norm_eps) * p["input_norm"]["scale"]
  k = (h @ p["attention"]["k_proj"]["kernel"]).reshape(*ids.shape, c.num_kv_heads, c.head_dim)
  v = (h @ p["attention"]["v_proj"]["kernel"]).reshape(*ids.shape, c.num_kv_heads, c.head_dim)
  cos, sin = decoder.rope_angles(jnp.arange(ids.shape[1]), c.head_dim, c.rope_theta)
  return decoder.rope(k, cos, sin)[0], v[0]


def test_prefix_slot_is_a_kv_cache():
  """A 1-layer model: prefix = the cached k/v of the first tokens, positions continuing,
  gives the logits of the full sequence."""
  c = _tiny(num_layers=1)
  params = decoder.init_decoder(jax.random.key(2), c)
  ids = np.random.default_rng(2).integers(0, c.vocab_size, (1, 10))
  full = fwd(params, c, ids)
  k, v = _layer0_kv(params, c, ids[:, :4])
  with_prefix = jax.tree.map(lambda x: x, params)
  with_prefix["layers"]["layer_0"]["prefix"] = {"key": k, "value": v}
  out = fwd(with_prefix, c, ids[:, 4:], positions=np.arange(4, 10))
  np.testing.assert_allclose(out, full[:, 4:], atol=2e-5)
  mask = np.ones((1, 6), np.int64)   # the prefix is attended whatever the padding mask says
  mask[0, :2] = 0
  out = fwd(with_prefix, c, ids[:, 4:], attention_mask=mask, positions=np.arange(4, 10))
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("slot,kernel", [("attention_adapter", "attention/o_proj"), ("output_adapter", "mlp/down_proj")])
def test_adapter_slots(slot, kernel):
  """With down = [I, -I], up = [sI; -sI] and ReLU, the adapter is h -> (1 + s) h: the same
  as scaling the sub-layer's output projection by (1 + s)."""
  c = _tiny()
  params = decoder.init_decoder(jax.random.key(3), c)
  d, s = c.hidden_size, 0.7
  eye = np.eye(d, dtype=np.float32)
  adapter = {"down": {"kernel": jnp.asarray(np.concatenate([eye, -eye], 1)), "bias": jnp.zeros(2 * d)},
             "up": {"kernel": jnp.asarray(np.concatenate([s * eye, -s * eye], 0)), "bias": jnp.zeros(d)}}
  with_adapter = jax.tree.map(lambda x: x, params)
  scaled = jax.tree.map(lambda x: x, params)
  for i in range(c.num_layers):
    with_adapter["layers"][f"layer_{i}"][slot] = adapter
    mod, name = kernel.split("/")
    w = scaled["layers"][f"layer_{i}"][mod][name]["kernel"]
    scaled["layers"][f"layer_{i}"][mod][name] = {"kernel": w * (1 + s)}
  ids = np.random.default_rng(3).integers(0, c.vocab_size, (2, 7))
  np.testing.assert_allclose(fwd(with_adapter, c, ids),
                             fwd(scaled, c, ids), atol=2e-5)


# --------------------------------------------------------------------------- MoE


def _dense_moe_reference(params, c, h):
  """Every expert on every token, weighted by the renormalised top-k router probabilities."""
  x = np.asarray(h, np.float64).reshape(-1, c.hidden_size)
  p = params
  logits = x @ np.asarray(p["router"]["kernel"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1)[:, :c.num_experts_per_tok]
  w = np.zeros_like(probs)
  np.put_along_axis(w, top, np.take_along_axis(probs, top, -1), -1)
  if c.norm_topk_prob:
    w /= w.sum(-1, keepdims=True)
  ex = {k: np.asarray(v["kernel"], np.float64) for k, v in p["experts"].items()}
  out = np.zeros_like(x)
  for e in range(c.num_experts):
    g, u = x @ ex["gate_proj"][e], x @ ex["up_proj"][e]
    out += w[:, e:e + 1] * ((g / (1 + np.exp(-g)) * u) @ ex["down_proj"][e])
  return out.reshape(np.shape(h))


@pytest.mark.parametrize("norm_topk", [True, False])
def test_moe_block_equals_dense_mixture(norm_topk):
  c = dataclasses.replace(TINY["qwen3_moe"], norm_topk_prob=norm_topk)
  params = decoder.init_decoder(jax.random.key(4), c)
  mlp = params["layers"]["layer_0"]["mlp"]
  h = jax.random.normal(jax.random.key(5), (2, 6, c.hidden_size))
  out = jax.jit(decoder._moe, static_argnums=(1, 3))(mlp, c, h, jax.nn.silu)
  np.testing.assert_allclose(out, _dense_moe_reference(mlp, c, h), atol=1e-5)


def test_moe_lora_on_expert_stacks():
  """lj.lora on the 3-d expert leaves (flattened view, in_ndim=2) runs through the expert
  matmul: lazy equals materialised, gradients reach the factors."""
  c = TINY["qwen3_moe"]
  params = decoder.init_decoder(jax.random.key(6), c)
  r = lj.lora(r"experts/(gate|up|down)_proj/kernel", rank=2, in_ndim=2)
  phi = jax.tree.map(lambda x: x + 0.1, r.init(jax.random.key(7), params))
  ids = np.random.default_rng(7).integers(0, c.vocab_size, (2, 5))
  theta = r.apply(params, phi)
  out = fwd(theta, c, ids)
  np.testing.assert_allclose(out, fwd(lj.materialize(theta), c, ids), atol=1e-5)
  assert float(jnp.abs(out - fwd(params, c, ids)).max()) > 1e-3
  grads = jax.jit(jax.grad(lambda phi: fwd(r.apply(params, phi), c, ids).sum()))(phi)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", sorted(TINY))
def test_init_count_and_jit(name):
  c = TINY[name]
  assert hash(c) == hash(dataclasses.replace(c))
  params = decoder.init_decoder(jax.random.key(0), c, jnp.bfloat16)
  assert tree_lib.count_params(params) == decoder.decoder_param_count(c)
  assert {p: tuple(x.shape) for p, x in tree_lib.flatten_with_paths(params)} == decoder.param_shapes(c)
  out = fwd(params, c, np.zeros((1, 4), np.int32))
  assert out.shape == (1, 4, c.vocab_size) and np.isfinite(np.asarray(out)).all()


def test_config_validation():
  with pytest.raises(ValueError, match="unknown decoder family 'gpt2'"):
    DecoderConfig(family="gpt2")
  with pytest.raises(ValueError, match="layer_types has 1 entries"):
    _tiny(layer_types=("full_attention",))
  with pytest.raises(ValueError, match="sliding_window"):
    _tiny(layer_types=("sliding_attention", "full_attention"))
  with pytest.raises(ValueError, match="num_experts_per_tok"):
    _tiny(num_experts=4, num_experts_per_tok=5)
  with pytest.raises(ValueError, match="unsupported RoPE scaling type 'yarn'"):
    _tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="cannot be written as a llama config.json: qk_norm"):
    _tiny(qk_norm=True).to_hf()


def test_slots_describe_the_decoder_layout():
  c = TINY["qwen3_moe"]
  s = decoder.slots(c)
  assert (s.family, s.num_layers, s.hidden_size, s.num_kv_heads, s.head_dim) == ("qwen3_moe", 2, 32, 2, 8)
  paths = decoder.param_shapes(c)
  for slot, anchor in [("attention_adapter", "layers/layer_1/attention/o_proj/kernel"),
                       ("output_adapter", "layers/layer_1/mlp/experts/down_proj/kernel"),
                       ("prefix", "layers/layer_1/attention/k_proj/kernel")]:
    assert anchor in paths and s.match(anchor, slot) == ("layers/layer_1", 1)
  assert s.prefix_shape(3, paths["layers/layer_0/attention/k_proj/kernel"][1]) == (3, 2, 8)
