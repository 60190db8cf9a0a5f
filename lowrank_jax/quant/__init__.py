"""Quantization: bitsandbytes-compatible NF4/FP4 and 8-bit blockwise codecs as pytree
nodes, quantized frozen weights that decode inside the matmul (QLoRA), affine
post-training quantization, LoftQ, QA-LoRA, L4Q and IR-QLoRA's information-calibrated NF4."""

from lowrank_jax.quant.affine import AffineQuant, affine_encode, quantization_error
from lowrank_jax.quant.blockwise import Blockwise8, blockwise8_decode, blockwise8_encode
from lowrank_jax.quant.icq import icq_encode, icq_search
from lowrank_jax.quant.l4q import L4QWeight, l4q, l4q_merge
from lowrank_jax.quant.loftq import loftq, loftq_decompose
from lowrank_jax.quant.nf4 import Quant4, fp4_encode, nf4_encode
from lowrank_jax.quant.qalora import QALoRAWeight, qalora, qalora_merge
from lowrank_jax.quant.qlora import QuantizedWeight, dequantize, quantize, quantized_bytes

__all__ = ["AffineQuant", "affine_encode", "quantization_error", "Blockwise8", "blockwise8_encode",
           "blockwise8_decode", "loftq", "loftq_decompose", "Quant4", "nf4_encode", "fp4_encode",
           "QALoRAWeight", "qalora", "qalora_merge", "QuantizedWeight", "dequantize", "quantize",
           "quantized_bytes", "icq_encode", "icq_search", "L4QWeight", "l4q", "l4q_merge"]
