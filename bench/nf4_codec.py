"""NF4 + double-quant codec throughput: ours (jitted JAX) vs bitsandbytes on the same tensor.

    python -m bench.nf4_codec [--size 4096] [--reps 20] [--block 64] [--no-bnb]

A float32 ``size x size`` N(0,1) matrix (default 4096^2 = 16.8M params, as the
bitsandbytes reference measurements in bench/README.md), NF4 with double quantization,
block 64. Each time is the median of ``--reps`` calls after 2 warm-ups
(``block_until_ready`` for JAX). bitsandbytes runs with ``torch.set_num_threads``
equal to the CPU count JAX sees. Also checks that both produce identical bytes.
The machine is shared: compare ratios inside one run.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bench import median_time




def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", type=int, default=4096)
  ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", 20)))
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--no-dq", action="store_true")
  ap.add_argument("--no-bnb", action="store_true")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from lowrank_jax.quant.nf4 import Quant4

  dq = not args.no_dq
  x_np = np.random.default_rng(0).standard_normal((args.size, args.size)).astype(np.float32)
  n = x_np.size
  x = jnp.asarray(x_np)
  enc = jax.jit(lambda x: Quant4.encode(x, args.block, dq, "nf4"))
  dec = jax.jit(lambda q: q.decode())
  q = enc(x)
  jax.block_until_ready(q)
  rows = []
  t_enc = median_time(lambda: jax.block_until_ready(enc(x)), args.reps)
  t_dec = median_time(lambda: jax.block_until_ready(dec(q)), args.reps)
  err = float(jnp.mean(jnp.abs(dec(q) - x)))
  rows.append(("lowrank_jax (JAX, jit)", t_enc, t_dec, q.bits_per_param, err))

  same = None
  if not args.no_bnb:
    try:
      import torch
      import bitsandbytes.functional as F
    except Exception as e:  # optional reference
      print(f"(bitsandbytes not available: {type(e).__name__}: {e})")
    else:
      torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
      xt = torch.from_numpy(x_np)
      packed, state = F.quantize_4bit(xt, blocksize=args.block, compress_statistics=dq, quant_type="nf4")
      tb_enc = median_time(lambda: F.quantize_4bit(xt, blocksize=args.block, compress_statistics=dq,
                                                quant_type="nf4"), args.reps)
      tb_dec = median_time(lambda: F.dequantize_4bit(packed, state), args.reps)
      ref = F.dequantize_4bit(packed, state)
      bnb_bytes = packed.numel() + sum(t.numel() * t.element_size() for t in
                                       ([state.absmax] + ([state.state2.absmax] if dq else [])))
      rows.append((f"bitsandbytes {getattr(__import__('bitsandbytes'), '__version__', '?')} (CPU)",
                   tb_enc, tb_dec, 8.0 * (bnb_bytes + (4 if dq else 0)) / n,
                   float((ref - xt).abs().mean())))
      same = (np.array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
              and np.array_equal(np.asarray(dec(q)), ref.numpy()))

  print(f"\nNF4{'+DQ' if dq else ''} block {args.block}, {args.size}x{args.size} float32 "
        f"({n / 1e6:.1f}M params), median of {args.reps}; devices: {jax.devices()[0].platform} x{jax.device_count()}")
  print(f"{'implementation':34s} {'encode s':>9s} {'Mparam/s':>9s} {'decode s':>9s} {'Mparam/s':>9s} "
        f"{'bits/param':>10s} {'mean|err|':>9s}")
  for name, te, td, bits, e in rows:
    print(f"{name:34s} {te:9.4f} {n / te / 1e6:9.1f} {td:9.4f} {n / td / 1e6:9.1f} {bits:10.4f} {e:9.5f}")
  if len(rows) == 2:
    print(f"speed-up vs bitsandbytes: encode {rows[1][1] / rows[0][1]:.2f}x, decode {rows[1][2] / rows[0][2]:.2f}x")
  if same is not None:
    print(f"identical packed bytes and decoded values: {same}")


if __name__ == "__main__":
  main()
