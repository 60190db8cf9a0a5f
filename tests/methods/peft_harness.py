"""Shared harness: one ``nn.Linear(64, 48)`` adapted by peft (tests/golden/peft_*.npz).

Every golden file holds the base ``weight [out, in]`` and ``bias``, the input ``x``,
the output ``y``, the gradient of ``sum(y * G)`` for every trainable parameter and
the merged weight and bias. Our trees use the Flax layout: ``theta0 =
{'lin': {'kernel': W.T, 'bias': b}}``.

Parameter translation rule used by all our methods: each of our tensors is the
**transpose** of the peft tensor with the same name (``lora_A.weight [r, in]`` ->
``a [in, r]``), reshaped to our shape (peft's ``[out, 1]`` columns are our ``[out]``
vectors, its ``(1,)`` scalars our ``()``), so one ``spec`` ``{our phi path: peft
name}`` translates both the parameters and the gradients.
"""

from __future__ import annotations

from typing import Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

import lowrank_jax as lj
from tests.conftest import load_golden

PFX = "base_model.model.lin."


def golden_linear(name: str):
  """``(arrays, meta, theta0)`` for ``tests/golden/NAME``."""
  g, meta = load_golden(name)
  theta0 = {"lin": {"kernel": jnp.asarray(g["param/" + PFX + "base_layer.weight"].T),
                    "bias": jnp.asarray(g["param/" + PFX + "base_layer.bias"])}}
  return g, meta, theta0


def peft_param(g, name: str) -> jnp.ndarray:
  """The golden value of peft parameter ``NAME`` (e.g. ``"vera_A.default"``)."""
  return jnp.asarray(g["param/" + PFX + name])


def _get(tree, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _set(tree, path: str, value):
  keys = path.split("/")
  for k in keys[:-1]:
    tree = tree[k]
  tree[keys[-1]] = value


def phi_from_peft(g, reparam: lj.Reparam, theta0, spec: Mapping[str, str]):
  """Our ``phi`` (shapes from ``reparam.init``) filled with peft's values per ``spec``."""
  phi = _to_dicts(reparam.init(jax.random.key(0), theta0))  # a mutable copy
  got = set()
  for path, name in spec.items():
    ours = _get(phi, path)
    val = np.asarray(g["param/" + PFX + name]).T
    assert val.size == ours.size, f"{path}: peft {name} has {val.size} entries, ours {ours.shape}"
    _set(phi, path, jnp.asarray(val.reshape(ours.shape)))
    got.add(path)
  leaves = [p for p, x in lj.flatten_with_paths(phi) if x is not None]
  missing = set(leaves) - got
  assert not missing, f"phi leaves not covered by the spec: {sorted(missing)}"
  return phi


def assert_merge_is(g, delta_out_in: np.ndarray, *, atol: float = 1e-5):
  """Asserts peft's stored ``merged_weight`` is ``W + ΔW`` for ``ΔW`` in torch layout
  ``[out, in]`` (the paper's formula, evaluated in float64 from the stored parameters).

  Independent of our code: it checks the golden data against the method's math, and would
  catch a file whose ``base_layer.weight`` is already merged (``ΔW`` counted twice).
  """
  w = np.asarray(g["param/" + PFX + "base_layer.weight"], np.float64)
  delta = np.asarray(delta_out_in, np.float64)
  assert np.abs(delta).max() > 100 * atol, "ΔW is ~0: the check could not fail"
  np.testing.assert_allclose(g["merged_weight"], w + delta, rtol=0, atol=atol,
                             err_msg="stored merged_weight vs W + ΔW")


def _to_dicts(tree):
  """A copy of nested mappings as plain dicts (leaves shared)."""
  if isinstance(tree, Mapping):
    return {k: _to_dicts(v) for k, v in tree.items()}
  return tree


def forward(theta, x):
  """The adapted linear layer: ``x @ kernel + bias`` through :func:`lowrank_jax.dot`."""
  return lj.dot(x, theta["lin"]["kernel"]) + theta["lin"]["bias"]


def peft_linear(config, d_in: int = 64, d_out: int = 48):
  """peft's model around one ``torch.nn.Linear(d_in, d_out)`` named ``lin`` (the layer
  of the golden single-layer files); ``config`` is a peft config targeting ``lin``."""
  import peft
  import torch

  class M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
      return self.lin(x)
  return peft.get_peft_model(M(), config)


def check_against_peft(name: str, reparam: lj.Reparam, spec: Mapping[str, str], *,
                       lazy_type: Optional[type] = None, atol: float = 1e-5, rtol: float = 1e-4,
                       check_unmerge: bool = True):
  """Asserts that ``reparam`` reproduces peft on golden ``NAME``.

  Checks ``y``, every gradient named in ``spec`` and the merged weight and bias, on
  the lazy path (``lj.dot`` on the lazy weight, which must be a ``lazy_type`` when
  given) and on the dense path (``lj.materialize``); then ``unmerge(merge)`` when the
  reparam defines it. Every comparison is against the stored peft arrays.

  Returns:
    ``(g, meta, theta0, phi)`` for further method-specific checks.
  """
  g, meta, theta0 = golden_linear(name)
  phi = phi_from_peft(g, reparam, theta0, spec)
  x, G = jnp.asarray(g["x"]), jnp.asarray(g["G"])

  for path in ("lazy", "dense"):
    def loss(phi):
      theta = reparam.apply(theta0, phi)
      if path == "dense":
        theta = lj.materialize(theta)
        assert not isinstance(theta["lin"]["kernel"], lj.LazyWeight)
      elif lazy_type is not None:
        assert isinstance(theta["lin"]["kernel"], lazy_type), type(theta["lin"]["kernel"])
      y = forward(theta, x)
      return jnp.sum(y * G), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(phi)
    np.testing.assert_allclose(y, g["y"], rtol=rtol, atol=atol, err_msg=f"y ({path})")
    for p, peft_name in spec.items():
      key = "grad/" + PFX + peft_name
      assert key in g, f"golden {name} has no {key}"
      want = g[key]
      ours = np.asarray(_get(grads, p)).T.reshape(want.shape)
      np.testing.assert_allclose(ours, want, rtol=rtol, atol=atol, err_msg=f"grad {p} ({path})")

  merged = lj.merge(reparam, theta0, phi)
  np.testing.assert_allclose(merged["lin"]["kernel"], g["merged_weight"].T, rtol=rtol, atol=atol,
                             err_msg="merged weight")
  np.testing.assert_allclose(merged["lin"]["bias"], g["merged_bias"], rtol=rtol, atol=atol,
                             err_msg="merged bias")
  if check_unmerge and reparam.unmerge is not None:
    chex.assert_trees_all_close(lj.unmerge(reparam, merged, phi), theta0, atol=1e-4, rtol=1e-4)
  return g, meta, theta0, phi
