"""The matmul floor of the MiniLM LoRA training step: every GEMM of ``bench.lora_step``'s
LoRA r=8 q,v step (B=32, T=64), timed alone, XLA and torch side by side.

    python -m bench.gemm_floor [--reps 10] [--threads N] [--no-torch]

A LoRA step on the frozen MiniLM does the full forward's matmuls and, in the backward
pass, the input gradient of every matmul that depends on the adapters (all but layer 0's
q, k, v projections, whose input is the frozen embedding output); weight gradients only
for the rank-8 factors. Summing each GEMM's median time alone (``count x time``) gives
a lower bound on the step from matmuls alone, before any elementwise, normalisation,
softmax or optimizer work. Compare it with the step times of ``bench.lora_step`` in the
same conditions: a step cannot be faster than its matmul floor on the same backend
(operands here are row-major; the step's transposed operands can only cost more).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bench import interleaved_medians

B, T, D, F, H, LAYERS, R = 32, 64, 384, 1536, 12, 6, 8
N = B * T
DH = D // H


def gemms() -> list[tuple[str, tuple[int, ...], tuple[int, ...], int]]:
  """``(what, lhs shape, rhs shape, count per step)``; 3-d shapes are batched matmuls."""
  bh = B * H
  fwd = [
    ("x @ W (q, k, v, o)", (N, D), (D, D), 4 * LAYERS),
    ("x @ W_in (FFN up)", (N, D), (D, F), LAYERS),
    ("h @ W_out (FFN down)", (N, F), (F, D), LAYERS),
    ("q k^T (per head)", (bh, T, DH), (bh, DH, T), LAYERS),
    ("p v (per head)", (bh, T, T), (bh, T, DH), LAYERS),
    ("x @ A, (xA) @ B (LoRA)", (N, D), (D, R), 2 * LAYERS),
  ]
  bwd = [
    ("dY @ W^T (o, and q, k, v of layers 1-5)", (N, D), (D, D), LAYERS + 3 * (LAYERS - 1)),
    ("dY @ W_out^T (FFN down)", (N, D), (D, F), LAYERS),
    ("dH @ W_in^T (FFN up)", (N, F), (F, D), LAYERS),
    ("attention backward (dP, dV, dQ, dK)", (bh, T, T), (bh, T, DH), 4 * LAYERS),
    ("LoRA dA, dB, d(xA)", (D, N), (N, R), 3 * 2 * LAYERS),
  ]
  return [("fwd: " + w, a, b, c) for w, a, b, c in fwd] + [("bwd: " + w, a, b, c) for w, a, b, c in bwd]


def flops(a: tuple[int, ...], b: tuple[int, ...]) -> float:
  return 2.0 * np.prod(a) * b[-1]


def total_flops() -> float:
  """FLOPs of all the step's GEMMs (each :func:`flops` times its count)."""
  return float(sum(c * flops(a, b) for _, a, b, c in gemms()))


def _operands(a, b):
  rng = np.random.default_rng(0)
  return rng.normal(size=a).astype(np.float32), rng.normal(size=b).astype(np.float32)


def _xla_matmul(a, b):
  import jax
  import jax.numpy as jnp

  mm = jax.jit(jnp.matmul)
  x, y = map(jnp.asarray, _operands(a, b))
  return lambda: jax.block_until_ready(mm(x, y))


def _torch_matmul(a, b):
  import torch

  x, y = map(torch.from_numpy, _operands(a, b))
  return lambda: torch.matmul(x, y)


def gemm_times(reps: int, threads: int, with_torch: bool = True) -> dict[str, list[float]]:
  """``{"XLA": [...], "torch": [...]}``: median time of each GEMM of :func:`gemms`, the two
  libraries interleaved call by call (``bench.interleaved_medians``), so a slow spell of
  the machine does not fall on one side only. ``torch`` is absent without ``with_torch``;
  importing torch raises ``ImportError`` when it is not installed."""
  libs = {"XLA": _xla_matmul}
  if with_torch:
    import torch

    torch.set_num_threads(threads)
    libs["torch"] = _torch_matmul
  out = {lib: [] for lib in libs}
  for _, a, b, _ in gemms():
    timed = interleaved_medians({lib: make(a, b) for lib, make in libs.items()}, reps)
    for lib in libs:
      out[lib].append(timed[lib][1])
  return out


def floor(times: list[float]) -> float:
  """Seconds per step: each GEMM's time times its count per step, summed."""
  return float(sum(c * t for (*_, c), t in zip(gemms(), times)))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--no-torch", action="store_true")
  a = p.parse_args(argv)
  try:
    times = gemm_times(a.reps, a.threads, with_torch=not a.no_torch)
  except ImportError as e:
    print(f"(torch not installed: {e}; reference column skipped)")
    times = gemm_times(a.reps, a.threads, with_torch=False)
  ours, ref = times["XLA"], times.get("torch")
  print(f"\nGEMMs of one MiniLM-L6 LoRA r8 q,v step, B={B} T={T}, median of {a.reps} alone "
        f"(XLA and torch interleaved), "
        f"{a.threads} threads\n")
  print("| GEMM | lhs x rhs | per step | XLA (ms) | XLA GFLOP/s |" + (" torch (ms) |" if ref else ""))
  print("|---|---|---:|---:|---:|" + ("---:|" if ref else ""))
  tot_x = tot_t = tot_f = 0.0
  for i, (what, sa, sb, count) in enumerate(gemms()):
    f = flops(sa, sb)
    tot_f += count * f
    tot_x += count * ours[i]
    row = f"| {what} | {sa} x {sb} | {count} | {ours[i] * 1e3:.2f} | {f / ours[i] / 1e9:.0f} |"
    if ref:
      tot_t += count * ref[i]
      row += f" {ref[i] * 1e3:.2f} |"
    print(row)
  print(f"\nmatmul floor per step: XLA {tot_x:.3f} s ({tot_f / 1e9:.1f} GFLOP, {tot_f / tot_x / 1e9:.0f} GFLOP/s)"
        + (f", torch {tot_t:.3f} s ({tot_f / tot_t / 1e9:.0f} GFLOP/s)" if ref else ""))


if __name__ == "__main__":
  main()
