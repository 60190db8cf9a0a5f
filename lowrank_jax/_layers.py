"""The layer table: which layer every module of lowrank_jax belongs to.

Imports point down (or sideways within a layer), never up, and never in a circle;
``tests/test_layering.py`` parses every module (module-level and function-level
imports) and checks both against this table. Bottom to top:

====  ==========================  =============================================================
 0    ops                         small numerical ops; this table
 1    core                        lazy weights (the ``dot`` dispatch), pytree paths and selection
 2    codecs, models, data, io    quant codecs and QLoRA's quantized weights, model families,
                                  datasets and tokenisation, safetensors reading, Flax layers
 3    reparam                     ``Reparam``, ``adapt``, ``chain``
 4    methods                     one module per PEFT method, including the quantization-aware
                                  ones (LoftQ, QA-LoRA, L4Q; their old ``quant.*`` paths too),
                                  and ``methods._config`` (their typed configs; imports no method)
 5    method registry             every method by name (may import every method)
 6    tools                       optimizers, merging, sharding, distributed, checkpoint, interop
 7    trainer                     typed configs, the training loop, the CLI
 8    api                         ``lowrank_jax/__init__``: the curated public API
 9    runnable                    ``experiments``, ``bench`` (outside the package: the library
                                  must never import them)
====  ==========================  =============================================================

A module's layer is that of the longest entry of :data:`MODULES` that is the module's
name or one of its parent packages; a module no entry covers is an error ("add it to
the layer table"). A new file inside an existing package (``lowrank_jax/models/x.py``)
takes the package's layer; a new top-level module or package needs an entry.

This module imports nothing.
"""

LAYER_NAMES = ("ops", "core", "codecs, models, data, io", "reparam", "methods", "method registry",
               "tools", "trainer", "api", "runnable")

MODULES = {
  # 0 ops
  "lowrank_jax._layers": 0,
  "lowrank_jax.ops": 0,
  # 1 core
  "lowrank_jax.lazy": 1,
  "lowrank_jax.tree": 1,
  "lowrank_jax.validate": 1,
  # 2 codecs, models, data, io
  "lowrank_jax.quant": 2,
  "lowrank_jax.models": 2,
  "lowrank_jax.data": 2,
  "lowrank_jax.io": 2,
  "lowrank_jax.nn": 2,
  # 3 reparam
  "lowrank_jax.reparam": 3,
  # 4 methods (the quantization-aware methods' old import paths are shims into methods/)
  "lowrank_jax.methods": 4,
  "lowrank_jax.quant.loftq": 4,
  "lowrank_jax.quant.qalora": 4,
  "lowrank_jax.quant.l4q": 4,
  # 5 method registry
  "lowrank_jax.methods.registry": 5,
  # 6 tools
  "lowrank_jax.optim": 6,
  "lowrank_jax.merging": 6,
  "lowrank_jax.sharding": 6,
  "lowrank_jax.distributed": 6,
  "lowrank_jax.checkpoint": 6,
  "lowrank_jax.interop": 6,
  # 7 trainer
  "lowrank_jax.trainer": 7,
  "lowrank_jax.train": 7,
  # 8 api
  "lowrank_jax": 8,
  # 9 runnable (not part of the package)
  "experiments": 9,
  "bench": 9,
}


def layer_of(module: str):
  """``(layer, entry)`` of a dotted module name, or ``None`` when no entry covers it."""
  parts = module.split(".")
  for i in range(len(parts), 0, -1):
    name = ".".join(parts[:i])
    if name in MODULES:
      if name == "lowrank_jax" and module != "lowrank_jax":
        return None  # the api layer is the package's __init__ only, not a catch-all
      return MODULES[name], name
  return None
