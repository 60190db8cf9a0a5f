"""L4Q against a float64 numpy reference: the fake-quantized forward and its closed-form
STE/LSQ gradients (w.r.t. W, S, Z and, through the reparam, A, B and the quantizer
offsets); init = affine min/max quantization of W0 exactly; deployed int codes = training
forward exactly; QAT beating quantize-after-training on a synthetic regression."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.l4q import L4QWeight, code_range, fake_quantize, l4q, l4q_merge
from lowrank_jax.quant import affine_encode
from lowrank_jax.quant.qlora import QuantizedWeight

D_IN, D_OUT, G, R = 64, 24, 16, 4
ALPHA = 8.0


def _theta(seed=0):
  rng = np.random.default_rng(seed)
  return {"layer": {"kernel": jnp.asarray(rng.standard_normal((D_IN, D_OUT)) * 0.1, jnp.float32),
                    "bias": jnp.zeros((D_OUT,), jnp.float32)}}


def _np_minmax(w, g, bits, symmetric):
  """Affine min/max group quantizer of w (numpy, float32 as stored)."""
  red = w.reshape(-1, g, w.shape[-1]).astype(np.float32)
  if symmetric:
    amax = np.abs(red).max(1)
    s = np.where(amax > 0, amax / np.float32(2 ** (bits - 1) - 1), np.float32(1))
    return s.astype(np.float32), np.zeros_like(s)
  mn, mx = np.minimum(red.min(1), 0), np.maximum(red.max(1), 0)
  s = np.where(mx > mn, (mx - mn) / np.float32(2 ** bits - 1), np.float32(1)).astype(np.float32)
  return s, np.round(-mn / s).astype(np.float32)


def _np_fake_quant(w, s, z, g, lo, hi):
  """float64 reference forward and the closed-form STE/LSQ derivatives (elementwise)."""
  s_f, z_f = np.repeat(s, g, 0), np.repeat(z, g, 0)
  v = w / s_f + z_f
  inside = (np.round(v) >= lo) & (np.round(v) <= hi)
  q = np.clip(np.round(v), lo, hi)
  out = (q - z_f) * s_f
  d_w = inside.astype(np.float64)
  d_s = np.where(inside, np.round(v) - v, q - z_f)
  d_z = np.where(inside, 0.0, -s_f)
  return out, d_w, d_s, d_z


def _group_sum(x, g):
  return x.reshape(-1, g, x.shape[-1]).sum(1)


@pytest.mark.parametrize("symmetric,integer_zero", [(False, False), (False, True), (True, False)])
def test_fake_quantize_forward_and_gradients_match_numpy(symmetric, integer_zero):
  rng = np.random.default_rng(1)
  w = rng.standard_normal((D_IN, D_OUT)).astype(np.float32)
  lo, hi = code_range(4, symmetric)
  s = (np.abs(rng.standard_normal((D_IN // G, D_OUT))) * 0.2 + 0.1).astype(np.float32)
  z = np.zeros_like(s) if symmetric else rng.uniform(4, 11, s.shape).astype(np.float32)
  z_ref = np.round(z) if integer_zero else z
  ref, d_w, d_s, d_z = _np_fake_quant(w.astype(np.float64), s.astype(np.float64),
                                      z_ref.astype(np.float64), G, lo, hi)
  assert 0.05 < 1 - d_w.mean() < 0.95  # both clipped and unclipped entries are exercised
  f = lambda w, s, z: fake_quantize(w, s, z, group_size=G, symmetric=symmetric,
                                    integer_zero=integer_zero)
  np.testing.assert_allclose(np.asarray(f(w, s, z)), ref, rtol=1e-6, atol=1e-6)
  c = rng.standard_normal(w.shape).astype(np.float32)  # gradient of <c, Ŵ>
  gw, gs, gz = jax.grad(lambda *a: jnp.sum(c * f(*a)), argnums=(0, 1, 2))(w, s, z)
  np.testing.assert_allclose(np.asarray(gw), c * d_w, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gs), _group_sum(c * d_s, G), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gz), _group_sum(c * d_z, G), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("log_scale", [True, False])
def test_reparam_gradients_wrt_a_b_scale_zero_match_numpy(log_scale):
  """Chain rule through W = W0 + s A B, S = S0 exp(u) (or S0 + u), Z = Z0 + dz, against
  the float64 closed form, at a point with clipped and unclipped entries."""
  theta0 = _theta()
  reparam = l4q("layer/kernel", rank=R, alpha=ALPHA, group_size=G, log_scale=log_scale)
  rng = np.random.default_rng(2)
  a = (rng.standard_normal((D_IN, R)) * 0.1).astype(np.float32)
  b = (rng.standard_normal((R, D_OUT)) * 0.1).astype(np.float32)
  u = (rng.standard_normal((D_IN // G, D_OUT)) * 0.15).astype(np.float32)
  dz = rng.uniform(-0.5, 0.5, u.shape).astype(np.float32)
  phi = reparam.init(jax.random.key(0), theta0)
  phi["layer"]["kernel"] = {"a": jnp.asarray(a), "b": jnp.asarray(b), "scale": jnp.asarray(u),
                            "zero": jnp.asarray(dz)}
  c = rng.standard_normal((D_IN, D_OUT)).astype(np.float32)

  def loss(phi):
    return jnp.sum(c * lj.materialize(reparam.apply(theta0, phi)["layer"]["kernel"]))
  got = jax.grad(loss)(phi)["layer"]["kernel"]

  w0 = np.asarray(theta0["layer"]["kernel"], np.float64)
  s0, z0 = _np_minmax(np.asarray(theta0["layer"]["kernel"]), G, 4, False)
  scale = ALPHA / R
  s = s0 * np.exp(u.astype(np.float64)) if log_scale else s0 + u.astype(np.float64)
  z = z0 + dz.astype(np.float64)
  ref, d_w, d_s, d_z = _np_fake_quant(w0 + scale * a.astype(np.float64) @ b, s, z, G, 0, 15)
  assert 0.02 < 1 - d_w.mean() < 0.98
  np.testing.assert_allclose(np.asarray(loss(phi)), np.sum(c * ref), rtol=1e-5)
  g_w = c * d_w
  np.testing.assert_allclose(np.asarray(got["a"]), scale * g_w @ b.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got["b"]), scale * a.T @ g_w, rtol=1e-4, atol=1e-5)
  g_s = _group_sum(c * d_s, G) * (s if log_scale else 1.0)  # d/du of S0 exp(u) is S
  np.testing.assert_allclose(np.asarray(got["scale"]), g_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got["zero"]), _group_sum(c * d_z, G), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("symmetric,log_scale", [(False, True), (False, False), (True, True)])
def test_init_is_exactly_affine_quantization_of_w0(symmetric, log_scale):
  theta0 = _theta()
  reparam = l4q("layer/kernel", rank=R, alpha=ALPHA, group_size=G, symmetric=symmetric,
                log_scale=log_scale)
  phi = reparam.init(jax.random.key(0), theta0)
  p = phi["layer"]["kernel"]
  assert set(p) == ({"a", "b", "scale"} if symmetric else {"a", "b", "scale", "zero"})
  assert p["a"].shape == (D_IN, R) and p["scale"].shape == (D_IN // G, D_OUT)
  assert not np.any(np.asarray(p["b"])) and np.any(np.asarray(p["a"]))  # LoRA init
  theta = reparam.apply(theta0, phi)
  w = theta["layer"]["kernel"]
  assert isinstance(w, L4QWeight)
  ref = affine_encode(theta0["layer"]["kernel"], bits=4, symmetric=symmetric, granularity="group",
                      group_size=G)
  np.testing.assert_array_equal(np.asarray(lj.materialize(w)), np.asarray(ref.decode()))
  dep = l4q_merge(theta)["layer"]["kernel"].q
  for k in ("q", "scale", "zero"):
    np.testing.assert_array_equal(np.asarray(getattr(dep, k)), np.asarray(getattr(ref, k)))
  s0, z0 = _np_minmax(np.asarray(theta0["layer"]["kernel"]), G, 4, symmetric)  # independent
  np.testing.assert_allclose(np.asarray(ref.scale), s0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(ref.zero), z0)


def test_init_over_an_int4_base_keeps_its_codes():
  """The recipe's all-int4 encoder: L4Q over an int4 g-wise base starts from that model."""
  theta0 = _theta()
  theta_q = lj.quantize(theta0, "layer/kernel", codec="int4_affine", block_size=G, symmetric=False)
  reparam = l4q("layer/kernel", rank=R, group_size=G)
  theta = reparam.apply(theta_q, reparam.init(jax.random.key(0), theta_q))
  np.testing.assert_array_equal(np.asarray(l4q_merge(theta)["layer"]["kernel"].q.q),
                                np.asarray(theta_q["layer"]["kernel"].q.q))
  np.testing.assert_allclose(np.asarray(lj.materialize(theta["layer"]["kernel"])),
                             np.asarray(lj.materialize(theta_q["layer"]["kernel"])), atol=1e-7)


def test_lsq_grad_scale_scales_only_the_quantizer_gradients():
  theta0 = _theta()
  x = jnp.asarray(np.random.default_rng(3).standard_normal((8, D_IN)), jnp.float32)
  grads = []
  for scaled in (False, True):
    reparam = l4q("layer/kernel", rank=R, group_size=G, lsq_grad_scale=scaled)
    phi = reparam.init(jax.random.key(0), theta0)
    phi["layer"]["kernel"]["b"] = jnp.full((R, D_OUT), 0.05)
    phi["layer"]["kernel"]["scale"] = jnp.full((D_IN // G, D_OUT), -0.2)  # clips: dZ != 0
    f = lambda phi: jnp.sum(lj.dot(x, reparam.apply(theta0, phi)["layer"]["kernel"]) ** 2)
    grads.append(jax.grad(f)(phi)["layer"]["kernel"])
  g = 1 / np.sqrt(G * 15)
  for k in ("scale", "zero"):
    assert np.any(np.asarray(grads[0][k])), k
    np.testing.assert_allclose(np.asarray(grads[1][k]), g * np.asarray(grads[0][k]), rtol=1e-5, atol=1e-9)
  for k in ("a", "b"):
    np.testing.assert_array_equal(np.asarray(grads[1][k]), np.asarray(grads[0][k]))


@pytest.mark.parametrize("bits,integer_zero", [(4, False), (4, True), (8, False)])
def test_deployed_int_codes_equal_the_training_forward(bits, integer_zero):
  theta0 = _theta()
  reparam = l4q("layer/kernel", rank=R, alpha=ALPHA, group_size=G, bits=bits,
                integer_zero=integer_zero)
  phi = reparam.init(jax.random.key(0), theta0)
  rng = np.random.default_rng(4)
  p = phi["layer"]["kernel"]
  p["a"], p["b"] = (jnp.asarray(rng.standard_normal(p[k].shape) * 0.1, jnp.float32) for k in "ab")
  p["scale"] = jnp.asarray(rng.standard_normal(p["scale"].shape) * 0.1, jnp.float32)
  p["zero"] = jnp.asarray(rng.uniform(-0.7, 0.7, p["zero"].shape), jnp.float32)
  theta = reparam.apply(theta0, phi)
  dep = jax.jit(l4q_merge)(theta)
  w = dep["layer"]["kernel"]
  assert isinstance(w, QuantizedWeight) and w.q.group_size == G
  assert w.q.q.dtype == (jnp.uint4 if bits == 4 else jnp.uint8)
  zero = np.asarray(w.q.zero)
  assert np.array_equal(zero, np.round(zero)) == integer_zero
  assert l4q_merge(theta)["layer"]["bias"] is theta["layer"]["bias"]  # other leaves untouched
  train_w = np.asarray(lj.materialize(theta["layer"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(lj.materialize(w)), train_w)  # bit for bit
  np.testing.assert_array_equal(np.asarray(jax.jit(lj.materialize)(theta)["layer"]["kernel"]), train_w)
  x = jnp.asarray(rng.standard_normal((7, D_IN)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(lj.dot(x, w)), np.asarray(lj.dot(x, theta["layer"]["kernel"])))
  assert w.bits_per_param <= bits + 2 * 32 / G


def _regression(seed, n=256):
  """``y = x W*``, ``W* = W0 + low rank`` (below half a quantization step), inputs with a
  decaying covariance spectrum (feature scales ``exp(-i/8)`` in a random basis), split
  into train / held-out halves."""
  rng = np.random.default_rng(seed)
  theta0 = _theta(seed + 100)
  w0 = np.asarray(theta0["layer"]["kernel"], np.float64)
  w_star = w0 + 0.01 * rng.standard_normal((D_IN, R)) @ rng.standard_normal((R, D_OUT)) / np.sqrt(R)
  basis, _ = np.linalg.qr(rng.standard_normal((D_IN, D_IN)))
  xs = (rng.standard_normal((2 * n, D_IN)) * np.exp(-np.arange(D_IN) / 8.0)) @ basis.T
  x = jnp.asarray(xs / xs.std(), jnp.float32)
  y = x @ jnp.asarray(w_star, jnp.float32)
  return theta0, (x[:n], y[:n]), (x[n:], y[n:])


def _train(reparam, theta0, data, steps=150, lr=1e-2):
  x, y = data

  def loss(phi):
    return jnp.mean((lj.dot(x, reparam.apply(theta0, phi)["layer"]["kernel"]) - y) ** 2)
  phi = reparam.init(jax.random.key(1), theta0)
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  @jax.jit
  def run(phi):
    def body(carry, _):
      phi, state = carry
      upd, state = opt.update(jax.grad(loss)(phi), state, phi)
      return (optax.apply_updates(phi, upd), state), None
    return jax.lax.scan(body, (phi, opt.init(phi)), None, length=steps)[0][0]
  phi = run(phi)
  return phi, float(loss(phi))


@pytest.mark.parametrize("seed", [0, 1])
def test_qat_deployed_int4_beats_float_lora_then_int4(seed):
  """L4Q trains the deployed int4 model itself (its training loss is its deployed loss).
  The baseline trains LoRA in float (it fits W* almost exactly), merges, then quantizes
  with the same int4 g16 asymmetric affine min/max quantizer. With correlated inputs
  nearest rounding of W* is not the best grid point for the output error, and QAT finds a
  better one (measured held-out ratio L4Q / baseline about 0.5-0.7 over seeds; with
  isotropic inputs nearest rounding is optimal and the ratio is about 1.1-1.2)."""
  theta0, train, test = _regression(seed)

  def deployed_loss(w, data):
    return float(jnp.mean((data[0] @ lj.materialize(w) - data[1]) ** 2))
  q = dict(bits=4, symmetric=False, granularity="group", group_size=G)
  base_q = deployed_loss(affine_encode(theta0["layer"]["kernel"], **q).decode(), test)
  lora = lj.lora("layer/kernel", rank=R, alpha=ALPHA)
  phi_lora, train_lora = _train(lora, theta0, train)
  merged = lj.merge(lora, theta0, phi_lora)["layer"]["kernel"]
  lora_then_q = deployed_loss(affine_encode(merged, **q).decode(), test)
  assert train_lora < 0.01 * lora_then_q  # the float model fits; quantizing it costs
  reparam = l4q("layer/kernel", rank=R, alpha=ALPHA, group_size=G)
  phi, train_l4q = _train(reparam, theta0, train)
  deployed = l4q_merge(reparam.apply(theta0, phi))["layer"]["kernel"]
  np.testing.assert_allclose(deployed_loss(deployed, train), train_l4q, rtol=1e-5)  # no gap
  l4q_test = deployed_loss(deployed, test)
  assert l4q_test < 0.3 * base_q, (l4q_test, base_q)
  assert l4q_test < 0.8 * lora_then_q, (l4q_test, lora_then_q)


def test_bad_input_names_the_leaf():
  theta0 = _theta()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"group_size 24 does not divide d_in=64 of leaf "
                                       r"'layer/kernel' \(shape \(64, 24\)\)"):
    l4q("layer/kernel", group_size=24).init(key, theta0)
  with pytest.raises(ValueError, match=r"rank 32 exceeds .* 'layer/kernel' of shape \(64, 24\)"):
    l4q("layer/kernel", rank=32, group_size=G).init(key, theta0)
  with pytest.raises(ValueError, match=r"'layer/bias' has shape \(24,\), not a matrix"):
    l4q("layer/bias", group_size=G).init(key, theta0)
  # the shared LeafMethod dtype check (a TypeError, as for every method)
  with pytest.raises(TypeError, match=r"'layer/kernel' has dtype int32.*\(64, 24\)"):
    l4q("layer/kernel", group_size=G).init(key, {"layer": {"kernel": jnp.ones((D_IN, D_OUT), jnp.int32)}})
  with pytest.raises(ValueError, match="bits=4 or 8"):
    l4q("layer/kernel", bits=3)
  with pytest.raises(ValueError, match="rank must be a positive int"):
    l4q("layer/kernel", rank=0)
