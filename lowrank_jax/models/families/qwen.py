"""Qwen2 / Qwen2.5 (q, k, v biases), Qwen3 (per-head RMSNorm of q and k) and Qwen3-MoE
(Hugging Face ``qwen2`` / ``qwen3`` / ``qwen3_moe``).

Sliding windows follow ``layer_types`` (or ``use_sliding_window`` from layer
``max_window_layers`` on); Qwen3-MoE applies its window to every layer. Qwen3-MoE
layers are sparse unless listed in ``mlp_only_layers`` or skipped by
``decoder_sparse_step``; its experts are stored one tensor per expert
(``mlp.experts.{e}.{gate,up,down}_proj``) and the router as ``mlp.gate``.
"""

from __future__ import annotations

from lowrank_jax.models.families.base import (COMMON_KEYS, LLAMA_MODULES, QK_NORM_MODULES, Family, _bias_read,
                                              layer_types_to_hf, register, rope_keys, rope_kwargs,
                                              sliding_layers_from_hf)

KEYS = COMMON_KEYS + (("hidden_act", "hidden_act", "silu"),
                      ("tie_word_embeddings", "tie_word_embeddings", False))


def _sliding_write(c) -> dict:
  out = layer_types_to_hf(c)
  sliding = [i for i, t in enumerate(out["layer_types"]) if t == "sliding_attention"]
  out["use_sliding_window"] = bool(sliding)
  out["max_window_layers"] = sliding[0] if sliding else c.num_layers
  return out


def _read(hf) -> dict:
  return {**rope_kwargs(hf), **sliding_layers_from_hf(hf, int(hf["num_hidden_layers"]), None)}


QWEN2 = register(Family(
  name="qwen2", model_types=("qwen2",), architecture="Qwen2ForCausalLM",
  keys=KEYS, fixed={"qkv_bias": True, "o_bias": False},
  modules=LLAMA_MODULES,
  read=_read,
  write=lambda c: {**rope_keys(c), **_sliding_write(c)},
))

QWEN3 = register(Family(
  name="qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM",
  keys=KEYS, fixed={"qk_norm": True},
  modules={**LLAMA_MODULES, **QK_NORM_MODULES},
  read=lambda hf: {**_read(hf), **_bias_read(hf)},
  write=lambda c: {**rope_keys(c), **_sliding_write(c), "attention_bias": c.qkv_bias},
))


def _moe_read(hf) -> dict:
  n = int(hf["num_hidden_layers"])
  experts = hf.get("num_experts", hf.get("num_local_experts"))
  if experts is None:
    raise ValueError("config.json (qwen3_moe) has no 'num_experts'")
  step = int(hf.get("decoder_sparse_step", 1) or 1)
  dense = set(hf.get("mlp_only_layers") or ())
  moe = tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)
  window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  return {**rope_kwargs(hf), **_bias_read(hf), "num_experts": int(experts),
          "num_experts_per_tok": int(hf["num_experts_per_tok"]),
          "moe_intermediate_size": int(hf["moe_intermediate_size"]),
          "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
          "moe_layers": None if len(moe) == n else moe,
          "sliding_window": None if window is None else int(window), "layer_types": None}


def _moe_write(c) -> dict:
  moe = [i for i in range(c.num_layers) if c.is_moe_layer(i)]
  return {**rope_keys(c), "attention_bias": c.qkv_bias, "num_experts": c.num_experts,
          "num_experts_per_tok": c.num_experts_per_tok, "moe_intermediate_size": c.expert_size,
          "norm_topk_prob": c.norm_topk_prob, "decoder_sparse_step": 1,
          "mlp_only_layers": [i for i in range(c.num_layers) if i not in moe],
          "use_sliding_window": c.sliding_window is not None, "sliding_window": c.sliding_window}


QWEN3_MOE = register(Family(
  name="qwen3_moe", model_types=("qwen3_moe",), architecture="Qwen3MoeForCausalLM",
  keys=KEYS, fixed={"qk_norm": True},
  modules={**LLAMA_MODULES, **QK_NORM_MODULES,
           "layers/layer_{i}/mlp/router": "model.layers.{i}.mlp.gate",
           "layers/layer_{i}/mlp/experts/gate_proj": "model.layers.{i}.mlp.experts.{e}.gate_proj",
           "layers/layer_{i}/mlp/experts/up_proj": "model.layers.{i}.mlp.experts.{e}.up_proj",
           "layers/layer_{i}/mlp/experts/down_proj": "model.layers.{i}.mlp.experts.{e}.down_proj"},
  read=_moe_read,
  write=_moe_write,
))
