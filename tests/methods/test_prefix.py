"""Prefix tuning: BERT and the Llama decoder with prefixes equal float64 numpy models whose
attention runs over explicitly concatenated [P_K; K], [P_V; V]; the MLP reparametrisation equals
its materialised prefix (and a numpy MLP); peft PrefixEncoder layout; the Reparam route through
the models' per-layer prefix slots; gradients reach only the prefix parameters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax import train
from lowrank_jax.methods import prefix as pt
from lowrank_jax.models import bert, llama, slots
from tests.methods.slots_reference import np_llama
from tests.models.bert_reference import np_bert, tiny_problem, valid

CFG = bert.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=24, max_position_embeddings=32)
L, P, D = CFG.num_hidden_layers, 3, CFG.hidden_size
_bert = jax.jit(bert.bert_forward, static_argnums=1)


@pytest.fixture(scope="module")
def setup():
  params, ids, mask = tiny_problem(CFG, 0, (3, 6), {1: 4, 2: 1}, pooler=False)
  theta0 = {"bert": params, "head": bert.init_classifier(jax.random.PRNGKey(1), D, 3)}
  return theta0, ids, mask


def _np_mlp(phi):
  """tanh(E W1 + b1) W2 + b2 in float64, as [P, L, 2, D]."""
  f = jax.tree.map(lambda x: np.asarray(x, np.float64), phi)
  h = np.tanh(f["embedding"] @ f["hidden"]["kernel"] + f["hidden"]["bias"])
  w2 = f["out"]["kernel"].reshape(f["out"]["kernel"].shape[0], -1)
  return (h @ w2 + f["out"]["bias"].reshape(-1)).reshape(P, L, 2, D)


def test_forward_equals_explicit_concatenation(setup):
  theta0, ids, mask = setup
  tuning = pt.prefix_tuning(L, P, D)
  phi = tuning.init(jax.random.PRNGKey(2))
  assert phi["key"].shape == phi["value"].shape == (L, P, D)
  pre = tuning.prefixes(phi)
  assert len(pre) == L and all(k.shape == v.shape == (P, D) for k, v in pre)
  got = _bert(theta0["bert"], CFG, ids, mask, prefix=pre)
  ref = np_bert(theta0["bert"], CFG, ids, mask,
                prefix=[(np.asarray(phi["key"][i]), np.asarray(phi["value"][i])) for i in range(L)])
  np.testing.assert_allclose(valid(got, mask), valid(ref, mask), rtol=1e-4, atol=1e-4)
  # The prefix matters, even for the row whose only real token is [CLS].
  base = _bert(theta0["bert"], CFG, ids, mask)
  assert np.abs(np.asarray(got - base))[2, 0].max() > 1e-2


def test_mlp_reparam_equals_materialised_prefix(setup):
  theta0, ids, mask = setup
  tuning = pt.prefix_tuning(L, P, D, reparam_mlp=7, embed_dim=5)
  phi = tuning.init(jax.random.PRNGKey(3))
  assert phi["embedding"].shape == (P, 5) and phi["out"]["kernel"].shape == (7, L, 2, D)
  direct = tuning.materialize(phi)
  assert set(direct) == {"key", "value"} and direct["key"].shape == (L, P, D)
  ref = _np_mlp(phi)
  np.testing.assert_allclose(np.asarray(direct["key"]), ref[:, :, 0].transpose(1, 0, 2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(direct["value"]), ref[:, :, 1].transpose(1, 0, 2), rtol=1e-5, atol=1e-6)
  # The model output is the same from the MLP form and from the materialised prefix.
  a = _bert(theta0["bert"], CFG, ids, mask, prefix=tuning.prefixes(phi))
  b = _bert(theta0["bert"], CFG, ids, mask, prefix=tuning.prefixes(direct))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert pt.materialize_prefix(direct) is direct


@pytest.mark.parametrize("mlp", [None, 6])
def test_param_count(mlp):
  phi = pt.init_prefix(jax.random.PRNGKey(0), L, P, D, mlp_hidden=mlp)
  assert lj.count_params(phi) == pt.prefix_param_count(L, P, D, mlp)
  by_hand = 2 * L * P * D if mlp is None else P * D + D * mlp + mlp + mlp * L * 2 * D + L * 2 * D
  assert lj.count_params(phi) == by_hand


def _loss_fn(theta, batch, rng):
  params, prefix = pt.split_prefix(theta["bert"])
  h = bert.bert_forward(params, CFG, batch["ids"], batch["mask"], prefix=prefix)
  return train.softmax_cross_entropy(bert.classifier_logits(theta["head"], h), batch["labels"])


@pytest.mark.parametrize("mlp", [None, 8])
def test_reparam_route_and_gradients_reach_only_prefix(setup, mlp):
  theta0, ids, mask = setup
  reparam = lj.chain(pt.prefix_reparam(P, reparam_mlp=mlp), lj.full(r"^head/"))
  theta0_i, phi = lj.initialize(reparam, jax.random.PRNGKey(4), theta0)
  assert theta0_i is theta0
  theta = reparam.apply(theta0, phi)
  # apply fills every layer's prefix slot ([P, D]: this BERT description has no head count)
  # and shares every other leaf with theta0.
  for i in range(L):
    slot = theta["bert"]["encoder"][f"layer_{i}"][pt.PREFIX_KEY]
    assert set(slot) == {"key", "value"} and slot["key"].shape == (P, D)
  assert pt.PREFIX_KEY not in theta["bert"]
  params, prefix = pt.split_prefix(theta["bert"])
  assert jax.tree.structure(params) == jax.tree.structure(theta0["bert"])
  assert all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theta0["bert"])))
  for (k, v), (k2, v2) in zip(prefix, pt.prefixes(phi[0])):
    np.testing.assert_array_equal(np.asarray(k), np.asarray(k2))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(v2))
  assert pt.split_prefix(theta0["bert"]) == (theta0["bert"], None)
  # bert_forward reads the prefix from the tree itself: same output as passing it explicitly.
  np.testing.assert_array_equal(
      np.asarray(bert.bert_forward(theta["bert"], CFG, ids, mask)),
      np.asarray(bert.bert_forward(params, CFG, ids, mask, prefix=prefix)))
  # Trainable: the prefix parameters and the head, nothing of the encoder.
  assert lj.count_params(phi[0]) == pt.prefix_param_count(L, P, D, mlp)
  assert [p for p, x in lj.flatten_with_paths(phi[1]) if x is not None] == ["head/bias/w", "head/kernel/w"]
  batch = {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask), "labels": jnp.array([0, 1, 2])}
  # A jitted Adam step: without weight decay a parameter moves iff its gradient is nonzero,
  # so every prefix parameter gets gradient; theta0 is untouched.
  opt = optax.adam(1e-2)
  step = train.make_train_step(reparam, opt, _loss_fn, donate=False)
  before = jax.tree.map(np.asarray, theta0)
  phi1, _, metrics = step(phi, opt.init(phi), theta0, batch, None)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  for (path, a), b in zip(lj.flatten_with_paths(phi1[0]), jax.tree.leaves(phi[0])):
    assert float(jnp.abs(a - b).max()) > 0, path
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, theta0))
  # unmerge removes the prefix again; a materialised phi plugs into the same reparam.
  assert jax.tree.structure(pt.prefix_reparam(P).unmerge(theta, phi[0])) == jax.tree.structure(theta0)
  direct = pt.materialize_prefix(phi1[0])
  loss = jax.jit(lambda p: _loss_fn(reparam.apply(theta0, p), batch, None)[0])
  y1, y2 = loss(phi1), loss((direct, phi1[1]))
  np.testing.assert_allclose(float(y1), float(y2), rtol=1e-5)


def test_peft_prefix_encoder_layout():
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  h_heads = CFG.num_attention_heads
  for projection in (False, True):
    cfg = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P, token_dim=D,
                                  num_transformer_submodules=1, num_attention_heads=h_heads,
                                  num_layers=L, encoder_hidden_size=7, prefix_projection=projection)
    torch.manual_seed(0)
    enc = peft.tuners.prefix_tuning.PrefixEncoder(cfg)
    state = {k: v.detach().numpy() for k, v in enc.state_dict().items()}
    phi = pt.from_peft(state, L)
    with torch.no_grad():
      pkv = enc(torch.arange(P)[None])  # [1, P, L*2*D]
      # peft's get_prompt: view(B, P, L*2, H, Dh).permute(2, 0, 3, 1, 4).split(2)
      pkv = pkv.view(1, P, L * 2, h_heads, D // h_heads).permute([2, 0, 3, 1, 4]).split(2)
    for i, (k, v) in enumerate(pt.prefixes(phi)):
      ref_k = pkv[i][0, 0].permute(1, 0, 2).reshape(P, D).numpy()  # [H, P, Dh] -> [P, D]
      ref_v = pkv[i][1, 0].permute(1, 0, 2).reshape(P, D).numpy()
      np.testing.assert_allclose(np.asarray(k), ref_k, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(v), ref_v, rtol=1e-5, atol=1e-6)
    back = pt.to_peft(phi)
    assert set(back) == set(state)
    for name in state:
      np.testing.assert_array_equal(np.asarray(back[name]), state[name])


def test_errors(setup):
  theta0, _, _ = setup
  with pytest.raises(ValueError, match="num_prefix"):
    pt.prefix_tuning(L, 0, D)
  with pytest.raises(ValueError, match="embed_dim"):
    pt.prefix_tuning(L, P, D, embed_dim=4)
  with pytest.raises(ValueError, match=r"anchors of bert .*\^\(\?P<layer>model/.*selects no leaf"):
    pt.prefix_reparam(P, at="model").init(jax.random.PRNGKey(0), theta0)
  with pytest.raises(ValueError, match="must be"):
    pt.prefixes({"key": jnp.zeros((L, P, D))})
  wrong = pt.init_prefix(jax.random.PRNGKey(0), L + 1, P, D)
  with pytest.raises(ValueError, match="do not fit"):
    pt.prefix_reparam(P).apply(theta0, wrong)
  r = pt.prefix_reparam(P)
  theta = r.apply(theta0, r.init(jax.random.PRNGKey(0), theta0))
  with pytest.raises(ValueError, match="already exists"):
    r.apply(theta, r.init(jax.random.PRNGKey(0), theta0))
  with pytest.raises(ValueError, match="prefix= given while params hold prefixes"):
    bert.bert_forward(theta["bert"], CFG, np.zeros((1, 3), int), prefix=pt.prefixes(wrong)[:L])
  with pytest.raises(ValueError, match="num_virtual_tokens"):
    pt.prefix_tuning(model=bert.slots(CFG))
  with pytest.raises(ValueError, match="not both"):
    pt.prefix_tuning(L, P, D, model=bert.slots(CFG))
  with pytest.raises(ValueError, match="needs the number of layers"):
    pt.prefix_tuning(num_virtual_tokens=P).init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="description has 5"):  # the tree has L = 2 layers
    pt.prefix_tuning(model=bert.slots(dataclasses.replace(CFG, num_hidden_layers=5)).at("bert"),
                     num_virtual_tokens=P).init(jax.random.PRNGKey(0), theta0)
  with pytest.raises(ValueError, match="width 16 != num_kv_heads"):
    pt.prefix_tuning(model=slots.bert_slots(num_heads=3, head_dim=4), num_virtual_tokens=P).init(
        jax.random.PRNGKey(0), theta0)


def test_old_call_is_a_reparam_and_sized_init_equals_tree_init(setup):
  """prefix_tuning(L, P, D) keeps its init(key) / prefixes / materialize and is a Reparam whose
  init(key, theta0) draws the same prefixes; its apply fills the same slots as prefix_reparam."""
  theta0, ids, mask = setup
  old = pt.prefix_tuning(L, P, D, reparam_mlp=4)
  assert isinstance(old, lj.Reparam) and isinstance(old, pt.PrefixTuning)
  key = jax.random.PRNGKey(9)
  a, b = old.init(key), old.init(key, theta0)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  theta = old.apply(theta0, a)
  theta2 = pt.prefix_reparam(P, reparam_mlp=4).apply(theta0, a)
  for i in range(L):
    s1, s2 = (t["bert"]["encoder"][f"layer_{i}"]["prefix"] for t in (theta, theta2))
    np.testing.assert_array_equal(np.asarray(s1["key"]), np.asarray(old.prefixes(a)[i][0]))
    np.testing.assert_array_equal(np.asarray(s1["value"]), np.asarray(s2["value"]))
  np.testing.assert_array_equal(np.asarray(_bert(theta["bert"], CFG, ids, mask)),
                                np.asarray(_bert(theta0["bert"], CFG, ids, mask, prefix=old.prefixes(a))))


def test_bert_slots_with_heads_and_old_top_level_form(setup):
  """model=bert.slots(config) stores [P, H, Dh] slots; the forward equals the numpy reference;
  the older top-level params["prefix"] list gives the same output."""
  theta0, ids, mask = setup
  r = pt.prefix_tuning(model=bert.slots(CFG, root="bert"), num_virtual_tokens=P)
  phi = r.init(jax.random.PRNGKey(5), theta0)
  theta = jax.jit(r.apply)(theta0, phi)
  h, dh = CFG.num_attention_heads, CFG.head_dim
  assert theta["bert"]["encoder"]["layer_1"]["prefix"]["key"].shape == (P, h, dh)
  got = _bert(theta["bert"], CFG, ids, mask)
  ref = np_bert(theta0["bert"], CFG, ids, mask,
                prefix=[(np.asarray(phi["key"][i]), np.asarray(phi["value"][i])) for i in range(L)])
  np.testing.assert_allclose(valid(got, mask), valid(ref, mask), rtol=1e-4, atol=1e-4)
  old_form = {**theta0["bert"], "prefix": pt.prefixes(phi)}
  np.testing.assert_allclose(np.asarray(_bert(old_form, CFG, ids, mask)), np.asarray(got), rtol=1e-6, atol=1e-6)
  params, pre = pt.split_prefix(theta["bert"], bert.slots(CFG))
  assert jax.tree.structure(params) == jax.tree.structure(theta0["bert"]) and len(pre) == L
  assert pre[0][0].shape == (P, h, dh)
  back = r.unmerge(theta, phi)
  assert jax.tree.structure(back) == jax.tree.structure(theta0)


LCFG = llama.LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4,
                              num_kv_heads=2, num_layers=2)
_llama = jax.jit(llama.llama_forward, static_argnums=1)


def test_decoder_prefix_equals_explicit_concatenation():
  """Llama (GQA, RoPE, causal) with prefix slots equals float64 numpy attention over the
  explicitly concatenated [P_K; K], [P_V; V] (prefix post-RoPE, visible to every query), with
  left padding; the MLP form fills the slots its materialised form does; gradients reach every
  prefix parameter."""
  mlp = 6
  params = llama.init_llama(jax.random.PRNGKey(0), LCFG)
  params = jax.tree.map(lambda x: 5.0 * x if x.ndim == 2 else x, params)  # non-trivial attention
  theta0 = {"model": params}
  tokens = np.random.default_rng(1).integers(0, LCFG.vocab_size, (2, 7))
  mask = np.ones((2, 7), np.int32)
  mask[1, :3] = 0  # left padding
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)  # positions count the real tokens
  r = lj.prefix_tuning(model=slots.decoder_slots(LCFG), num_virtual_tokens=P, reparam_mlp=mlp)
  phi = r.init(jax.random.PRNGKey(3), theta0)
  direct = pt.materialize_prefix(phi)
  kw = LCFG.kv_heads * LCFG.dim_head
  assert direct["key"].shape == (LCFG.num_layers, P, kw)
  theta = jax.jit(r.apply)(theta0, phi)
  slot = theta["model"]["layers"]["layer_1"]["prefix"]
  assert slot["key"].shape == (P, LCFG.kv_heads, LCFG.dim_head)
  np.testing.assert_allclose(np.asarray(slot["value"]).reshape(P, kw), np.asarray(direct["value"][1]),
                             rtol=1e-6, atol=1e-6)
  plain = lj.prefix_tuning(model=slots.decoder_slots(LCFG), num_virtual_tokens=P)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
               plain.apply(theta0, direct), theta)
  got = np.asarray(_llama(theta["model"], LCFG, tokens, attention_mask=mask, positions=pos))
  ref = np_llama(theta["model"], LCFG, tokens, mask, pos)
  np.testing.assert_allclose(valid(got, mask), valid(ref, mask), rtol=2e-4, atol=2e-4)
  base = np.asarray(_llama(params, LCFG, tokens, attention_mask=mask, positions=pos))
  assert np.abs(got - base)[0, 0].max() > 1e-2  # even the first token sees the prefix

  def loss(phi):
    return jnp.sum(jnp.tanh(llama.llama_forward(r.apply(theta0, phi)["model"], LCFG, tokens,
                                                attention_mask=mask, positions=pos)))

  g = jax.jit(jax.grad(loss))(phi)
  assert jax.tree.structure(g) == jax.tree.structure(phi)
  for path, x in lj.flatten_with_paths(g):
    assert float(jnp.abs(x).max()) > 0, path
  assert jax.tree.structure(r.unmerge(theta, phi)) == jax.tree.structure(theta0)
