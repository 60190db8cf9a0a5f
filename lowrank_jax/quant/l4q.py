"""Old import path of :mod:`lowrank_jax.methods.l4q` (L4Q is a method: it moved to the
methods layer). The codec package :mod:`lowrank_jax.quant` does not import this module,
so importing a codec never imports a method; the layer table places it with the methods."""

from lowrank_jax.methods.l4q import (L4QWeight, code_range, fake_quantize, l4q, l4q_merge,
                                     minmax_quantizer)

__all__ = ["L4QWeight", "code_range", "fake_quantize", "l4q", "l4q_merge", "minmax_quantizer"]
