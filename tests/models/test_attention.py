"""Attention: the closed-form backward (``impl="vjp"``) against JAX's autodiff of the
plain einsum formula, and every implementation's forward against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowrank_jax.models import attention as attn


def _np_attention(q, k, v, mask):
  """float64 reference; ``mask`` ``[B, H, T, S]``, fully masked rows attend uniformly."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  s = np.where(mask, s, np.finfo(np.float32).min)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _problem(seed, t, extra, kh, h=4, d=8, b=2, fully_masked=False):
  s = t + extra
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(b, t, h, d)), rng.normal(size=(b, s, kh, d)),
             rng.normal(size=(b, s, kh, d)))
  key_mask = np.ones((b, s), bool)
  key_mask[1, s - 1] = s == 1
  if fully_masked:
    key_mask[0] = False
  return [jnp.float32(a) for a in (q, k, v)], jnp.asarray(key_mask[:, None, None, :]), rng


@settings(max_examples=10, deadline=None)
@given(t=st.integers(1, 5), extra=st.integers(0, 3), kh=st.sampled_from([1, 2, 4]),
       causal=st.booleans(), impl=st.sampled_from(["vjp", "einsum", "dpa", "auto"]),
       fully_masked=st.booleans())
def test_forward_against_numpy(t, extra, kh, causal, impl, fully_masked):
  (q, k, v), key_mask, _ = _problem(t * 100 + extra * 10 + kh, t, extra, kh, fully_masked=fully_masked)
  b, s, h = q.shape[0], k.shape[1], q.shape[2]
  mask = np.broadcast_to(np.asarray(key_mask), (b, h, t, s)).copy()
  if causal:
    mask &= (np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t))[None, None]
  out = jax.jit(lambda q, k, v: attn.attention(q, k, v, mask=key_mask, causal=causal, impl=impl))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _np_attention(*map(np.float64, (q, k, v)), mask),
                             atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(t=st.integers(1, 6), extra=st.integers(0, 3), kh=st.sampled_from([1, 2, 4]),
       causal=st.booleans(), rate=st.sampled_from([0.0, 0.3]), fully_masked=st.booleans())
def test_vjp_gradients_equal_autodiff(t, extra, kh, causal, rate, fully_masked):
  """Outputs and the gradients of q, k, v of the closed-form backward equal autodiff of
  the einsum formula, with the same dropout mask (same key), GQA, causal masking and a
  fully masked query row (which gets no gradient)."""
  (q, k, v), key_mask, rng = _problem(t * 7 + extra + kh, t, extra, kh, fully_masked=fully_masked)
  w = jnp.float32(rng.normal(size=q.shape))
  key = jax.random.key(t + extra) if rate else None

  def loss(impl):
    def f(q, k, v):
      o = attn.attention(q, k, v, mask=key_mask, causal=causal, dropout_rate=rate, rng=key, impl=impl)
      return jnp.sum(o * w), o
    return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

  (gq, gk, gv), out = loss("vjp")(q, k, v)
  (rq, rk, rv), ref = loss("einsum")(q, k, v)
  for a, b_ in ((out, ref), (gq, rq), (gk, rk), (gv, rv)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-5, rtol=2e-5)
  if fully_masked:
    assert float(jnp.abs(gq[0]).max()) == 0.0


def test_vjp_second_use_of_dropout_key_draws_the_same_mask():
  """The backward redraws the forward's dropout mask from the key: the gradient of
  ``sum(out * w)`` w.r.t. ``v`` is ``P~^T w`` with the forward's dropped-out ``P~``."""
  (q, k, v), key_mask, rng = _problem(3, 4, 2, 2)
  key = jax.random.key(5)
  w = jnp.float32(rng.normal(size=q.shape))
  f = lambda v: jnp.sum(attn.attention(q, k, v, mask=key_mask, dropout_rate=0.5, rng=key,
                                       impl="vjp") * w)
  gv = jax.grad(f)(v)
  # f is linear in v: f(v) = <grad, v>, exactly when both passes use one mask.
  np.testing.assert_allclose(float(f(v)), float(jnp.sum(gv * v)), rtol=1e-5)
  # and the mask is a real one (half the probabilities dropped changes the output).
  plain = attn.attention(q, k, v, mask=key_mask, impl="vjp")
  assert float(jnp.abs(plain - attn.attention(q, k, v, mask=key_mask, dropout_rate=0.5, rng=key)).max()) > 1e-3


def test_errors_name_shapes():
  q = jnp.ones((1, 2, 4, 8))
  with pytest.raises(ValueError, match=r"divisible"):
    attn.attention(q, jnp.ones((1, 2, 3, 8)), jnp.ones((1, 2, 3, 8)))
  with pytest.raises(ValueError, match=r"\(1, 2, 4, 8\).*\(1, 2, 4, 4\)"):
    attn.attention(q, jnp.ones((1, 2, 4, 4)), jnp.ones((1, 2, 4, 4)))
  with pytest.raises(ValueError, match="dropout"):
    attn.attention(q, q, q, dropout_rate=0.1, rng=jax.random.key(0), impl="dpa")
  with pytest.raises(ValueError, match="impl"):
    attn.attention(q, q, q, impl="flash")


def test_vjp_without_mask_and_in_bfloat16():
  q = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
  k = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))
  grad = lambda impl, dt: jax.grad(lambda q, k: jnp.sum(attn.attention(
      q.astype(dt), k.astype(dt), k.astype(dt), impl=impl).astype(jnp.float32)), argnums=(0, 1))(q, k)
  for a, b in zip(grad("vjp", jnp.float32), grad("einsum", jnp.float32)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  out = attn.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  for a, b in zip(grad("vjp", jnp.bfloat16), grad("vjp", jnp.float32)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.1, rtol=0.05)
