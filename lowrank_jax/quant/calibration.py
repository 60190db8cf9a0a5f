"""IR-QLoRA's information calibration (ICQ): the per-block shift search of the 4-bit codecs.

Qin et al., "Accurate LoRA-Finetuning Quantization of LLMs via Information
Retention" (IR-QLoRA), ICML 2024, arXiv 2402.05445. Plain NF4 codes ``x / m_b``
with ``m_b = max |x|`` over a block; a block whose values are not centred on 0
(a shifted or skewed block) uses few of the 16 codes. ICQ codes ``x - τ_b``
instead, with a per-block shift chosen to maximise the information (entropy)
of the block's codes, and adds ``τ_b`` back after decoding:

    τ0_b = median(block b)                     (lower median, as torch.median)
    τ_b(λ) = τ0_b + λ · max_i |x_i - τ0_b|
    λ_b = argmax_{λ in Λ} H(codes of x - τ_b(λ)),   H = -Σ_k p_k log2 p_k
    Λ = linspace(-r σ, +r σ, 2·steps + 1),  σ = 1 / Φ⁻¹(0.9677083) ≈ 0.5411

``p_k`` is the frequency of code ``k`` among the block's (up to ``block_size``)
codes, ``σ`` the standard deviation of NF4's normalised N(0, 1) quantiles, and
the reference defaults are ``r = 0.1``, ``steps = 51`` (103 candidates). Ties go
to the first (most negative) ``λ``, as the reference's strict ``>`` update.

Storage of ``τ``: the reference stores it in 8 bits (the signed dynamic map,
nearest code, one absmax per 256 blocks), i.e. :class:`Blockwise8` with
``rounding="nearest"``; here ``shift_storage="int8"`` does exactly that
(``"float16"`` / ``"float32"`` keep it wider). One deliberate difference: the
reference codes ``x - τ`` with the *unquantized* ``τ`` and adds the 8-bit ``τ̂``
back, so every value carries the extra error ``τ̂ - τ``; here the block is coded
as ``x - τ̂`` (the shift that decoding adds), so the decode error is only the 4-bit
error of ``x - τ̂``. Bits per parameter at block 64 with double quantization:
NF4 4.127 + 8-bit τ ``8/64 + 32/(64·256)`` = 4.254 (float16 τ: 4.377).

The search is vectorised: the candidate ``λ`` are a leading axis mapped in
batches (``jax.lax.map(..., batch_size=grid_batch)``, bounded memory), the blocks
a second axis, and it runs under ``jax.jit``. This module sits below the codec
(:mod:`lowrank_jax.quant.nf4` imports it; it imports only :mod:`blockwise`). Use it
through the codec's ``icq=True`` option::

    q = Quant4.encode(w, 64, double_quant=True, icq=True)      # or icq_encode / nf4_encode(w, icq=True)
    theta_q = lowrank_jax.quantize(theta0, r"kernel$", icq=True)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.quant.blockwise import (Blockwise8, to_blocks, num_blocks_of, block_absmax,
                                         check_block_size, code_index, normalize_blocks)

__all__ = [
  "NF4_SIGMA",
  "SHIFT_STORAGES",
  "ICQSearch",
  "lambda_grid",
  "block_median",
  "block_code_entropy",
  "icq_search",
  "icq_shift",
]

# 1 / Φ⁻¹(0.9677083): the std of NF4's normalised quantiles (the offset of bitsandbytes'
# create_normal_map); tests/quant/test_icq.py re-derives it with jax.scipy.special.ndtri.
NF4_SIGMA = 0.5410872368978237

SHIFT_STORAGES = ("int8", "float16", "float32")


class ICQSearch(NamedTuple):
  """Result of :func:`icq_search`, one entry per block.

  Attributes:
    tau: float32 ``[num_blocks]``, the chosen shift ``τ``.
    lam: float32 ``[num_blocks]``, the chosen ``λ``.
    index: int32 ``[num_blocks]``, the index of ``λ`` in :func:`lambda_grid`.
    entropy: float32 ``[num_blocks]``, the code entropy (bits) at ``τ``.
    entropy0: float32 ``[num_blocks]``, the code entropy of plain (unshifted) coding.
  """
  tau: jax.Array
  lam: jax.Array
  index: jax.Array
  entropy: jax.Array
  entropy0: jax.Array


def lambda_grid(tau_range: float = 0.1, steps: int = 51) -> np.ndarray:
  """The candidate ``λ``: float32 ``linspace(-r σ, r σ, 2 steps + 1)`` (``σ`` = :data:`NF4_SIGMA`)."""
  if not tau_range > 0:
    raise ValueError(f"ICQ tau_range must be > 0, got {tau_range}")
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"ICQ steps must be a positive int, got {steps!r}")
  r = float(tau_range) * NF4_SIGMA
  return np.linspace(-r, r, 2 * int(steps) + 1).astype(np.float32)


def _valid_counts(n: int, block_size: int) -> np.ndarray:
  """Number of real elements of each block (the last one may be partial)."""
  nb = num_blocks_of(n, block_size)
  counts = np.full(nb, block_size, np.int32)
  counts[-1] = n - (nb - 1) * block_size
  return counts


def block_median(flat: jax.Array, block_size: int) -> jax.Array:
  """float32 lower median of each block of a flat array (``torch.median``'s convention:
  the ``(k - 1) // 2``-th smallest of the block's ``k`` elements)."""
  flat = flat.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  nb = num_blocks_of(n, block_size)
  padded = jnp.pad(flat, (0, nb * block_size - n), constant_values=jnp.inf)
  srt = jnp.sort(padded.reshape(nb, block_size), axis=1)
  idx = jnp.asarray((_valid_counts(n, block_size) - 1) // 2)
  return jnp.take_along_axis(srt, idx[:, None], axis=1)[:, 0]


def block_code_entropy(codes: jax.Array, block_size: int, num_codes: int = 16) -> jax.Array:
  """Entropy (bits) of the code histogram of each block: ``-Σ_k p_k log2 p_k``.

  Args:
    codes: integer codes, flat ``[n]`` (the last block may be partial).
    block_size: elements per block.
    num_codes: size of the code book (16 for 4-bit).

  Returns:
    float32 ``[num_blocks]``. The counts are sorted before summing, so blocks whose
    histograms are permutations of each other get bit-identical entropies (the
    search's tie-breaking then depends on the histograms only, not on rounding).
  """
  codes = codes.reshape(-1).astype(jnp.int32)
  n = codes.shape[0]
  nb = num_blocks_of(n, block_size)
  blocks = jnp.pad(codes, (0, nb * block_size - n), constant_values=num_codes)
  blocks = blocks.reshape(nb, block_size)
  counts = jnp.sum(blocks[:, :, None] == jnp.arange(num_codes, dtype=jnp.int32), axis=1)
  counts = jnp.sort(counts, axis=1).astype(jnp.float32)
  p = counts / jnp.asarray(_valid_counts(n, block_size), jnp.float32)[:, None]
  return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)


def _shifted_codes(flat: jax.Array, tau: jax.Array, block_size: int, quant_type: str) -> jax.Array:
  """The 4-bit codes of ``x - τ`` exactly as :meth:`Quant4.encode` computes them."""
  n = flat.shape[0]
  y = (to_blocks(flat, block_size) - tau[:, None]).reshape(-1)[:n]
  z = normalize_blocks(y, block_absmax(y, block_size), block_size, "reciprocal")
  return code_index(z, quant_type)


def icq_search(x: jax.Array, block_size: int = 64, quant_type: str = "nf4",
               tau_range: float = 0.1, steps: int = 51,
               grid_batch: Optional[int] = None) -> ICQSearch:
  """Entropy-maximising per-block shift ``τ`` (see the module docstring).

  Args:
    x: the tensor (any shape; flattened row-major into blocks as the codec does).
    block_size: the codec's block (a power of two).
    quant_type: ``"nf4"`` or ``"fp4"`` (the code book whose histogram is measured).
    tau_range: ``r``; the grid spans ``±r σ``.
    steps: the grid has ``2 steps + 1`` points.
    grid_batch: grid points evaluated at once (default: as many as keep the
      working set near ``2**24`` elements).

  Returns:
    An :class:`ICQSearch` (float ``τ``, not yet rounded to its storage format).
  """
  block_size = check_block_size(block_size)
  flat = jnp.asarray(x).reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  nb = num_blocks_of(n, block_size)
  grid = jnp.asarray(lambda_grid(tau_range, steps))
  valid = jnp.asarray((np.arange(nb * block_size) < n).reshape(nb, block_size))
  tau0 = block_median(flat, block_size)
  spread = jnp.max(jnp.where(valid, jnp.abs(to_blocks(flat, block_size) - tau0[:, None]), 0.0), axis=1)

  def at(lam):
    tau = tau0 + lam * spread
    return tau, block_code_entropy(_shifted_codes(flat, tau, block_size, quant_type), block_size)

  if grid_batch is None:
    grid_batch = max(1, min(grid.shape[0], (1 << 24) // max(n, 1)))
  taus, ents = jax.lax.map(at, grid, batch_size=int(grid_batch))  # [G, nb] each
  best = jnp.argmax(ents, axis=0)                                    # first maximum
  pick = lambda a: jnp.take_along_axis(a, best[None, :], axis=0)[0]
  h0 = block_code_entropy(_shifted_codes(flat, jnp.zeros((nb,), jnp.float32), block_size,
                                         quant_type), block_size)
  return ICQSearch(tau=pick(taus), lam=grid[best], index=best.astype(jnp.int32),
                   entropy=pick(ents), entropy0=h0)


def icq_shift(x: jax.Array, block_size: int = 64, quant_type: str = "nf4",
              tau_range: float = 0.1, steps: int = 51, shift_storage: str = "int8",
              shift_block_size: int = 256, grid_batch: Optional[int] = None):
  """The ICQ shift in its storage format.

  Args:
    x: the tensor.
    block_size, quant_type, tau_range, steps, grid_batch: see :func:`icq_search`.
    shift_storage: ``"int8"`` (8-bit dynamic map, one absmax per ``shift_block_size``
      blocks, nearest rounding: IR-QLoRA's format), ``"float16"`` or ``"float32"``.
    shift_block_size: blocks per absmax of the 8-bit storage (a power of two).

  Returns:
    ``(stored, values)``: what :class:`Quant4` keeps in its ``shift`` field (a
    :class:`Blockwise8` or a float array) and its float32 value per block, the ``τ̂``
    that the encoder subtracts and the decoder adds.
  """
  if shift_storage not in SHIFT_STORAGES:
    raise ValueError(f"unknown ICQ shift_storage {shift_storage!r}; expected one of {SHIFT_STORAGES}")
  tau = icq_search(x, block_size, quant_type, tau_range, steps, grid_batch).tau
  if shift_storage == "int8":
    stored = Blockwise8.encode(tau, check_block_size(shift_block_size, "shift_block_size"),
                               rounding="nearest")
    return stored, stored.decode_float32()
  stored = tau.astype(jnp.dtype(shift_storage))
  return stored, stored.astype(jnp.float32)
