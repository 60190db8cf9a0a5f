"""Drop-in Flax layers that keep lazy weights lazy, for users' own models.

Flax's ``nn.Dense`` and ``nnx.Linear`` call ``jnp.asarray`` on their kernel, which
materialises a lazy weight (correct, but the dense ``W0 + s A B`` and its gradient are
formed). These layers have the same parameter names and shapes (``kernel [in, out]``,
``bias [out]``) and multiply through :func:`lowrank_jax.dot`, so a tree from
``reparam.apply(theta0, phi)`` runs in factored form::

    class MLP(nn.Module):                       # linen
      @nn.compact
      def __call__(self, x):
        return lj.nn.Dense(4, name="out")(lj.nn.Dense(16, name="hidden")(x))

    y = MLP().apply({"params": reparam.apply(theta0, phi)}, x)

For NNX, build the model with :class:`Linear` and ``nnx.merge(graphdef, theta)`` with the
adapted state. Swapping ``nn.Dense`` for ``lj.nn.Dense`` changes nothing else.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import lazy

__all__ = ["Dense", "Linear"]


def _add_bias(y, bias):
  return y if bias is None else y + jnp.asarray(bias, y.dtype)


class Dense(linen.Module):
  """``nn.Dense`` that accepts lazy kernels: ``y = lj.dot(x, kernel) + bias``."""
  features: int
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = linen.initializers.lecun_normal()
  bias_init: Callable = linen.initializers.zeros_init()

  @linen.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return _add_bias(lazy.dot(x, kernel), bias)


class Linear(nnx.Linear):
  """``nnx.Linear`` that accepts lazy kernels (same constructor and parameters)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...] if not lazy.is_lazy(self.kernel.get_value()) else self.kernel.get_value()
    bias = None if self.bias is None else self.bias.get_value()
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return _add_bias(lazy.dot(x, kernel), bias)
