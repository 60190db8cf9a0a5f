"""lowrank_jax: parameter-efficient fine-tuning as pure functions on JAX pytrees.

    import lowrank_jax as lj
    reparam = lj.lora(where=r"(query|value)/kernel", rank=8, alpha=16)
    phi = reparam.init(key, theta0)
    theta = reparam.apply(theta0, phi)          # lazy LoRA weights, used by lj.dot
"""

from lowrank_jax.tree import (Siblings, combine, count_bytes, count_params, flatten_with_paths,
                              leaf_paths, partition, path_str, select)
from lowrank_jax.lazy import LazyWeight, dot, factored_matmul, materialize
from lowrank_jax.reparam import (LeafMethod, MatrixView, Reparam, adapt, chain, initialize, merge,
                                 unmerge)
from lowrank_jax.methods.full import full
from lowrank_jax.methods.lora import LoRAWeight, lora, lora_method, lora_scale

__version__ = "0.1.0"
