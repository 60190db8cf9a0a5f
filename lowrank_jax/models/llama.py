"""Llama-style decoder: the names of the former stand-alone module, now thin aliases over
:mod:`lowrank_jax.models.decoder` (which also covers Mistral, Qwen, Gemma and MoE families).

``LlamaConfig`` *is* :class:`~lowrank_jax.models.decoder.DecoderConfig` (``family="llama"``
by default; ``tiny()`` and ``llama_1b()`` presets, ``kv_heads`` / ``dim_head`` aliases),
``init_llama`` is :func:`~lowrank_jax.models.decoder.init_decoder`, and the forward
functions keep their old keyword names (``tokens``, ``positions``, ``attention_mask``,
``remat``, ``attention_impl``). Two behaviours follow the decoder: logits are float32,
and with an ``attention_mask`` and no ``positions`` the positions count real tokens
(left padding does not shift them).
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from lowrank_jax.models.attention import AttentionImpl
from lowrank_jax.models.decoder import (DecoderConfig, decoder_forward, decoder_hidden,
                                        decoder_param_count, init_decoder, rope, rope_angles)

__all__ = ["LlamaConfig", "init_llama", "llama_forward", "llama_hidden", "llama_param_count",
           "rope", "rope_angles"]

PyTree = Any
LlamaConfig = DecoderConfig
init_llama = init_decoder
llama_param_count = decoder_param_count


def llama_hidden(params: PyTree, config: DecoderConfig, tokens: jax.Array, *,
                 positions: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, remat: bool = False,
                 attention_impl: AttentionImpl = "auto") -> jax.Array:
  """Final-norm hidden states ``[B, T, D]`` (:func:`~lowrank_jax.models.decoder.decoder_hidden`)."""
  return decoder_hidden(params, config, tokens, attention_mask=attention_mask, positions=positions,
                        remat=remat, attention_impl=attention_impl)


def llama_forward(params: PyTree, config: DecoderConfig, tokens: jax.Array, *,
                  positions: Optional[jax.Array] = None,
                  attention_mask: Optional[jax.Array] = None, remat: bool = False,
                  attention_impl: AttentionImpl = "auto") -> jax.Array:
  """Next-token logits ``[B, T, V]`` in float32 (:func:`~lowrank_jax.models.decoder.decoder_forward`)."""
  return decoder_forward(params, config, tokens, attention_mask=attention_mask, positions=positions,
                         remat=remat, attention_impl=attention_impl)
