"""Regenerates the bitsandbytes codec reference data (optional; CI never runs this).

    python tests/golden/make_bnb_codecs.py [--out tests/golden] [--thresholds]

Needs torch==2.13.0 and bitsandbytes 0.50.2 (CPU). Writes ``bnb_codecs.npz/json``
(``quantize_4bit``/``dequantize_4bit`` for NF4/FP4, blocks 64/128, with and without
double quantization, and ``quantize_blockwise``) with the keys, cases, shapes and
dtypes described in tests/golden/README.md; the inputs are this script's own seeded
draws (the committed file came from the project's reference run in shared/golden). With ``--thresholds`` it instead measures, by
bisection over float32 bit patterns, the 255 decision boundaries of bitsandbytes'
native CPU 8-bit kernel (``lowrank_jax.quant.codebooks.BNB_CPU_DYNAMIC8_THRESHOLDS``)
and prints them as hex.
"""

import argparse
import json
import pathlib

import numpy as np


def _ordered(x):
  i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
  return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def _unordered(o):
  o = np.asarray(o, np.int64)
  return np.where(o < 0, (-o) | 0x80000000, o).astype(np.uint32).view(np.float32)


def thresholds():
  import torch
  import bitsandbytes.functional as F

  def q(vals):  # values in [-1, 1], each block led by 1.0 so that absmax = 1 exactly
    v = np.asarray(vals, np.float32)
    m = -(-len(v) // 255) * 255
    pad = np.zeros(m, np.float32)
    pad[: len(v)] = v
    xs = np.concatenate([np.ones((m // 255, 1), np.float32), pad.reshape(-1, 255)], 1).reshape(-1)
    codes, _ = F.quantize_blockwise(torch.tensor(xs), blocksize=256)
    return codes.numpy().reshape(-1, 256)[:, 1:].reshape(-1)[: len(v)]

  k = np.arange(1, 256)
  lo = np.full(255, _ordered(np.float32(-1.0)) - 1)
  hi = np.full(255, _ordered(np.float32(1.0)))
  while (hi - lo > 1).any():
    mid = (lo + hi) // 2
    up = q(_unordered(mid)) >= k
    hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
  t = _unordered(hi)
  z = np.clip(np.random.default_rng(0).normal(0, 0.3, 100000), -1, 1).astype(np.float32)
  assert (np.searchsorted(t, z, side="right") == q(z)).all(), "kernel is not a monotone step function"
  return t


def golden(out: pathlib.Path):
  import torch
  import bitsandbytes.functional as F

  g = torch.Generator().manual_seed(0)
  inputs = {"w": torch.randn(256, 512, generator=g) * 0.02,
            "odd": torch.randn(3, 333, generator=g),
            "bf16": torch.randn(64, 128, generator=g).to(torch.bfloat16),
            "heavy": torch.distributions.StudentT(2.0).sample((4096,))}
  arrays, cases = {}, []
  for name, x in inputs.items():
    cases.append({"name": name, "dtype": str(x.dtype), "shape": list(x.shape)})
    arrays[f"{name}/x"] = x.float().numpy()
    for qt in ("nf4", "fp4"):
      for dq in (0, 1):
        for bs in (64, 128):
          p = f"{name}/{qt}/dq{dq}/bs{bs}/"
          packed, st = F.quantize_4bit(x, blocksize=bs, compress_statistics=bool(dq), quant_type=qt)
          arrays[p + "packed"] = packed.numpy().reshape(-1)
          arrays[p + "absmax"] = st.absmax.numpy()
          arrays[p + "dequant"] = F.dequantize_4bit(packed, st).float().numpy()
          arrays[p + "code"] = st.code.numpy()
          if dq:
            arrays[p + "offset"] = st.offset.numpy()
            arrays[p + "absmax2"] = st.state2.absmax.numpy()
            arrays[p + "code2"] = st.state2.code.numpy()
            arrays[p + "blocksize2"] = np.array(st.state2.blocksize)
    codes, st = F.quantize_blockwise(x.float().reshape(-1), blocksize=256)
    arrays[f"{name}/blockwise8/q"] = codes.numpy()
    arrays[f"{name}/blockwise8/absmax"] = st.absmax.numpy()
    arrays[f"{name}/blockwise8/code"] = st.code.numpy()
    arrays[f"{name}/blockwise8/dequant"] = F.dequantize_blockwise(codes, st).numpy()
  np.savez(out / "bnb_codecs.npz", **arrays)
  (out / "bnb_codecs.json").write_text(json.dumps({"cases": cases, "source": "bitsandbytes"}, indent=1))


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent))
  ap.add_argument("--thresholds", action="store_true")
  a = ap.parse_args()
  if a.thresholds:
    print("".join("%08x" % v for v in thresholds().view(np.uint32)))
  else:
    golden(pathlib.Path(a.out))
