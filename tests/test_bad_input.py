"""Nothing silent (issue 16): bad or unusual inputs to the documented entry points give a clear
error naming the path, shape, dtype, id or file, never a raw lax / TensorStore / safetensors error
and never a silently wrong result.

Sections: phi checked against the method in ``apply``; reparams carry their config; token ids;
non-finite and corrupt files; PEFT export from the reparam's own config.
"""

import functools
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st_
from jax.experimental import checkify

import lowrank_jax as lj
from lowrank_jax import checkpoint, reparam as rp, validate
from lowrank_jax.interop import peft as lpeft
from lowrank_jax.io import safetensors as st
from lowrank_jax.models import bert, decoder
from lowrank_jax.methods import registry

D = 8


def _bert_like():
  rng = np.random.default_rng(0)
  mat = lambda: jnp.asarray(rng.normal(size=(D, D)), jnp.float32)
  return {"layer_0": {"attention": {n: {"kernel": mat(), "bias": jnp.zeros(D)}
                                    for n in ("query", "key", "value")}},
          "head": {"kernel": mat()}}


# ------------------------------------------------------------------ 1. phi against the method


def test_apply_rank_mismatch_names_path_expected_and_found():
  """An r=4 LoRA applied to r=8 parameters would use the wrong scale (alpha/4); it raises."""
  theta0 = _bert_like()
  phi8 = lj.lora("(query|value)/kernel", rank=8, alpha=16).init(jax.random.key(0), theta0)
  r4 = lj.lora("(query|value)/kernel", rank=4, alpha=16)
  with pytest.raises(rp.PhiMismatchError,
                     match=r"LoRA: phi at 'layer_0/attention/query/kernel' .*\(8, 8\) float32: "
                           r"expected \{a: \(8, 4\), b: \(4, 8\)\}, found \{a: \(8, 8\), b: \(8, 8\)\}"):
    r4.apply(theta0, phi8)
  with pytest.raises(rp.PhiMismatchError, match="expected"):  # under jit: at trace time
    jax.jit(r4.apply)(theta0, phi8)
  assert issubclass(rp.PhiMismatchError, ValueError)


def test_apply_target_mismatch_both_ways():
  """A (key|value) method given (query|value) adapters: query is not selected, key is missing."""
  theta0 = _bert_like()
  phi = lj.lora("(query|value)/kernel", rank=2).init(jax.random.key(0), theta0)
  with pytest.raises(rp.PhiMismatchError,
                     match=r"phi has parameters at 'layer_0/attention/query/kernel', a leaf this method "
                           r"does not select \(where='\(key\|value\)/kernel'\); expected parameters at "
                           r"'layer_0/attention/key/kernel', 'layer_0/attention/value/kernel'"):
    lj.lora("(key|value)/kernel", rank=2).apply(theta0, phi)
  holed = jax.tree.map(lambda x: x, phi, is_leaf=lambda x: x is None)
  holed["layer_0"]["attention"]["value"]["kernel"] = None
  with pytest.raises(rp.PhiMismatchError, match=r"selects 'layer_0/attention/value/kernel' .* no parameters"):
    lj.lora("(query|value)/kernel", rank=2).apply(theta0, holed)


def test_apply_structure_mismatch_between_methods_and_shared_parameters():
  theta0 = _bert_like()
  phi = lj.lora("query/kernel", rank=2).init(jax.random.key(0), theta0)
  with pytest.raises(rp.PhiMismatchError, match=r"DoRA: phi at 'layer_0/attention/query/kernel'.*"
                                                r"expected \{a: \(8, 2\), b: \(2, 8\), m: \(8,\)\}"):
    lj.dora("query/kernel", rank=2).apply(theta0, phi)
  said = lj.intrinsic_said(6, where="kernel")
  phi_s = lj.intrinsic_said(9, where="kernel").init(jax.random.key(0), theta0)
  with pytest.raises(rp.PhiMismatchError, match=r"intrinsic_said: phi\['z'\] has shape \(5,\), but the method expects \(2,\) .*found \{lam: \(4,\), z: \(5,\)\}"):
    said.apply(theta0, phi_s)
  with pytest.raises(rp.PhiMismatchError, match=r"at 'layer_0/attention' the tree has keys"):
    lj.lora("query/kernel", rank=2).apply(theta0, {**phi, "layer_0": {"attention": {}}})


def test_chain_names_the_entry():
  theta0 = _bert_like()
  r = lj.chain(lj.lora("query/kernel", rank=2), lj.full("head/"))
  phi = r.init(jax.random.key(0), theta0)
  with pytest.raises(rp.PhiMismatchError, match=r"chain of 2 reparams takes phi as a tuple of 2 .* got 1 entries"):
    r.apply(theta0, phi[:1])
  with pytest.raises(rp.PhiMismatchError, match=r"chain of 2 .* got a dict"):
    r.apply(theta0, phi[0])
  other = lj.chain(lj.lora("query/kernel", rank=2), lj.full("layer_0/attention/key/kernel"))
  with pytest.raises(rp.PhiMismatchError, match=r"^chain entry 1 of 2 \(phi\[1\]\): full: phi has parameters at 'head/kernel'"):
    other.apply(theta0, phi)


def test_check_once_per_structure_and_not_in_the_compiled_step():
  """The check traces init abstractly once per (theta0, phi) structure; repeated calls, eager or
  jitted, do not re-run it, and the jitted apply is the same computation as without the check."""
  theta0 = _bert_like()
  calls = []
  base = lj.lora_method(2)

  def init_leaf(key, path, w, view):
    calls.append(path)
    return base.init_leaf(key, path, w, view)

  method = rp.LeafMethod("counted", init_leaf, base.apply_leaf)
  r = rp.adapt(method, "query/kernel")
  phi = r.init(jax.random.key(0), theta0)
  assert calls == ["layer_0/attention/query/kernel"]
  r.apply(theta0, phi)
  assert len(calls) == 2  # the abstract init of the check
  for _ in range(3):
    r.apply(theta0, phi)
  f = jax.jit(lambda t, p: lj.materialize(r.apply(t, p)))
  for _ in range(3):
    f(theta0, jax.tree.map(lambda x: x + 1.0, phi))
  assert len(calls) == 2
  # the jaxpr of apply is that of the per-leaf math alone
  unchecked = lambda t, p: jax.tree.map(
      lambda w, q: w if q is None else w + q["a"] @ q["b"] * base_scale, t, p,
      is_leaf=lambda x: x is None or (isinstance(x, dict) and "a" in x))
  base_scale = lj.lora_scale(2, None)
  n_eqns = lambda fn: len(jax.make_jaxpr(fn)(theta0, phi).jaxpr.eqns)
  assert n_eqns(lambda t, p: lj.materialize(r.apply(t, p))) == n_eqns(unchecked)


@settings(max_examples=12, deadline=None)
@given(r_init=st_.integers(1, 4), r_apply=st_.integers(1, 4), alpha=st_.sampled_from([None, 1.0, 8.0]))
def test_rank_property(r_init, r_apply, alpha):
  """Any rank mismatch raises; equal ranks give W0 + alpha/r A B (closed form)."""
  theta0 = {"w": {"kernel": jnp.asarray(np.random.default_rng(r_init).normal(size=(4, 6)), jnp.float32)}}
  phi = lj.lora("kernel", rank=r_init, init="gaussian").init(jax.random.key(r_init), theta0)
  phi = jax.tree.map(lambda x: x + 0.25, phi)
  method = lj.lora("kernel", rank=r_apply, alpha=alpha)
  if r_init != r_apply:
    with pytest.raises(rp.PhiMismatchError, match=f"expected {{a: \\(4, {r_apply}\\)"):
      method.apply(theta0, phi)
    return
  got = np.asarray(lj.merge(method, theta0, phi)["w"]["kernel"], np.float64)
  p = phi["w"]["kernel"]
  scale = (r_apply if alpha is None else alpha) / r_apply
  want = np.asarray(theta0["w"]["kernel"], np.float64) + scale * np.asarray(p["a"], np.float64) @ np.asarray(p["b"], np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ 2. reparams carry their config


def test_registry_reparams_carry_their_config_as_data():
  r = registry.build("lora", where="(query|value)/kernel", rank=4, alpha=8.0, rslora=True, init="pissa")
  assert isinstance(r.config, registry.MethodConfig)
  d = registry.as_dict(r.config)
  assert d["name"] == "lora" and d["rank"] == 4 and d["alpha"] == 8.0 and d["rslora"] is True
  assert d["init"] == "pissa" and d["where"] == "(query|value)/kernel" and d["dtype"] == "float32"
  back = json.loads(json.dumps(d))  # serialisable, and rebuilds the same method
  r2 = registry.chain_from([back])
  assert r2.config == (r.config,)
  theta0 = _bert_like()
  base, phi = lj.initialize(r, jax.random.key(0), theta0)
  base2, phi2 = lj.initialize(r2, jax.random.key(0), theta0)
  jax.tree.map(np.testing.assert_array_equal, lj.merge(r, base, phi), lj.merge(r2, base2, phi2))
  ch = registry.chain_from([{"name": "lora", "where": "query/kernel", "rank": 2}, {"name": "full", "where": "^head/"}])
  assert [c.method_name for c in ch.config] == ["lora", "full"] and ch.config[0].rank == 2
  direct = registry.parse("lora", {"where": "query/kernel"})
  assert lj.lora("query/kernel").config == direct  # a direct factory call records its config too
  assert lj.chain(lj.lora("query/kernel"), ch).config == (direct, ch.config)
  assert lj.adapt(lj.lora_method(2), "query/kernel").config is None  # built by hand: nothing recorded
  assert lj.lora("query/kernel").with_config(ch.config[0]).config is ch.config[0]
  pt = registry.build("prefix_tuning", num_prefix=2)
  assert type(pt).__name__ == "PrefixTuning" and pt.config.num_prefix == 2


# ------------------------------------------------------------------ 3. token ids, non-finite values

TINY_BERT = bert.BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=8)
TINY_DECODER = decoder.DecoderConfig(vocab_size=13, hidden_size=8, intermediate_size=16, num_layers=1,
                                     num_heads=2, num_kv_heads=1, max_seq_len=16)


@pytest.mark.parametrize("model", ["bert", "decoder"])
@pytest.mark.parametrize("bad", ["vocab", "above", "negative"])
def test_token_ids_out_of_range_raise_naming_id_position_and_vocab(model, bad):
  """Without the check, ids >= V give an all-NaN hidden state and negative ids wrap around."""
  if model == "bert":
    cfg, params = TINY_BERT, bert.init_bert(jax.random.key(0), TINY_BERT)
    forward = lambda ids: bert.bert_forward(params, cfg, ids)
  else:
    cfg, params = TINY_DECODER, decoder.init_decoder(jax.random.key(0), TINY_DECODER)
    forward = lambda ids: decoder.decoder_forward(params, cfg, ids)
  v = cfg.vocab_size
  value = {"vocab": v, "above": v + 100, "negative": -1}[bad]
  ids = np.array([[1, 2, 3], [4, value, 5]])
  with pytest.raises(validate.TokenIdError,
                     match=rf"input_ids: token id {value} at position \(1, 1\) .*vocabulary \[0, {v}\) "
                           rf"\(vocab_size={v}\).*1 of 6 ids"):
    forward(ids)
  with pytest.raises(validate.TokenIdError, match=f"token id {value}"):
    forward(jnp.asarray(ids))  # a concrete jax.Array too
  assert np.isfinite(np.asarray(forward(np.array([[1, 2, 3], [4, v - 1, 0]])))).all()


def test_token_ids_traced_are_checked_under_checkify_only():
  params = decoder.init_decoder(jax.random.key(0), TINY_DECODER)
  f = lambda ids: decoder.decoder_forward(params, TINY_DECODER, ids).sum()
  ids = jnp.asarray([[1, 2, 3], [4, 5, 99]])
  jax.jit(f)(ids)  # traced, not checkified: no check, no cost
  err, _ = jax.jit(checkify.checkify(f, errors=checkify.user_checks))(ids)
  with pytest.raises(checkify.JaxRuntimeError, match=r"token id 99 at position \(1, 2\) is outside the "
                                                     r"vocabulary \[0, 13\)"):
    err.throw()
  err, _ = jax.jit(checkify.checkify(f, errors=checkify.user_checks))(ids.at[1, 2].set(12))
  err.throw()  # in range: no error
  with pytest.raises(TypeError, match="token ids must be integers, got dtype float32"):
    validate.check_token_ids(np.zeros((1, 2), np.float32), 5)
  with pytest.raises(validate.TokenIdError, match="token_type_ids: token id 2 at position"):
    bert.bert_forward(bert.init_bert(jax.random.key(0), TINY_BERT), TINY_BERT, np.ones((1, 3), int),
                      token_type_ids=np.array([[0, 1, 2]]))


def test_check_finite_names_every_bad_path():
  tree = {"a": {"kernel": np.ones((2, 3), np.float32)},
          "b": {"x": jnp.asarray([1.0, np.nan, np.inf, -np.inf]), "n": jnp.arange(3)},
          "c": (None, np.array([np.nan], ml_dtypes.bfloat16))}
  with pytest.raises(validate.NonFiniteError,
                     match=r"^phi from test: non-finite values in 2 leaves: 'b/x' \(4,\) float32: 1 NaN, 2 inf; "
                           r"'c/1' \(1,\) bfloat16: 1 NaN, 0 inf$"):
    validate.check_finite(tree, what="phi from test")
  ok = {"a": np.ones(2), "i": np.arange(3), "s": jax.ShapeDtypeStruct((2,), jnp.float32)}
  assert validate.check_finite(ok, what="ok") is ok
  with pytest.raises(TypeError, match="traced"):
    jax.jit(lambda x: validate.check_finite({"x": x}, what="t"))(jnp.ones(2))


# ------------------------------------------------------------------ 3b. corrupt and non-finite files


def _flip(path: pathlib.Path, offset: int = 0, n: int = 16) -> None:
  data = bytearray(path.read_bytes())
  for i in range(offset, min(offset + n, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _saved(tmp_path, phi, opt_state=None):
  path = tmp_path / "ck"
  checkpoint.save(path, phi, opt_state)
  return path


def test_checkpoint_restores_phi_alone_and_rejects_non_finite_values(tmp_path):
  phi = {"q": {"kernel": {"a": jnp.ones((4, 2)), "b": jnp.full((2, 4), 0.5)}}, "k": None}
  opt = optax.adam(1e-3)
  path = _saved(tmp_path, phi, opt.init(phi))
  alone = checkpoint.restore(path, phi)  # no optimizer-state template needed
  assert alone.opt_state is None
  jax.tree.map(np.testing.assert_array_equal, alone.phi, phi)
  bad = {"q": {"kernel": {"a": jnp.ones((4, 2)).at[1, 1].set(jnp.nan), "b": jnp.full((2, 4), jnp.inf)}}, "k": None}
  checkpoint.save(tmp_path / "nan", bad)
  with pytest.raises(validate.NonFiniteError,
                     match=r"checkpoint .*nan: phi: non-finite values in 2 leaves: 'q/kernel/a' \(4, 2\) "
                           r"float32: 1 NaN, 0 inf; 'q/kernel/b' \(2, 4\) float32: 0 NaN, 8 inf"):
    checkpoint.restore(tmp_path / "nan", phi)
  raw = checkpoint.restore(tmp_path / "nan", phi, check_finite=False)  # opt-out: as stored
  assert np.isnan(np.asarray(raw.phi["q"]["kernel"]["a"])).sum() == 1


@pytest.mark.parametrize("damage", ["array bytes", "metadata JSON", "meta"])
def test_damaged_checkpoint_names_file_and_leaf(tmp_path, damage):
  phi = {"q": {"kernel": {"a": jnp.ones((4, 2)), "b": jnp.full((2, 4), 0.5)}}}
  path = _saved(tmp_path, phi)
  if damage == "array bytes":
    for f in sorted((path / "phi" / "d").iterdir()):
      _flip(f, f.stat().st_size // 2)
  elif damage == "metadata JSON":
    f = path / "phi" / "_METADATA"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  else:
    _flip(path / "meta" / "metadata")
  with pytest.raises(validate.CorruptFileError, match=rf"cannot read the checkpoint {re.escape(str(path))}") as info:
    checkpoint.restore(path, phi)
  assert info.value.__cause__ is not None  # the reader's own error is attached
  if damage == "array bytes":
    assert re.search(r"\(leaf 'q/kernel/[ab]'\)", str(info.value))
  if damage == "meta":
    assert "(leaf 'meta')" in str(info.value)


def test_safetensors_reads_name_file_and_tensor(tmp_path):
  """io.safetensors (HF folders, peft folders): overwritten values are reported with the file and
  the tensor; a truncated or overwritten header names the file (never a raw decoder error)."""
  path = tmp_path / "m.safetensors"
  st.save_file({"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.float32)}, path)
  good = path.read_bytes()
  begin, _ = st.tensor_infos(path)["b"].begin, None
  data = bytearray(good)
  data[begin + 4: begin + 8] = b"\xff\xff\xff\xff"  # a NaN written over b[1]
  path.write_bytes(bytes(data))
  with pytest.raises(validate.NonFiniteError, match=rf"{re.escape(str(path))}: .*'b' \(4,\) float32: 1 NaN"):
    st.load_file(path)
  assert np.isnan(st.load_file(path, check_finite=False)["b"][1])  # opt-out reads it as stored
  for damaged in (good[:20], b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1", good[: len(good) - 3]):
    path.write_bytes(damaged)
    with pytest.raises(st.SafetensorsError, match=re.escape(str(path))):
      st.load_file(path)


PEFT_FOLDERS = pathlib.Path(__file__).parent / "golden" / "peft_folders"


@functools.lru_cache(maxsize=1)
def _tiny_peft_base():
  return bert.load_bert(PEFT_FOLDERS / "base_bert")[1]


@settings(max_examples=25, deadline=None)
@given(offset=st_.integers(0, 6000), value=st_.integers(0, 255))
def test_any_single_byte_damage_to_a_peft_folder_is_named_or_harmless(offset, value, tmp_path_factory):
  """One byte of adapter_model.safetensors overwritten anywhere: the import either gives the same
  kind of result (finite values; only that byte's tensor may differ) or raises one of our errors
  naming the file or the module, never a raw JSON / struct / decoder error."""
  theta0 = _tiny_peft_base()
  tmp = tmp_path_factory.mktemp("damage")
  folder = tmp / "ad"
  shutil.copytree(PEFT_FOLDERS / "lora_dora", folder)
  w = folder / lpeft.WEIGHTS_NAME
  data = bytearray(w.read_bytes())
  offset %= len(data)
  data[offset] = value
  w.write_bytes(bytes(data))
  try:
    ad = lpeft.load_peft_adapter(folder, theta0)
  except (validate.CorruptFileError, validate.NonFiniteError, ValueError, KeyError) as e:
    msg = str(e)
    assert str(w) in msg or "module '" in msg or "adapter module" in msg, msg
    assert type(e).__module__.startswith(("lowrank_jax", "builtins")), type(e)
    return
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ad.phi))


@settings(max_examples=30, deadline=None)
@given(shape=st_.tuples(st_.integers(1, 3), st_.integers(1, 6)), vocab=st_.integers(1, 50),
       seed=st_.integers(0, 2 ** 31 - 1))
def test_token_id_property(shape, vocab, seed):
  """An error exactly when some id is outside [0, V); it names the first such id (row-major) and
  its position, and the count of bad ids."""
  ids = np.random.default_rng(seed).integers(-3, vocab + 3, size=shape)
  bad = (ids < 0) | (ids >= vocab)
  if not bad.any():
    validate.check_token_ids(ids, vocab)
    return
  pos = tuple(int(i) for i in np.argwhere(bad)[0])
  with pytest.raises(validate.TokenIdError, match=rf"token id {ids[pos]} at position \({pos[0]}, {pos[1]}\) "
                                                  rf".*\[0, {vocab}\).*; {int(bad.sum())} of {ids.size} ids"):
    validate.check_token_ids(ids, vocab)


@settings(max_examples=20, deadline=None)
@given(n_leaves=st_.integers(1, 4), seed=st_.integers(0, 2 ** 31 - 1))
def test_check_finite_property(n_leaves, seed):
  """check_finite raises exactly when some leaf holds NaN/inf, listing exactly those leaves
  with their counts."""
  rng = np.random.default_rng(seed)
  tree, expected = {}, []
  for i in range(n_leaves):
    x = rng.normal(size=(3, 2)).astype(np.float32)
    n_nan, n_inf = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    x.reshape(-1)[:n_nan] = np.nan
    x.reshape(-1)[n_nan: n_nan + n_inf] = np.inf
    tree[f"l{i}"] = x
    if n_nan or n_inf:
      expected.append(f"'l{i}' (3, 2) float32: {n_nan} NaN, {n_inf} inf")
  if not expected:
    assert validate.check_finite(tree, what="t") is tree
    return
  with pytest.raises(validate.NonFiniteError) as info:
    validate.check_finite(tree, what="t")
  assert str(info.value).endswith("; ".join(expected))
