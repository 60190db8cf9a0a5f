"""Codecs: bitsandbytes-compatible NF4/FP4 and 8-bit blockwise codes, affine int codes,
IR-QLoRA's information-calibrated NF4, as pytree nodes under one protocol and one
registry (:mod:`lowrank_jax.quant.codecs`), and quantized frozen weights that decode
inside the matmul (QLoRA's :func:`quantize`).

The quantization-aware *methods* (LoftQ, QA-LoRA, L4Q) train adapters on these codecs;
they live in :mod:`lowrank_jax.methods` (``lowrank_jax.loftq`` etc.). Their old module
paths ``lowrank_jax.quant.loftq`` / ``.qalora`` / ``.l4q`` still import, but this package
does not import them: a codec never imports a method.
"""

from lowrank_jax.quant.affine import AffineQuant, affine_encode, quantization_error
from lowrank_jax.quant.blockwise import Blockwise8, blockwise8_decode, blockwise8_encode
from lowrank_jax.quant.codecs import ALIASES, CODECS, Codec, CodecSpec, get_codec
from lowrank_jax.quant.icq import icq_encode, icq_search
from lowrank_jax.quant.nf4 import Quant4, fp4_encode, nf4_encode
from lowrank_jax.quant.qlora import QuantizedWeight, dequantize, quantize, quantized_bytes

__all__ = ["AffineQuant", "affine_encode", "quantization_error", "Blockwise8", "blockwise8_encode",
           "blockwise8_decode", "Codec", "CodecSpec", "CODECS", "ALIASES", "get_codec", "Quant4",
           "nf4_encode", "fp4_encode", "QuantizedWeight", "dequantize", "quantize",
           "quantized_bytes", "icq_encode", "icq_search"]
