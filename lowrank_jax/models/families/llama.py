"""Llama 1-3 and Mistral (Hugging Face ``llama`` / ``mistral``).

Llama: optional ``attention_bias`` (q, k, v, o) and ``mlp_bias``; RoPE scaling
``linear``, ``dynamic`` or ``llama3``. Mistral: no biases, every layer a sliding-window
layer when ``sliding_window`` is set.
"""

from __future__ import annotations

from lowrank_jax.models.families.base import (COMMON_KEYS, LLAMA_MODULES, Family, _bias_read, register,
                                              rope_keys, rope_kwargs)


LLAMA = register(Family(
  name="llama", model_types=("llama",), architecture="LlamaForCausalLM",
  keys=COMMON_KEYS + (("hidden_act", "hidden_act", "silu"), ("mlp_bias", "mlp_bias", False),
                      ("tie_word_embeddings", "tie_word_embeddings", False)),
  fixed={},
  modules=LLAMA_MODULES,
  read=lambda hf: {**rope_kwargs(hf), **_bias_read(hf)},
  write=lambda c: {**rope_keys(c), "attention_bias": c.qkv_bias},
))

MISTRAL = register(Family(
  name="mistral", model_types=("mistral",), architecture="MistralForCausalLM",
  keys=COMMON_KEYS + (("hidden_act", "hidden_act", "silu"), ("sliding_window", "sliding_window", None),
                      ("tie_word_embeddings", "tie_word_embeddings", False)),
  fixed={},
  modules=LLAMA_MODULES,
  read=rope_kwargs,
  write=rope_keys,
))
