"""QLoRA memory and step time: a Llama-style decoder with bf16 vs NF4+DQ frozen weights.

    python -m bench.qlora_memory [--layers 22] [--batch 1] [--seq 64] [--steps 3] [--rank 16]

Default: TinyLlama-1.1B's shape (``LlamaConfig.llama_1b``: 1.1B parameters, random
weights), bfloat16. Two variants, each measured in a fresh subprocess so that peaks
do not mix:

* ``bf16``: frozen weights in bfloat16, LoRA (r=16, q/k/v/o/gate/up/down) on top;
* ``nf4``: the same with every linear kernel in NF4 + double quantization (block 64),
  generated and quantized one leaf at a time so the dense model never exists.
  Embedding, norms and LM head stay bfloat16 (as QLoRA).

The step is forward + backward of the LoRA loss (next-token cross-entropy) w.r.t. the
LoRA factors (no optimizer update), jitted, median of ``--steps`` after one warm-up.
Memory: process peak RSS (``VmHWM``) and RSS after building the weights on CPU;
``peak_bytes_in_use`` on a GPU. Frozen-weight bytes are counted from the buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def run_variant(args) -> dict:
  import jax
  import jax.numpy as jnp

  import lowrank_jax as lj
  from lowrank_jax.models import llama
  from lowrank_jax.quant.qlora import QuantizedWeight, encode_leaf

  cfg = llama.LlamaConfig.llama_1b(num_layers=args.layers)
  abstract = jax.eval_shape(lambda k: llama.init_llama(k, cfg, jnp.bfloat16), jax.random.PRNGKey(0))
  linear = r"layers/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
  mask = lj.select(abstract, linear)
  normal = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16),
                   static_argnums=1)
  encode = jax.jit(lambda w: encode_leaf(w, codec="nf4", block_size=64, double_quant=True))
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  flags = jax.tree_util.tree_leaves(mask)
  built = []
  frozen_linear_bytes = 0
  for i, (leaf, sel) in enumerate(zip(leaves, flags)):
    if len(leaf.shape) == 1:
      built.append(jnp.ones(leaf.shape, jnp.bfloat16))
      continue
    w = normal(jax.random.PRNGKey(i), tuple(leaf.shape))
    if sel and args.variant == "nf4":
      q = encode(w)
      jax.block_until_ready(q)
      del w
      built.append(QuantizedWeight(q=q, compute_dtype=jnp.bfloat16))
      frozen_linear_bytes += q.nbytes
    else:
      jax.block_until_ready(w)
      built.append(w)
      if sel:
        frozen_linear_bytes += w.size * 2
  theta0 = jax.tree_util.tree_unflatten(treedef, built)
  n_params = llama.llama_param_count(cfg)
  n_linear = sum(int(np.prod(l.shape)) for l, s in zip(leaves, flags) if s)
  rss_weights = _rss_kib("VmRSS")

  reparam = lj.lora(linear, rank=args.rank, alpha=2 * args.rank, dtype=jnp.bfloat16)
  phi = reparam.init(jax.random.PRNGKey(1), theta0)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (args.batch, args.seq + 1), 0, cfg.vocab_size)

  def loss(phi, theta0, tokens):
    logits = llama.llama_forward(reparam.apply(theta0, phi), cfg, tokens[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  step = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  jax.block_until_ready(step(phi, theta0, tokens))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(phi, theta0, tokens))
    times.append(time.perf_counter() - t0)
  out = {"variant": args.variant, "params": n_params, "linear_params": n_linear,
         "frozen_linear_bytes": frozen_linear_bytes,
         "bits_per_param_linear": 8.0 * frozen_linear_bytes / n_linear,
         "frozen_total_bytes": lj.count_bytes(theta0),
         "step_s": float(np.median(times)), "first_call_s": compile_s,
         "rss_after_weights_kib": rss_weights, "peak_rss_kib": _rss_kib("VmHWM"),
         "device": jax.devices()[0].platform}
  stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
  if stats:
    out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=22)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--variant", choices=["bf16", "nf4"], default=None,
                  help="run one variant in this process and print JSON (used internally)")
  args = ap.parse_args(argv)
  if args.variant:
    print("RESULT " + json.dumps(run_variant(args)), flush=True)
    return
  results = {}
  for v in ("bf16", "nf4"):
    cmd = [sys.executable, "-m", "bench.qlora_memory", "--variant", v, "--layers", str(args.layers),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--rank", str(args.rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      print(f"variant {v} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
      return
    results[v] = json.loads(line[0][7:])
  b, q = results["bf16"], results["nf4"]
  print(f"\nLlama-style decoder, {b['params'] / 1e9:.2f}B params ({args.layers} layers), LoRA r={args.rank} "
        f"on all linear layers, batch {args.batch} x seq {args.seq}, fwd+bwd, device {b['device']}")
  print(f"{'variant':8s} {'linear bits/param':>17s} {'frozen linear GB':>16s} {'all frozen GB':>13s} "
        f"{'RSS weights GB':>14s} {'peak RSS GB':>11s} {'step s':>8s}")
  for r in (b, q):
    print(f"{r['variant']:8s} {r['bits_per_param_linear']:17.3f} {r['frozen_linear_bytes'] / 1e9:16.3f} "
          f"{r['frozen_total_bytes'] / 1e9:13.3f} {r['rss_after_weights_kib'] * 1024 / 1e9:14.3f} "
          f"{r['peak_rss_kib'] * 1024 / 1e9:11.3f} {r['step_s']:8.3f}")
  print(f"frozen linear memory ratio nf4/bf16: {q['frozen_linear_bytes'] / b['frozen_linear_bytes']:.4f} "
        f"(goal 4.13/16 = {4.13 / 16:.4f}); peak RSS ratio {q['peak_rss_kib'] / b['peak_rss_kib']:.3f}; "
        f"step time ratio {q['step_s'] / b['step_s']:.2f}x (goal <= 1.3x)")
  if "device_peak_bytes" in b:
    print(f"device peak GB: bf16 {b['device_peak_bytes'] / 1e9:.3f}, nf4 {q['device_peak_bytes'] / 1e9:.3f}")


if __name__ == "__main__":
  main()
