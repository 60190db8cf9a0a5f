"""IR-QLoRA's information-calibrated quantization (ICQ) as an option of the NF4/FP4 codec.

Qin et al., "Accurate LoRA-Finetuning Quantization of LLMs via Information
Retention" (IR-QLoRA), ICML 2024, arXiv 2402.05445. The entropy-maximising shift
search is :mod:`lowrank_jax.quant.calibration` (below the codec, which calls it for
``Quant4.encode(..., icq=True)``); this module gathers the public names::

    q = icq_encode(w, 64, double_quant=True)     # == Quant4.encode(w, 64, True, icq=True)
    code_entropy(q)                              # per-block entropy of the stored codes
"""

from __future__ import annotations

import jax

from lowrank_jax.quant.calibration import (NF4_SIGMA, SHIFT_STORAGES, ICQSearch, block_code_entropy,
                                           block_median, icq_search, icq_shift, lambda_grid)
from lowrank_jax.quant import calibration as _calibration
from lowrank_jax.quant.nf4 import Quant4, unpack_nibbles

__all__ = list(_calibration.__all__) + ["code_entropy", "icq_encode"]


def code_entropy(q: Quant4) -> jax.Array:
  """Per-block entropy (bits) of the stored codes of a :class:`~lowrank_jax.quant.nf4.Quant4`."""
  return block_code_entropy(unpack_nibbles(q.packed, q.size), q.block_size)


def icq_encode(x: jax.Array, block_size: int = 64, double_quant: bool = True,
               quant_type: str = "nf4", **kw) -> Quant4:
  """``Quant4.encode(x, block_size, double_quant, quant_type, icq=True, **kw)``."""
  return Quant4.encode(x, block_size, double_quant, quant_type, icq=True, **kw)
