"""One module per PEFT method; each exposes a constructor returning a :class:`Reparam`.

:mod:`lowrank_jax.methods.registry` lists them all by name, with a typed config each.
"""
