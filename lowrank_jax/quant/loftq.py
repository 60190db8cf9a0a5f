"""Old import path of :mod:`lowrank_jax.methods.loftq` (LoftQ is a method: it moved to the
methods layer). The codec package :mod:`lowrank_jax.quant` does not import this module,
so importing a codec never imports a method; the layer table places it with the methods."""

from lowrank_jax.methods.loftq import loftq, loftq_decompose

__all__ = ["loftq", "loftq_decompose"]
