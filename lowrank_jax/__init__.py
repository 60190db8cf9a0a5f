"""lowrank_jax: parameter-efficient fine-tuning as pure functions on JAX pytrees.

A method is a pair of pure functions, as an optax transformation is::

    import lowrank_jax as lj
    reparam = lj.lora(where=r"(query|value)/kernel", rank=8, alpha=16)
    phi = reparam.init(key, theta0)        # trainable parameters
    theta = reparam.apply(theta0, phi)     # lazy LoRA weights; lj.dot(x, w) multiplies them
    merged = lj.merge(reparam, theta0, phi)

Sub-packages: ``methods`` (one module per method; ``registry`` names them all, with typed
configs), ``quant`` (codecs, QLoRA, LoftQ,
QA-LoRA, L4Q, IR-QLoRA ICQ), ``optim`` (GaLore, 8-bit Adam, offload, LoRA+, memory report), ``models``
(BERT/MiniLM, Llama), ``data``, ``interop`` (HF safetensors, PEFT adapter folders).
"""

# core: trees, lazy weights, reparametrizations
from lowrank_jax.tree import (Siblings, combine, count_bytes, count_params, flatten_with_paths,
                              leaf_paths, partition, path_str, select)
from lowrank_jax.lazy import LazyWeight, dot, factored_matmul, materialize
from lowrank_jax.reparam import (LeafMethod, MatrixView, Reparam, adapt, adapt_with_bias, chain,
                                 initialize, merge, unmerge)

# methods (one module each)
from lowrank_jax.methods.full import full
from lowrank_jax.methods.lora import LoRAWeight, lora, lora_method, lora_scale
from lowrank_jax.methods.dora import DoRAWeight, dora
from lowrank_jax.methods.lokr import KronWeight, lokr
from lowrank_jax.methods.loha import LoHaWeight, loha
from lowrank_jax.methods.glora import glora, glora_search
from lowrank_jax.methods.ia3 import ia3
from lowrank_jax.methods.vera import vera
from lowrank_jax.methods.adalora import (adalora, orthogonal_regularizer, rank_allocator,
                                         with_rank_allocator)
from lowrank_jax.methods.said import intrinsic_said
from lowrank_jax.methods.adapters import bottleneck_adapters
from lowrank_jax.methods.prefix import prefix_reparam, prefix_tuning
from lowrank_jax.methods.loftq import loftq
from lowrank_jax.methods.qalora import qalora, qalora_merge
from lowrank_jax.methods.l4q import l4q, l4q_merge
from lowrank_jax.methods.batched import BatchedWeight, batched, batched_lora

# quantization: codecs (one registry: lj.quant.get_codec) and quantized frozen weights
from lowrank_jax.quant import (Blockwise8, Quant4, QuantizedWeight, affine_encode, dequantize,
                               fp4_encode, get_codec, icq_encode, nf4_encode, quantize)

# every method by name, with its typed config (lj.registry.build("lora", where=..., rank=8))
from lowrank_jax.methods import registry

# composition, merging, extraction
from lowrank_jax.merging import add_weighted_adapter, extract_lora, stack

# optimizers (optax transformations)
from lowrank_jax.optim import (adamw_8bit, galore_adamw, loraplus, make_optimizer, memory_report,
                               offload, scale_by_galore)

from lowrank_jax import checkpoint, nn, ops, sharding, train

__version__ = "0.1.0"
