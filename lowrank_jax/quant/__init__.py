"""Quantization: bitsandbytes-compatible NF4/FP4 and 8-bit blockwise codecs as pytree
nodes, quantized frozen weights that decode inside the matmul (QLoRA), affine
post-training quantization, LoftQ and QA-LoRA."""

from lowrank_jax.quant.blockwise import Blockwise8, blockwise8_decode, blockwise8_encode
from lowrank_jax.quant.nf4 import Quant4, fp4_encode, nf4_encode

__all__ = ["Blockwise8", "blockwise8_encode", "blockwise8_decode", "Quant4", "nf4_encode",
           "fp4_encode"]
