"""Hugging Face ``safetensors`` weights <-> nested Flax-style parameter dicts.

Moved below the models to :mod:`lowrank_jax.io.hf` (models load weights without
importing ``interop``); this module re-exports it unchanged. Whole decoder folders
(``config.json`` + single or sharded safetensors) are :func:`lowrank_jax.models.load_pretrained`.
"""

from lowrank_jax.io.hf import (Rule, __all__, convert_state_dict, default_rules, flatten, load_hf_tree,
                               load_safetensors, rename, save_safetensors, to_torch_state_dict,
                               unflatten)
