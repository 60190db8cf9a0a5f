"""Optax transformations for PEFT and memory-lean full fine-tuning.

* :func:`galore_adamw`, :func:`scale_by_galore` - GaLore gradient low-rank projection
  (galore-torch compatible mode, bf16 projector, randomized SVD, sharding-safe).
* :func:`adamw_8bit`, :func:`scale_by_adam_8bit` - Adam with 8-bit blockwise moments.
* :func:`offload` - optimizer state in host memory, paged to the device per leaf.
* :func:`leafwise`, :func:`map_layers`, :func:`update_in_backward` - per-leaf / per-layer
  updates (the last inside the backward pass: one layer's gradient alive at a time).
* :func:`loraplus` - LoRA+ learning-rate ratio for the B factors.
* :func:`memory_report` - bytes of frozen / trainable / grads / optimizer state.
* :func:`make_optimizer` - any of the above from a config dict.
"""

from lowrank_jax.optim.galore import (GaLoreState, decay_after_update, galore_adamw,
                                      galore_state_bytes, projection_side, scale_by_adam_hf,
                                      scale_by_galore)
from lowrank_jax.optim.adam8bit import adamw_8bit, moment_bytes, scale_by_adam_8bit
from lowrank_jax.optim.leafwise import LeafwiseState, leafwise, map_layers, update_in_backward
from lowrank_jax.optim.offload import offload, offload_supported, state_memory_kinds
from lowrank_jax.optim.loraplus import loraplus, loraplus_labels
from lowrank_jax.optim.memory import MemoryReport, human_bytes, memory_report
from lowrank_jax.optim.factory import make_optimizer

__all__ = [
  "GaLoreState", "decay_after_update", "galore_adamw", "galore_state_bytes", "projection_side",
  "scale_by_adam_hf", "scale_by_galore",
  "adamw_8bit", "moment_bytes", "scale_by_adam_8bit",
  "LeafwiseState", "leafwise", "map_layers", "update_in_backward",
  "offload", "offload_supported", "state_memory_kinds",
  "loraplus", "loraplus_labels",
  "MemoryReport", "human_bytes", "memory_report", "make_optimizer",
]
