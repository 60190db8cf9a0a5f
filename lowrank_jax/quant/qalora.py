"""Old import path of :mod:`lowrank_jax.methods.qalora` (QA-LoRA is a method: it moved to the
methods layer). The codec package :mod:`lowrank_jax.quant` does not import this module,
so importing a codec never imports a method; the layer table places it with the methods."""

from lowrank_jax.methods.qalora import QALoRAWeight, group_pool, qalora, qalora_merge

__all__ = ["QALoRAWeight", "group_pool", "qalora", "qalora_merge"]
