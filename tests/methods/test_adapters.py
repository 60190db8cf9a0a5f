"""Bottleneck adapters: zero init is the identity, the adapted BERT and Llama decoder equal float64
numpy models with the adapters written out by hand, placements/layers/parameter count, gradients
reach only the adapters, and the reparam composes with lj.chain, lj.full, jit and optax."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax import train
from lowrank_jax.methods import adapters
from lowrank_jax.models import bert, llama, slots as slots_lib
from tests.methods.slots_reference import np_llama
from tests.models.bert_reference import np_bert, tiny_problem

CFG = bert.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=24, max_position_embeddings=32)
ATT, OUT = "attention/output/kernel", "output/kernel"


@pytest.fixture(scope="module")
def setup():
  params, ids, mask = tiny_problem(CFG, 0, (3, 6), {1: 4}, pooler=False)
  theta0 = {"bert": params, "head": bert.init_classifier(jax.random.PRNGKey(1), CFG.hidden_size, 3)}
  return theta0, ids, mask


def _layer(phi, i, kernel):
  node = phi["bert"]["encoder"][f"layer_{i}"]
  for k in kernel.split("/"):
    node = node[k]
  return node


def _randomize(phi, key):
  """Random values in every adapter leaf (the zero init would hide the up projection)."""
  leaves, treedef = jax.tree.flatten(phi)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


_bert = jax.jit(bert.bert_forward, static_argnums=1)


def _fwd(theta, ids, mask, cfg=CFG):
  return _bert(theta["bert"], cfg, ids, mask)


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_init_equals_base(setup, placement):
  theta0, ids, mask = setup
  reparam = lj.chain(adapters.bottleneck_adapters(placement, reduction_factor=4), lj.full(r"^head/"))
  phi = reparam.init(jax.random.PRNGKey(2), theta0)
  theta = reparam.apply(theta0, phi)
  up = _layer(phi[0], 0, OUT)["up"]
  assert not np.any(np.asarray(up["kernel"])) and not np.any(np.asarray(up["bias"]))
  assert float(jnp.std(_layer(phi[0], 0, OUT)["down"]["kernel"])) > 0
  np.testing.assert_allclose(np.asarray(_fwd(theta, ids, mask)), np.asarray(_fwd(theta0, ids, mask)),
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize("placement,act", [("houlsby", "relu"), ("pfeiffer", "relu"), ("houlsby", "tanh")])
def test_forward_matches_numpy_reference(setup, placement, act):
  theta0, ids, mask = setup
  cfg = dataclasses.replace(CFG, adapter_activation=act)
  reparam = adapters.bottleneck_adapters(placement, bottleneck=5)
  phi = _randomize(reparam.init(jax.random.PRNGKey(3), theta0), jax.random.PRNGKey(4))
  theta = jax.jit(reparam.apply)(theta0, phi)
  slots = {}
  for i in range(CFG.num_hidden_layers):
    slots[(i, "output")] = _layer(phi, i, OUT)
    if placement == "houlsby":
      slots[(i, "attention")] = _layer(phi, i, ATT)
  ref = np_bert(theta0["bert"], cfg, ids, mask, adapters_by_slot=slots, act=act)
  got = np.asarray(_fwd(theta, ids, mask, cfg))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], ref[valid], rtol=1e-4, atol=1e-4)
  # And the adapters are not a no-op here.
  assert np.abs(got - np.asarray(_fwd(theta0, ids, mask, cfg))).max() > 1e-2


def test_apply_inserts_subtrees_and_keeps_base_leaves(setup):
  theta0, _, _ = setup
  reparam = adapters.bottleneck_adapters("houlsby", reduction_factor=4)
  phi = reparam.init(jax.random.PRNGKey(0), theta0)
  theta = reparam.apply(theta0, phi)
  layer = theta["bert"]["encoder"]["layer_1"]
  assert layer["attention_adapter"] is _layer(phi, 1, ATT)
  assert layer["output_adapter"] is _layer(phi, 1, OUT)
  for path, x in lj.flatten_with_paths(theta0):
    node = theta
    for k in path.split("/"):
      node = node[k]
    assert node is x, path
  # theta0 itself is not modified.
  assert "output_adapter" not in theta0["bert"]["encoder"]["layer_1"]
  new = sorted(set(lj.leaf_paths(theta)) - set(lj.leaf_paths(theta0)))
  assert len(new) == 4 * 2 * CFG.num_hidden_layers
  assert all("_adapter/" in p for p in new)
  # unmerge removes exactly the inserted subtrees.
  back = reparam.unmerge(theta, phi)
  assert jax.tree.structure(back) == jax.tree.structure(theta0)


@pytest.mark.parametrize("placement,layers,n_per_layer", [("houlsby", None, 2), ("pfeiffer", None, 1),
                                                          ("houlsby", [1], 2), ("pfeiffer", [0, 2], 1)])
def test_placement_layers_and_param_count(setup, placement, layers, n_per_layer):
  theta0, _, _ = setup
  reparam = adapters.bottleneck_adapters(placement, reduction_factor=4, layers=layers)
  phi = reparam.init(jax.random.PRNGKey(0), theta0)
  theta = reparam.apply(theta0, phi)
  chosen = range(CFG.num_hidden_layers) if layers is None else layers
  for i in range(CFG.num_hidden_layers):
    node = theta["bert"]["encoder"][f"layer_{i}"]
    assert ("output_adapter" in node) == (i in chosen)
    assert ("attention_adapter" in node) == (i in chosen and placement == "houlsby")
  d, m = CFG.hidden_size, CFG.hidden_size // 4
  assert _layer(phi, chosen[0], OUT)["down"]["kernel"].shape == (d, m)
  assert _layer(phi, chosen[0], OUT)["up"]["kernel"].shape == (m, d)
  expected = len(chosen) * n_per_layer * (2 * d * m + m + d)
  assert lj.count_params(phi) == expected == len(chosen) * n_per_layer * adapters.adapter_param_count(d, m)


def test_bottleneck_size_and_minilm_count():
  assert adapters.bottleneck_size(384, 16) == 24
  assert adapters.bottleneck_size(384, 16, bottleneck=64) == 64
  assert adapters.bottleneck_size(8, 16) == 1
  # MiniLM-L6 shapes (D=384, 6 layers) via eval_shape: no weights needed.
  shapes = jax.eval_shape(lambda: bert.init_bert(jax.random.PRNGKey(0), bert.BertConfig(), pooler=False))
  phi = jax.eval_shape(lambda: adapters.bottleneck_adapters("houlsby").init(jax.random.PRNGKey(0), shapes))
  assert lj.count_params(phi) == 6 * 2 * (2 * 384 * 24 + 24 + 384)


def test_gradients_reach_only_adapters_and_train_step(setup):
  theta0, ids, mask = setup
  reparam = lj.chain(adapters.bottleneck_adapters("houlsby", bottleneck=3), lj.full(r"^head/"))
  phi = reparam.init(jax.random.PRNGKey(5), theta0)
  # The trainable tree holds only adapter and head leaves.
  trainable = [p for p, x in lj.flatten_with_paths(phi[0]) if x is not None] + \
              [p for p, x in lj.flatten_with_paths(phi[1]) if x is not None]
  assert trainable and all(("/down/" in p or "/up/" in p) or p.startswith("head/") for p in trainable)
  assert lj.count_params(phi[1]) == lj.count_params(theta0["head"])
  labels = jnp.array([0, 1, 2])

  def loss_fn(theta, batch, rng):
    h = bert.bert_forward(theta["bert"], CFG, batch["ids"], batch["mask"])
    return train.softmax_cross_entropy(bert.classifier_logits(theta["head"], h), batch["labels"])

  batch = {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask), "labels": labels}
  # At init W_up = 0, so only W_up, b_up (and the head) get gradient; W_down gets it once
  # W_up != 0. (A loss over all tokens, so that no ReLU unit is inactive on every token
  # that reaches the loss.)
  G = jax.random.normal(jax.random.PRNGKey(7), (3, 6, CFG.hidden_size))
  grad = jax.jit(jax.grad(lambda p: jnp.sum(G * _fwd(reparam.apply(theta0, p), ids, mask))))
  g = grad(phi)
  up = _layer(g[0], 0, ATT)["up"]
  assert float(jnp.abs(up["kernel"]).max()) > 0 and float(jnp.abs(up["bias"]).max()) > 0
  assert float(jnp.abs(_layer(g[0], 0, ATT)["down"]["kernel"]).max()) == 0.0
  g = grad((_randomize(phi[0], jax.random.PRNGKey(6)), phi[1]))
  for path, x in lj.flatten_with_paths(g[0]):
    if x is not None:
      assert float(jnp.abs(x).max()) > 0, path
  # A jitted AdamW step (lowrank_jax.train) moves the adapters and leaves theta0 alone.
  opt = optax.adamw(1e-2, weight_decay=0.01)
  step = train.make_train_step(reparam, opt, loss_fn, donate=False)
  before = jax.tree.map(np.asarray, theta0)
  phi1, _, metrics = step(phi, opt.init(phi), theta0, batch, None)
  assert np.isfinite(float(metrics["loss"]))
  assert float(jnp.abs(_layer(phi1[0], 2, OUT)["up"]["kernel"]).max()) > 0
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, theta0))


def test_chain_selection_sees_inserted_paths(setup):
  theta0, _, _ = setup
  # A later reparam selects by path on the adapted tree: the head only, or the adapters.
  r = lj.chain(adapters.bottleneck_adapters("pfeiffer", bottleneck=2), lj.full(r"^head/"))
  phi = r.init(jax.random.PRNGKey(0), theta0)
  assert [p for p, x in lj.flatten_with_paths(phi[1]) if x is not None] == ["head/bias/w", "head/kernel/w"]
  r2 = lj.chain(adapters.bottleneck_adapters("pfeiffer", bottleneck=2), lj.full(r"_adapter/up/"))
  phi2 = r2.init(jax.random.PRNGKey(0), theta0)
  assert lj.count_params(phi2[1]) == CFG.num_hidden_layers * (2 * CFG.hidden_size + CFG.hidden_size)


def test_errors(setup):
  theta0, _, _ = setup
  with pytest.raises(ValueError, match="not a sub-layer output kernel"):
    adapters.bottleneck_adapters(where=r"query/kernel").init(jax.random.PRNGKey(0), theta0)
  with pytest.raises(ValueError, match="placement"):
    adapters.bottleneck_adapters("parallel")
  with pytest.raises(ValueError, match="bottleneck"):
    adapters.bottleneck_adapters(bottleneck=0)
  with pytest.raises(ValueError, match="selects no leaf"):
    adapters.bottleneck_adapters(layers=[7]).init(jax.random.PRNGKey(0), theta0)
  reparam = adapters.bottleneck_adapters("pfeiffer", bottleneck=2)
  phi = reparam.init(jax.random.PRNGKey(0), theta0)
  theta = reparam.apply(theta0, phi)
  with pytest.raises(ValueError, match="already exists"):
    reparam.apply(theta, reparam.init(jax.random.PRNGKey(0), theta))
  with pytest.raises(ValueError, match="is not in the tree"):
    reparam.unmerge(theta0, phi)


def test_chain_with_prefix_tuning(setup):
  """Adapters and prefix tuning fill different slots of the same layers: chained in either order
  the BERT output equals the numpy BERT with both, and unmerge restores theta0's structure."""
  theta0, ids, mask = setup
  ad, pre = adapters.bottleneck_adapters("houlsby", bottleneck=2), lj.prefix_tuning(num_virtual_tokens=2)
  for r in (lj.chain(ad, pre), lj.chain(pre, ad)):
    phi = r.init(jax.random.PRNGKey(0), theta0)
    phi = (_randomize(phi[0], jax.random.PRNGKey(1)),) + tuple(phi[1:])
    theta = jax.jit(r.apply)(theta0, phi)
    layer = theta["bert"]["encoder"]["layer_2"]
    assert {"prefix", "attention_adapter", "output_adapter"} <= set(layer)
    prefix = [(layer_["prefix"]["key"], layer_["prefix"]["value"])
              for layer_ in (theta["bert"]["encoder"][f"layer_{i}"] for i in range(CFG.num_hidden_layers))]
    ref = np_bert(theta["bert"], CFG, ids, mask, prefix=prefix)  # adapters read from the tree
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(_fwd(theta, ids, mask))[valid], ref[valid], rtol=1e-4, atol=1e-4)
    assert jax.tree.structure(r.unmerge(theta, phi)) == jax.tree.structure(theta0)


LCFG = llama.LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4,
                              num_kv_heads=2, num_layers=2)


@pytest.mark.parametrize("placement,layers", [("houlsby", None), ("pfeiffer", [1])])
def test_decoder_adapters_match_numpy_reference(placement, layers):
  """The same method on the Llama layout (model=decoder_slots): adapters anchored at o_proj and
  down_proj, inserted as the layers' slots; identity at init, the numpy decoder with the adapters
  written out otherwise, gradients reach the adapters."""
  params = llama.init_llama(jax.random.PRNGKey(0), LCFG)
  theta0 = {"model": params}
  tokens = np.random.default_rng(2).integers(0, LCFG.vocab_size, (2, 5))
  model = slots_lib.decoder_slots(LCFG)
  reparam = lj.bottleneck_adapters(placement, model=model, bottleneck=3, layers=layers)
  phi = reparam.init(jax.random.PRNGKey(1), theta0)
  anchors = [p for p, x in lj.flatten_with_paths(phi) if x is not None and p.endswith("down/kernel")]
  expected = [f"model/layers/layer_{i}/{a}/down/kernel" for i in (layers or range(LCFG.num_layers))
              for a in (["attention/o_proj/kernel"] if placement == "houlsby" else []) + ["mlp/down_proj/kernel"]]
  assert sorted(anchors) == sorted(expected)
  fwd = jax.jit(llama.llama_forward, static_argnums=1)
  theta = reparam.apply(theta0, phi)
  np.testing.assert_allclose(np.asarray(fwd(theta["model"], LCFG, tokens)),
                             np.asarray(fwd(params, LCFG, tokens)), rtol=0, atol=1e-6)
  # random adapters; positive down biases keep every ReLU unit active (the decoder's hidden
  # states are small at init), so that every adapter parameter gets gradient
  phi = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.abs(x) + 0.1 if lj.path_str(p).endswith("down/bias") else x,
      _randomize(phi, jax.random.PRNGKey(3)))
  theta = jax.jit(reparam.apply)(theta0, phi)
  assert ("attention_adapter" in theta["model"]["layers"]["layer_1"]) == (placement == "houlsby")
  got = np.asarray(fwd(theta["model"], LCFG, tokens))
  np.testing.assert_allclose(got, np_llama(theta["model"], LCFG, tokens), rtol=2e-4, atol=2e-4)
  assert np.abs(got - np.asarray(fwd(params, LCFG, tokens))).max() > 1e-2
  g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(llama.llama_forward(
      reparam.apply(theta0, p)["model"], LCFG, tokens)))))(phi)
  for path, x in lj.flatten_with_paths(g):
    assert float(jnp.abs(x).max()) > 0, path
  with pytest.raises(ValueError, match="not a sub-layer output kernel of llama"):
    lj.bottleneck_adapters(model=model, where=r"q_proj/kernel").init(jax.random.PRNGKey(0), theta0)
  with pytest.raises(ValueError, match="hidden size 48"):
    lj.bottleneck_adapters(model=slots_lib.decoder_slots(LCFG, hidden_size=48)).init(
        jax.random.PRNGKey(0), theta0)


def test_tree_subtree_helpers():
  t = {"a": {"b": {"c": 1}}, "z": [2]}
  u = lj.tree.with_subtree(t, "a/b/new", {"x": 3})
  assert u == {"a": {"b": {"c": 1, "new": {"x": 3}}}, "z": [2]} and "new" not in t["a"]["b"]
  assert u["z"] is t["z"]
  assert lj.tree.without_subtree(u, "a/b/new") == t
  with pytest.raises(ValueError, match="already exists"):
    lj.tree.with_subtree(u, "a/b/new", 0)
  with pytest.raises(ValueError, match="no dict node 'a/q'"):
    lj.tree.with_subtree(t, "a/q/new", 0)
  with pytest.raises(ValueError, match="not a dict node"):
    lj.tree.with_subtree(t, "z/new", 0)
