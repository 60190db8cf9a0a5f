"""Code books of the 4-bit and 8-bit codecs (bitsandbytes-compatible).

* NF4 (Dettmers et al., "QLoRA", arXiv 2305.14314): 16 quantiles of N(0, 1),
  normalised to [-1, 1], asymmetric (8 positive values, 7 negative, an exact 0),
  built by ``create_normal_map(offset=0.9677083)``. The table below is
  bitsandbytes' hard-coded one (re-deriving it with scipy agrees to 9e-8).
* FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2), listed in *bit-pattern*
  order (bit 3 is the sign), normalised by 12; so its table is not sorted.
* DYNAMIC8: the 8-bit "dynamic tree" map of Dettmers, "8-Bit Approximations for
  Parallelism in Deep Learning" (arXiv 1511.04561), bitsandbytes'
  ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``:
  for each exponent ``e = -6..0`` the midpoints of ``linspace(0.1, 1, 2**(e+6)+1)``
  scaled by ``10**e``, both signs, plus 0 and +1 (so it ends at -0.99296875 and
  +1.0). Its 127 positive magnitudes are listed as float32 values because
  torch's float32 ``linspace`` rounds differently from numpy's.

Decision thresholds: a value is coded by the index of the first threshold it does
not exceed (``x <= t`` goes left), with thresholds at the midpoints of the sorted
code (bitsandbytes' CUDA kernels and its torch backend). bitsandbytes' native CPU
kernel for the 8-bit blockwise codec instead uses a bucketed search whose float32
arithmetic (``H * (z - x0)`` with ``x0 = -1``) moves every decision boundary off the
midpoint, up to skipping the codes closest to 0; its 255 boundaries, measured by
bisection on bitsandbytes 0.50.2 (script: ``tests/golden/make_bnb_codecs.py``), are
``BNB_CPU_DYNAMIC8_THRESHOLDS`` (a value ``z`` gets ``#{k: t_k <= z}``).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
  "NF4_CODE",
  "FP4_CODE",
  "DYNAMIC8_CODE",
  "BNB_CPU_DYNAMIC8_THRESHOLDS",
  "code_book",
  "sorted_thresholds",
]

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)

FP4_CODE = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                     dtype=np.float32) / np.float32(12)).astype(np.float32)

_DYNAMIC8_POSITIVE = np.array([
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05,
    1.5625001e-04, 2.6875004e-04, 3.8125002e-04, 4.9375003e-04, 6.062501e-04, 7.1875006e-04,
    8.3125e-04, 9.437501e-04, 1.2812499e-03, 1.84375e-03, 2.40625e-03, 2.96875e-03, 3.5312497e-03,
    4.09375e-03, 4.6562497e-03, 5.2187503e-03, 5.78125e-03, 6.34375e-03, 6.90625e-03, 7.46875e-03,
    8.03125e-03, 8.59375e-03, 9.156249e-03, 9.71875e-03, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625, 0.036718752,
    0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375,
    0.07890625, 0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126,
    0.09859375, 0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376,
    0.19140625, 0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127,
    0.28984374, 0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624, 0.37421876,
    0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126, 0.45859373, 0.47265625,
    0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313, 0.5710938, 0.58515626,
    0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563,
    0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124, 0.79609376, 0.8101562,
    0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125, 0.9085938,
    0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874], dtype=np.float32)

DYNAMIC8_CODE = np.concatenate([-_DYNAMIC8_POSITIVE[::-1], np.zeros(1, np.float32),
                                _DYNAMIC8_POSITIVE, np.ones(1, np.float32)]).astype(np.float32)

_BNB_CPU_THRESHOLDS_HEX = (
    "bf7c66fcbf78ccf8bf7532f5bf7198f1bf6e00eebf6a66eabf66cce6bf6332e3bf5f98dfbf5c00dcbf5866d8bf54ccd4"
    "bf5132d1bf4d98cdbf4a00cabf4666c6bf42ccc2bf3f32bfbf3b98bbbf3800b8bf3466b4bf30ccb1bf2d32adbf2998a9"
    "bf2600a6bf2266a2bf1ecc9fbf1b329bbf179a97bf140094bf106690bf0ccc8dbf093289bf059a85bf020082befcccfd"
    "bef598f6beee64eebee734e9bee000e1bed8ccd9bed198d2beca64cabec334c5bebc00bdbeb4ccb5bead98aebea664a6"
    "be9f34a1be980099be90cc91be89988abe826482be7668fabe6800eabe5998dabe4b30cdbe3cd0bdbe2e68b2be2000a2"
    "be119892be033085bde9a0ebbdd290d4bdc710cbbdc140c4bdbb80bbbdb5c0bbbdb000b4bdaa40abbda480abbd9eb0a4"
    "bd98f09bbd933094bd8d7094bd87b08bbd81f084bd786108bd6cc0f7bd6140e8bd55c0d7bd4a40d7bd3ec0c8bd3340b7"
    "bd27a0a8bd1c20a8bd10a097bd052088bcf34110bcdc40efbcc500d0bcae00afbc9700afbc800090bc5200dfbc2d00df"
    "bc1a80a0bc1180a0bc0800a0bbfe0140bbec0140bbd90140bbc70140bbb400bfbba200bfbb8f00bfbb7a017fbb54017f"
    "bb30017fbb0c017fbacc0100ba900100ba680200ba480200ba300200ba100200b9e00400b9b00400b9600800b9000800"
    "b8c01000b8801000b8002000b3000000b3000000b3000000b3000000b3000000b3000000b3000000b300000037ff8000"
    "387fc00038bfe00038ffe000395ff00039aff80039dff8003a0ffc003a2ffc003a47fc003a67fc003a8ffe003acbfe00"
    "3b0bff003b2fff003b53ff003b79ff003b8f00813ba200813bb400813bc700813bd900813bec00813bfe00813c080041"
    "3c1180413c1a80413c2d00413c5200c03c8000603c9700603cae00a13cc500a13cdc40a13cf340e03d0520703d10a091"
    "3d1c20913d27a0913d3340b03d3ec0b03d4a40b03d55c0d13d6140d13d6cc0d13d7860f03d81f0783d87b0783d8d7089"
    "3d9330893d98f0983d9eb0983da480983daa40a93db000a93db5c0a93dbb80b83dc140b83dc710b83dd290c93de9a0e9"
    "3e03307c3e11988c3e20009c3e2e68ac3e3cd0bc3e4b30c53e5998d53e6800e53e7668f53e8264833e8998863e90cc8e"
    "3e9800963e9f349e3ea664a63ead98ab3eb4ccb33ebc00bb3ec334c33eca64cb3ed198ce3ed8ccd63ee000de3ee734e6"
    "3eee64ee3ef598f33efcccfb3f0200823f059a863f09328a3f0ccc8b3f10668f3f1400933f179a973f1b329b3f1ecc9e"
    "3f2266a23f2600a63f2998aa3f2d32ae3f30ccaf3f3466b33f3800b73f3b98bb3f3f32bf3f42ccc23f4666c63f4a00ca"
    "3f4d98ce3f5132d23f54ccd33f5866d73f5c00db3f5f98df3f6332e33f66cce63f6a66ea3f6e00ee3f7198f23f7532f6"
    "3f78ccf73f7c66fb3f7f18ff"
)

BNB_CPU_DYNAMIC8_THRESHOLDS = np.frombuffer(
    bytes.fromhex(_BNB_CPU_THRESHOLDS_HEX), dtype=">u4").astype(np.uint32).view(np.float32)

_BOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE, "dynamic8": DYNAMIC8_CODE}


def code_book(name: str) -> np.ndarray:
  """The float32 code table ``"nf4"``, ``"fp4"`` or ``"dynamic8"`` (index = stored code)."""
  try:
    return _BOOKS[name]
  except KeyError:
    raise ValueError(f"unknown code book {name!r}; expected one of {sorted(_BOOKS)}") from None


@functools.lru_cache(maxsize=None)
def sorted_thresholds(name: str, rounding: str = "nearest") -> tuple[np.ndarray, np.ndarray]:
  """``(thresholds, order)``: code ``order[searchsorted(thresholds, z)]`` for a value ``z``.

  Args:
    name: code book name.
    rounding: ``"nearest"`` (midpoints of the sorted code, ties to the lower code:
      bitsandbytes' CUDA and torch backends) or ``"bnb_cpu"`` (bitsandbytes' native
      CPU 8-bit kernel; ``dynamic8`` only).

  Returns:
    float32 thresholds (ascending) and the int32 permutation from sorted position to
    stored code. With ``"nearest"`` use ``searchsorted(..., side="left")``; with
    ``"bnb_cpu"`` use ``side="right"`` (see :func:`code_index`).
  """
  code = code_book(name)
  if rounding == "bnb_cpu":
    if name != "dynamic8":
      raise ValueError(f"rounding='bnb_cpu' exists only for the dynamic8 code book, not {name!r}")
    return BNB_CPU_DYNAMIC8_THRESHOLDS, np.arange(256, dtype=np.int32)
  if rounding != "nearest":
    raise ValueError(f"unknown rounding {rounding!r}; expected 'nearest' or 'bnb_cpu'")
  order = np.argsort(code, kind="stable").astype(np.int32)  # FP4: +0 (code 0) before -0 (code 8)
  s = code[order]
  return ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32), order


@functools.lru_cache(maxsize=None)
def max_rounding_error(name: str, rounding: str = "nearest") -> float:
  """``max |z - code[q(z)]|`` over normalised values ``z`` in ``[-1, 1]``.

  The values coded to the ``k``-th smallest code entry lie between thresholds
  ``k - 1`` and ``k`` of :func:`sorted_thresholds` (``-1`` and ``1`` at the ends), so the
  error is largest at one of those two ends. A codec that scales a block by its absmax
  ``m`` therefore decodes every element within ``max_rounding_error * m`` (NF4: 0.152,
  FP4: 0.167, dynamic8: 0.00703 nearest, 0.00705 ``bnb_cpu``).
  """
  thresholds, order = sorted_thresholds(name, rounding)
  values = code_book(name)[order].astype(np.float64)
  lo = np.concatenate([[-1.0], thresholds.astype(np.float64)])
  hi = np.concatenate([thresholds.astype(np.float64), [1.0]])
  used = lo <= hi
  err = np.maximum(np.abs(lo - values), np.abs(hi - values))
  return float(np.max(err[used]))
