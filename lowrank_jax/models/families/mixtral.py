"""Mixtral (Hugging Face ``mixtral``): Mistral attention, every layer a top-k routed
mixture of SwiGLU experts (renormalised top-k weights), stored one tensor per expert as
``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down) and the router
as ``block_sparse_moe.gate``. ``router_jitter_noise`` (training-time noise) is not
modelled.
"""

from __future__ import annotations

from lowrank_jax.models.families.base import COMMON_KEYS, LLAMA_MODULES, Family, register, rope_keys, rope_kwargs

_BLOCK = "model.layers.{i}.block_sparse_moe"


def _read(hf) -> dict:
  return {**rope_kwargs(hf, 1e6), "num_experts": int(hf["num_local_experts"]),
          "num_experts_per_tok": int(hf["num_experts_per_tok"])}


def _write(c) -> dict:
  return {**rope_keys(c), "num_local_experts": c.num_experts, "num_experts_per_tok": c.num_experts_per_tok}


MIXTRAL = register(Family(
  name="mixtral", model_types=("mixtral",), architecture="MixtralForCausalLM",
  keys=COMMON_KEYS + (("hidden_act", "hidden_act", "silu"), ("sliding_window", "sliding_window", None),
                      ("tie_word_embeddings", "tie_word_embeddings", False)),
  fixed={"norm_topk_prob": True, "moe_layers": None, "moe_intermediate_size": None},
  modules={**{k: v for k, v in LLAMA_MODULES.items() if "/mlp/" not in k},
           "layers/layer_{i}/mlp/router": _BLOCK + ".gate",
           "layers/layer_{i}/mlp/experts/gate_proj": _BLOCK + ".experts.{e}.w1",
           "layers/layer_{i}/mlp/experts/up_proj": _BLOCK + ".experts.{e}.w3",
           "layers/layer_{i}/mlp/experts/down_proj": _BLOCK + ".experts.{e}.w2"},
  read=_read,
  write=_write,
))
