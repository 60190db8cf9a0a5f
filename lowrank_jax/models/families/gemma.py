"""Gemma 1, 2 and 3 (Hugging Face ``gemma`` / ``gemma2`` / ``gemma3_text``).

All: RMSNorm scales ``(1 + w)`` computed in float32, embeddings times ``sqrt(D)``, a
GeGLU MLP (``gelu_pytorch_tanh``), tied embeddings by default. Gemma 2 adds sandwich
norms (``post_attention_layernorm`` on the attention output, ``pre_/post_feedforward_layernorm``
around the MLP), ``query_pre_attn_scalar``, soft-capping of attention scores and final
logits, and alternating sliding-window layers; Gemma 3 adds q/k norms and a separate
RoPE base for its sliding layers (``rope_parameters["sliding_attention"]``, formerly
``rope_local_base_freq``), with RoPE scaling on the global layers only.
"""

from __future__ import annotations

from lowrank_jax.models.families.base import (COMMON_KEYS, LLAMA_MODULES, QK_NORM_MODULES, Family, _bias_read,
                                              layer_types_to_hf, register, rope_from_hf, rope_keys,
                                              rope_kwargs, rope_to_hf, sliding_layers_from_hf)

_SWITCHES = {"norm_plus_one": True, "scale_embeddings": True}
_SANDWICH = {
  "layers/layer_{i}/pre_feedforward_norm": "model.layers.{i}.pre_feedforward_layernorm",
  "layers/layer_{i}/post_feedforward_norm": "model.layers.{i}.post_feedforward_layernorm",
}
_KEYS = COMMON_KEYS + (("tie_word_embeddings", "tie_word_embeddings", True),)
_KEYS2 = _KEYS + (("hidden_activation", "hidden_act", "gelu_pytorch_tanh"),
                  ("query_pre_attn_scalar", "query_pre_attn_scalar", 256),
                  ("attn_logit_softcapping", "attn_logit_softcapping", None),
                  ("final_logit_softcapping", "final_logit_softcapping", None))


GEMMA = register(Family(
  name="gemma", model_types=("gemma",), architecture="GemmaForCausalLM",
  keys=_KEYS + (("hidden_act", "hidden_act", "gelu_pytorch_tanh"),),
  fixed=_SWITCHES,
  modules=LLAMA_MODULES,
  read=lambda hf: {**rope_kwargs(hf), **_bias_read(hf)},
  write=lambda c: {**rope_keys(c), "attention_bias": c.qkv_bias},
))

GEMMA2 = register(Family(
  name="gemma2", model_types=("gemma2",), architecture="Gemma2ForCausalLM",
  keys=_KEYS2,
  fixed={**_SWITCHES, "sandwich_norms": True},
  modules={**LLAMA_MODULES, **_SANDWICH},
  read=lambda hf: {**rope_kwargs(hf), **_bias_read(hf),
                   **sliding_layers_from_hf(hf, int(hf["num_hidden_layers"]), lambda i: (i + 1) % 2 == 1)},
  write=lambda c: {**rope_keys(c), **layer_types_to_hf(c), "attention_bias": c.qkv_bias},
))


def _gemma3_read(hf) -> dict:
  theta, scaling = rope_from_hf(hf, 1e6, "full_attention")
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
    local, local_scaling = rope_from_hf(hf, 10000.0, "sliding_attention")
    if local_scaling is not None:
      raise NotImplementedError(f"config.json: RoPE scaling on Gemma 3's sliding layers ({local_scaling}) "
                                f"is not supported")
  else:
    local = float(hf.get("rope_local_base_freq", 10000.0))
  pattern = int(hf.get("sliding_window_pattern", 6) or 6)
  return {"rope_theta": theta, "rope_scaling": scaling, "rope_local_theta": local, **_bias_read(hf),
          **sliding_layers_from_hf(hf, int(hf["num_hidden_layers"]), lambda i: bool((i + 1) % pattern))}


def _gemma3_write(c) -> dict:
  full = rope_to_hf(c.rope_theta, c.rope_scaling)
  local = rope_to_hf(c.rope_theta if c.rope_local_theta is None else c.rope_local_theta, None)
  return {"rope_parameters": {"full_attention": full, "sliding_attention": local},
          **layer_types_to_hf(c), "attention_bias": c.qkv_bias}


GEMMA3 = register(Family(
  name="gemma3", model_types=("gemma3_text",), architecture="Gemma3ForCausalLM",
  keys=_KEYS2,
  fixed={**_SWITCHES, "sandwich_norms": True, "qk_norm": True},
  modules={**LLAMA_MODULES, **_SANDWICH, **QK_NORM_MODULES},
  read=_gemma3_read,
  write=_gemma3_write,
))
