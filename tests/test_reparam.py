"""The Reparam signatures and adapt with parameters shared across leaves: a vector-bank method
(each selected leaf a softmax mixture of one shared trainable bank) against numpy and closed-form
gradients, the where= selection, chains with per-leaf methods, jit, optax, partition, checkpoints;
the VB-LoRA example of LeafMethod's docstring run as written; prepare / insert / layout errors."""

import inspect
import re
import textwrap
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax import checkpoint, reparam as rp

H, B = 5, 4  # bank: H vectors of length B


def _bank_method() -> rp.LeafMethod:
  """ΔW = reshape(softmax(logits) @ bank): logits [n, H] per leaf (n = size / B), one bank [H, B]."""

  def init_shared(key, views):
    assert all(isinstance(v, rp.MatrixView) for v in views.values())
    return {"bank": jax.random.normal(key, (H, B))}

  def init_leaf(key, path, w, view):
    return {"logits": jax.random.normal(key, (int(np.prod(view.shape)) // B, H))}

  def delta(phi, view, shared):
    return (jax.nn.softmax(phi["logits"], -1) @ shared["bank"]).reshape(view.shape)

  def apply_leaf(w, phi, view, rng, shared):
    return w + delta(phi, view, shared)

  def unmerge_leaf(w, phi, view, shared):
    return w - delta(phi, view, shared)

  return rp.LeafMethod("bank", init_leaf, apply_leaf, unmerge_leaf, needs_matrix=False,
                       init_shared=init_shared)


def _theta():
  rng = np.random.default_rng(0)
  return {"a": {"kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)},
          "b": {"kernel": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)},
          "c": {"bias": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}}


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------ typed Reparam

def test_reparam_fields_are_typed_protocols_and_every_method_fits_them():
  hints = typing.get_type_hints(rp.Reparam)
  assert hints["init"] is rp.InitFn and hints["apply"] is rp.ApplyFn
  assert hints["init_with_base"] is rp.InitWithBaseFn
  assert hints["unmerge"] == typing.Optional[rp.UnmergeFn]
  params = {name: list(inspect.signature(proto.__call__).parameters)[1:]
            for name, proto in [("init", rp.InitFn), ("apply", rp.ApplyFn),
                                ("init_with_base", rp.InitWithBaseFn), ("unmerge", rp.UnmergeFn)]}
  assert params == {"init": ["key", "theta0"], "apply": ["theta0", "phi", "rng"],
                    "init_with_base": ["key", "theta0"], "unmerge": ["theta", "phi"]}
  theta0 = _theta()
  key = jax.random.key(0)
  for r in [lj.lora("kernel", rank=1), lj.vera("kernel", rank=2), lj.intrinsic_said(8),
            lj.full("c/"), lj.adapt(_bank_method(), "kernel"),
            lj.chain(lj.adapt(_bank_method(), "a/"), lj.lora("b/", rank=1))]:
    assert isinstance(r, lj.Reparam)
    for fn, args in [(r.init, (key, theta0)), (r.init_with_base, (key, theta0)),
                     (r.apply, (theta0, None)), (r.unmerge, (theta0, None))]:
      if fn is not None:  # unmerge is optional (full fine-tuning has none)
        inspect.signature(fn).bind(*args)  # TypeError if the protocol's call does not fit
    inspect.signature(r.apply).bind(theta0, None, rng=key)
  # prefix tuning is now a Reparam (its old init(key) still works without a tree)
  r = lj.prefix_tuning(2, 3, 8)
  assert isinstance(r, lj.Reparam)
  inspect.signature(r.init).bind(key)
  inspect.signature(r.apply).bind(theta0, None, rng=key)


# ------------------------------------------------------------------ shared parameters

def test_shared_layout_apply_and_gradients_against_closed_form():
  theta0 = _theta()
  r = lj.adapt(_bank_method(), "kernel")
  phi = r.init(jax.random.key(1), theta0)
  assert set(phi) == {rp.LEAVES, rp.SHARED} and phi[rp.SHARED]["bank"].shape == (H, B)
  assert phi[rp.LEAVES]["c"]["bias"] is None  # not selected
  assert phi[rp.LEAVES]["a"]["kernel"]["logits"].shape == (6, H)
  assert lj.count_params(phi) == H * B + (6 + 4) * H
  phi2 = r.init(jax.random.key(1), theta0)
  jax.tree.map(np.testing.assert_array_equal, phi, phi2)  # deterministic in the key
  bank = np.asarray(phi[rp.SHARED]["bank"], np.float64)
  out = jax.jit(r.apply)(theta0, phi)
  for name in ("a", "b"):
    logits = np.asarray(phi[rp.LEAVES][name]["kernel"]["logits"], np.float64)
    ref = np.asarray(theta0[name]["kernel"]) + (_np_softmax(logits) @ bank).reshape(theta0[name]["kernel"].shape)
    np.testing.assert_allclose(np.asarray(out[name]["kernel"]), ref, rtol=1e-5, atol=1e-5)
  assert r.apply(theta0, phi)["c"]["bias"] is theta0["c"]["bias"]
  # L = Σ <θ_i, C_i>: dL/dbank = Σ_i S_iᵀ C_i', dL/dlogits_i = S_i ⊙ (G_i - rowsum(S_i ⊙ G_i)),
  # G_i = C_i' bankᵀ, with S_i = softmax(logits_i), C_i' = C_i as [n_i, B].
  rng = np.random.default_rng(1)
  C = {n: rng.normal(size=theta0[n]["kernel"].shape) for n in ("a", "b")}
  C["c"] = rng.normal(size=(6,))

  def loss(phi):
    th = r.apply(theta0, phi)
    return sum(jnp.sum(th[n]["kernel"] * C[n]) for n in ("a", "b")) + jnp.sum(th["c"]["bias"] * C["c"])

  g = jax.jit(jax.grad(loss))(phi)
  g_bank = 0.0
  for name in ("a", "b"):
    S = _np_softmax(np.asarray(phi[rp.LEAVES][name]["kernel"]["logits"], np.float64))
    Cm = C[name].reshape(-1, B)
    g_bank = g_bank + S.T @ Cm
    G = Cm @ bank.T
    np.testing.assert_allclose(np.asarray(g[rp.LEAVES][name]["kernel"]["logits"]),
                               S * (G - (S * G).sum(-1, keepdims=True)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g[rp.SHARED]["bank"]), g_bank, rtol=1e-4, atol=1e-5)
  # unmerge inverts the merge
  back = lj.unmerge(r, lj.merge(r, theta0, phi), phi)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), back, theta0)


def test_where_selection_jit_and_init_under_jit():
  theta0 = _theta()
  r = lj.adapt(_bank_method(), r"^a/")
  phi = r.init(jax.random.key(2), theta0)
  assert phi[rp.LEAVES]["b"]["kernel"] is None and phi[rp.LEAVES]["a"]["kernel"] is not None
  eager = r.apply(theta0, phi)
  jitted = jax.jit(r.apply)(theta0, phi)
  assert eager["b"]["kernel"] is theta0["b"]["kernel"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), eager, jitted)
  phi_j = jax.jit(r.init)(jax.random.key(2), theta0)
  jax.tree.map(np.testing.assert_array_equal, phi, phi_j)
  with pytest.raises(ValueError, match="selects no leaf"):
    lj.adapt(_bank_method(), "nothing").init(jax.random.key(0), theta0)


def test_chains_with_per_leaf_methods():
  """bank on every kernel, then LoRA on top of b's adapted kernel, then full on the bias: the
  chained apply equals the three applied in turn; the gradient reaches the bank through both."""
  theta0 = _theta()
  bank_r, lora_r, full_r = lj.adapt(_bank_method(), "kernel"), lj.lora("b/kernel", rank=1), lj.full("c/")
  r = lj.chain(bank_r, lora_r, full_r)
  phi = r.init(jax.random.key(3), theta0)
  assert set(phi[0]) == {rp.LEAVES, rp.SHARED} and phi[1]["b"]["kernel"] is not None
  phi = (phi[0], jax.tree.map(lambda x: x + 0.5, phi[1]), phi[2])  # LoRA's B = 0 would hide it
  got = lj.merge(r, theta0, phi)
  step = full_r.apply(lora_r.apply(bank_r.apply(theta0, phi[0]), phi[1]), phi[2])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, lj.materialize(step))
  x = jnp.ones((3, 8))
  g = jax.jit(jax.grad(lambda p: jnp.sum(lj.dot(x, r.apply(theta0, p)["b"]["kernel"]) ** 2)))(phi)
  assert float(jnp.abs(g[0][rp.SHARED]["bank"]).max()) > 0
  assert float(jnp.abs(g[1]["b"]["kernel"]["a"]).max()) > 0
  # the other order: LoRA first, the bank over the LoRA weight (materialised by apply_leaf)
  r2 = lj.chain(lj.lora("b/kernel", rank=1), lj.adapt(_bank_method(), "kernel"))
  phi2 = r2.init(jax.random.key(4), theta0)
  back = lj.unmerge(r2, lj.merge(r2, theta0, phi2), phi2)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), back, theta0)


def test_optax_partition_and_checkpoint(tmp_path):
  theta0 = _theta()
  r = lj.adapt(_bank_method(), "kernel")
  phi = r.init(jax.random.key(5), theta0)
  opt = optax.adam(1e-1)
  state = opt.init(phi)
  loss = lambda p: jnp.sum(r.apply(theta0, p)["a"]["kernel"] ** 2)
  updates, state = jax.jit(opt.update)(jax.grad(loss)(phi), state, phi)
  new = optax.apply_updates(phi, updates)
  assert float(jnp.abs(new[rp.SHARED]["bank"] - phi[rp.SHARED]["bank"]).max()) > 0
  np.testing.assert_array_equal(new[rp.LEAVES]["b"]["kernel"]["logits"],  # b is not in the loss
                                phi[rp.LEAVES]["b"]["kernel"]["logits"])
  shared, rest = lj.partition(phi, r"^shared/")
  assert lj.count_params(shared) == H * B and shared[rp.LEAVES]["a"]["kernel"]["logits"] is None
  jax.tree.map(np.testing.assert_array_equal, lj.combine(shared, rest), phi)
  checkpoint.save(tmp_path / "ck", new, state)
  restored = checkpoint.restore(tmp_path / "ck", phi, state)
  jax.tree.map(np.testing.assert_array_equal, restored.phi, new)
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state)


def test_docstring_vblora_example_runs_as_written():
  """The VB-LoRA sketch in LeafMethod's docstring: phi layout, top-k mixtures equal to numpy,
  and the bank's gradient."""
  code = re.search(r"::\n\n((?:[ \t]{4,}.*\n|\n)+)", rp.LeafMethod.__doc__).group(1)
  ns = {"jax": jax, "jnp": jnp, "lj": lj}
  exec(compile(textwrap.dedent(code), "<LeafMethod docstring>", "exec"), ns)
  theta0 = {"q": {"kernel": jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)},
            "k": {"kernel": jnp.zeros((4, 4))}}
  r = ns["vblora"]("q/kernel", rank=2, h=6, b=4, k=2)
  phi = r.init(jax.random.key(0), theta0)
  assert phi[rp.SHARED]["bank"].shape == (6, 4) and phi[rp.LEAVES]["k"]["kernel"] is None
  logits_a = np.asarray(phi[rp.LEAVES]["q"]["kernel"]["logits_a"], np.float64)
  assert logits_a.shape == (8 * 2 // 4, 6)
  phi[rp.LEAVES]["q"]["kernel"]["logits_b"] = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6)), jnp.float32)
  bank = np.asarray(phi[rp.SHARED]["bank"], np.float64)

  def mix(logits):  # top-2 of each row, softmax over them, mixture of bank rows
    idx = np.argsort(-logits, -1)[:, :2]
    top = np.take_along_axis(logits, idx, -1)
    return np.einsum("nk,nkb->nb", _np_softmax(top), bank[idx])

  a = mix(logits_a).reshape(8, 2)
  b = mix(np.asarray(phi[rp.LEAVES]["q"]["kernel"]["logits_b"], np.float64)).reshape(2, 4)
  out = r.apply(theta0, phi)
  np.testing.assert_allclose(np.asarray(out["q"]["kernel"]), np.asarray(theta0["q"]["kernel"]) + a @ b,
                             rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(r.apply(theta0, p)["q"]["kernel"] ** 2))(phi)
  assert float(jnp.abs(g[rp.SHARED]["bank"]).max()) > 0


def test_shared_only_prepare_and_insert_hooks():
  """A method with shared parameters only: phi is the shared tree, the selection is re-made
  from where= in apply; prepare feeds each leaf its own entry; insert adds subtrees that
  unmerge removes."""
  theta0 = _theta()
  seen = {}

  def prepare(shared, views):
    seen["paths"] = list(views)
    return {p: shared["s"] * (i + 1) for i, p in enumerate(views)}

  method = rp.LeafMethod(
      "scaled", None, lambda w, p, view, rng, s: w * s, lambda w, p, view, s: w / s,
      needs_matrix=False, init_shared=lambda key, views: {"s": jnp.asarray(2.0)}, prepare=prepare,
      insert=lambda path, p, s: {path.rpartition("/")[0] + "/extra": {"s": s}})
  r = lj.adapt(method, "kernel")
  phi = r.init(jax.random.key(0), theta0)
  assert set(phi) == {"s"}
  theta = r.apply(theta0, phi)
  assert seen["paths"] == ["a/kernel", "b/kernel"]
  np.testing.assert_allclose(theta["a"]["kernel"], 2 * theta0["a"]["kernel"])
  np.testing.assert_allclose(theta["b"]["kernel"], 4 * theta0["b"]["kernel"])
  assert float(theta["b"]["extra"]["s"]) == 4.0 and "extra" not in theta["c"]
  back = r.unmerge(theta, phi)
  assert jax.tree.structure(back) == jax.tree.structure(theta0)
  np.testing.assert_allclose(back["b"]["kernel"], theta0["b"]["kernel"], rtol=1e-6)
  g = jax.grad(lambda p: jnp.sum(r.apply(theta0, p)["b"]["extra"]["s"]))(phi)
  assert float(g["s"]) == 2.0  # extra = 2 s


def test_errors():
  theta0 = _theta()
  r = lj.adapt(_bank_method(), "kernel")
  phi = r.init(jax.random.key(0), theta0)
  with pytest.raises(ValueError, match=r"bank: phi must be \{'leaves'.*got \['leaves'\]"):
    r.apply(theta0, {"leaves": phi["leaves"]})
  with pytest.raises(ValueError, match="does not mirror"):
    r.apply({"a": theta0["a"]}, phi)
  with pytest.raises(ValueError, match="needs init_leaf or init_shared"):
    lj.adapt(rp.LeafMethod("none", None, None), "kernel")
  with pytest.raises(ValueError, match="per-leaf methods only"):
    lj.adapt_with_bias(_bank_method(), "kernel", lambda w, b, p, v: b)
  bad = rp.LeafMethod("bad", None, lambda w, p, v, rng, s: w, needs_matrix=False,
                      init_shared=lambda key, views: {}, prepare=lambda s, views: {})
  with pytest.raises(ValueError, match=r"bad: prepare returned no entry for .*'a/kernel'"):
    lj.adapt(bad, "kernel").apply(theta0, {})
  with pytest.raises(TypeError, match="only floating-point"):
    lj.adapt(_bank_method(), None).init(jax.random.key(0), {**theta0, "n": jnp.arange(4)})
