"""GaLore benchmark: ours vs optax.contrib.galore vs optax.adamw (and galore-torch + torch
AdamW if torch imports), state bytes and step times side by side in one run.

    python -m bench.galore [--steps 8] [--dim 1024] [--layers 4] [--batch 256]
                           [--rank 128] [--gap 200] [--no-torch] [--no-offload]

Setup as the galore-torch reference measurements (bench/README.md): ``layers`` x
(Linear(dim, dim) + GELU), batch 256, MSE to a random target, rank 128, update_proj_gap 200,
scale 0.25, lr 1e-3, GaLore on the 4 weight matrices, plain Adam(W) on the biases. Figures:

* state: optimizer state bytes (and its ratio to AdamW's);
* step: jitted fwd + bwd + optimizer on a non-refresh step (median of ``--steps``);
* opt: the optimizer update alone (jitted), non-refresh step;
* refresh: the full step on a projector-refresh step (SVD of every matrix);
* amortized: ``(refresh + (gap - 1) * step) / gap``.

``--orthonormalize`` times the projector's orthonormalization (ours vs ``jnp.linalg.qr``).

``--minilm`` prints :func:`lowrank_jax.optim.memory_report` totals (via ``jax.eval_shape``)
for MiniLM-L6 full fine-tuning with AdamW / GaLore / GaLore + 8-bit and LoRA with fp32 / 8-bit
AdamW.

The ``--offload`` section compiles the step with :func:`lowrank_jax.optim.offload` and
prints XLA's memory analysis (device vs host argument bytes) and, on GPU, the peak device
memory with and without it; on CPU there is no separate host memory and it says so.

Timings are medians after 2 warm-up steps; the machine is shared (2 cores), compare
ratios within one run.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bench import median_time




HEADER = (f"{'optimizer':<30}{'state bytes':>14}{'x AdamW':>9}{'step s':>9}{'opt s':>9}"
          f"{'refresh s':>11}{'amort. s':>10}")


def _fmt_row(r) -> str:
  fmt = lambda t: "-" if t is None else f"{t:.4f}"
  return (f"{r['name']:<30}{r['bytes']:>14,}{r['ratio']:>9.3f}{fmt(r['step']):>9}{fmt(r['opt']):>9}"
          f"{fmt(r['refresh']):>11}{fmt(r['amortized']):>10}")


def _print_row(r) -> None:
  print("  done: " + _fmt_row(r), flush=True)


def _set_count(state, value):
  """Sets the step count of the GaLore state (first element of the chain) to ``value``."""
  import jax.numpy as jnp
  g = state[0]
  return (g._replace(count=jnp.asarray(value, jnp.int32)),) + tuple(state[1:])


def jax_figures(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import optax

  from lowrank_jax.optim import galore_adamw
  from lowrank_jax.tree import count_bytes

  d, L, B = args.dim, args.layers, args.batch
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * L + 2)
  params = {f"l{i}": {"w": jax.random.normal(keys[i], (d, d)) / np.sqrt(d), "b": jnp.zeros(d)}
            for i in range(L)}
  x = jax.random.normal(keys[-2], (B, d))
  y = jax.random.normal(keys[-1], (B, d))

  def loss_fn(p):
    h = x
    for i in range(L):
      h = jax.nn.gelu(h @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"], approximate=False)
    return jnp.mean((h - y) ** 2)

  lr, rank, gap, scale = 1e-3, args.rank, args.gap, 0.25
  where = r"/w$"
  variants = {
    "optax.adamw": (optax.adamw(lr, eps=1e-8, weight_decay=0.0), False),
    "optax.contrib.galore": (optax.contrib.galore(lr, rank=rank, update_proj_gap=gap, scale=scale), True),
    "ours galore_adamw (bf16 P)": (galore_adamw(lr, rank, update_proj_gap=gap, scale=scale, where=where), True),
    "ours, randomized SVD": (galore_adamw(lr, rank, update_proj_gap=gap, scale=scale, where=where,
                                          svd="randomized"), True),
    "ours, galore-torch compat": (galore_adamw(lr, rank, update_proj_gap=gap, scale=scale, where=where,
                                               compat="galore_torch"), True),
    "ours, 8-bit moments": (galore_adamw(lr, rank, update_proj_gap=gap, scale=scale, where=where,
                                         moments="8bit"), True),
  }
  rows = []
  adam_bytes = None
  for name, (tx, is_galore) in variants.items():
    state = tx.init(params)
    nbytes = count_bytes(state)
    adam_bytes = adam_bytes or nbytes

    @jax.jit
    def step(p, s, tx=tx):
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    opt_only = jax.jit(tx.update)
    grads = jax.grad(loss_fn)(params)
    # step 1 is a non-refresh step for every GaLore (refreshes happen at 0, gap, 2 gap...)
    p, s, _ = step(params, state)
    jax.block_until_ready(s)
    holder = {"p": p, "s": s}

    def normal():
      holder["p"], s2, l = step(holder["p"], holder["s"])
      if is_galore:
        s2 = _set_count(s2, 1)
      holder["s"] = s2
      jax.block_until_ready(l)

    t_step = median_time(normal, args.steps)
    t_opt = median_time(lambda: jax.block_until_ready(opt_only(grads, holder["s"], holder["p"])),
                         args.steps)
    t_ref = None
    if is_galore:
      def refresh():
        s_r = _set_count(holder["s"], gap)
        _, s2, l = step(holder["p"], s_r)
        jax.block_until_ready(l)
      # the refresh branch is part of the compiled step (lax.cond): no extra warm-up
      t_ref = median_time(refresh, max(2, args.steps // 3), warmup=0)
    amort = (t_ref + (gap - 1) * t_step) / gap if t_ref else t_step
    rows.append(dict(name=name, bytes=nbytes, ratio=nbytes / adam_bytes, step=t_step, opt=t_opt,
                     refresh=t_ref, amortized=amort))
    _print_row(rows[-1])
  return rows


def torch_figures(args) -> list[dict]:
  try:
    import torch
    from galore_torch import GaLoreAdamW
  except Exception as e:  # optional reference
    print(f"(torch reference skipped: {type(e).__name__}: {e})")
    return []
  import warnings
  warnings.filterwarnings("ignore", category=FutureWarning)
  torch.manual_seed(0)
  torch.set_num_threads(int(os.environ.get("THREADS", "2")))
  d, L, B = args.dim, args.layers, args.batch
  gap = args.gap

  def build():
    layers = []
    for _ in range(L):
      layers += [torch.nn.Linear(d, d), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)

  x, y = torch.randn(B, d), torch.randn(B, d)
  rows = []
  for name in ("torch AdamW", "galore-torch GaLoreAdamW"):
    model = build()
    if name == "torch AdamW":
      opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    else:
      ws = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
      bs = [m.bias for m in model if isinstance(m, torch.nn.Linear)]
      opt = GaLoreAdamW([{"params": bs}, {"params": ws, "rank": args.rank, "update_proj_gap": gap,
                                          "scale": 0.25, "proj_type": "std"}], lr=1e-3)

    def fwd_bwd():
      opt.zero_grad(set_to_none=True)
      loss = torch.mean((model(x) - y) ** 2)
      loss.backward()

    def full():
      fwd_bwd()
      opt.step()

    full()  # step 0 (refresh for GaLore)
    t_step = median_time(full, args.steps)
    fwd_bwd()
    t_opt = median_time(opt.step, args.steps)
    t_ref = None
    if "galore" in name:
      def refresh():
        for st in opt.state.values():
          if "step" in st:
            st["step"] = gap
        full()
      t_ref = median_time(refresh, max(2, args.steps // 3), warmup=0)
    nbytes = 0
    for st in opt.state.values():
      for k, v in st.items():
        if torch.is_tensor(v) and k != "step":
          nbytes += v.numel() * v.element_size()
        if k == "projector" and v.ortho_matrix is not None:
          nbytes += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    amort = (t_ref + (gap - 1) * t_step) / gap if t_ref else t_step
    rows.append(dict(name=name, bytes=nbytes, ratio=None, step=t_step, opt=t_opt, refresh=t_ref,
                     amortized=amort))
  if rows:
    for r in rows:
      r["ratio"] = r["bytes"] / rows[0]["bytes"]
      _print_row(r)
  return rows


def offload_figures(args) -> None:
  import jax
  import jax.numpy as jnp
  import optax

  from lowrank_jax.optim import offload, offload_supported
  from lowrank_jax.optim.memory import human_bytes

  dev = jax.devices()[0]
  print(f"\noffload (optimizer state in pinned_host memory, paged per leaf); backend {dev.platform}")
  if not offload_supported():
    print("  this backend has no device memory separate from host memory: nothing to offload "
          "(the wrapper runs without transfers); run on a GPU for the figures")
    return
  d, L = args.dim, args.layers
  params = {f"l{i}": {"w": jnp.ones((d, d)) * 0.01, "b": jnp.zeros(d)} for i in range(L)}
  x = jnp.ones((args.batch, d))

  def loss_fn(p):
    h = x
    for i in range(L):
      h = jax.nn.gelu(h @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"])
    return jnp.mean(h ** 2)

  for name, tx in (("optax.adamw", optax.adamw(1e-3)),
                   ("offload(optax.adamw)", offload(optax.adamw(1e-3), enabled=True))):
    state = tx.init(params)

    def step(p, s, tx=tx):
      g = jax.grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(1,)).lower(params, state).compile()
    ma = compiled.memory_analysis()
    stats0 = dev.memory_stats() or {}
    p2, s2 = compiled(params, state)
    jax.block_until_ready(s2)
    stats = dev.memory_stats() or {}
    print(f"  {name:<24} device args {human_bytes(ma.argument_size_in_bytes):>12}  "
          f"host args {human_bytes(ma.host_argument_size_in_bytes):>12}  "
          f"device temp {human_bytes(ma.temp_size_in_bytes):>12}  "
          f"peak in use {human_bytes(stats.get('peak_bytes_in_use', 0)):>12}")
    del p2, s2, state, stats0


def minilm_memory() -> None:
  """Memory reports (eval_shape, nothing allocated) of MiniLM-L6 training setups."""
  import jax

  import lowrank_jax as lj
  from lowrank_jax.models import bert
  from lowrank_jax.optim import make_optimizer, memory_report

  config, theta0 = bert.load_minilm()
  layers = r"encoder/.*kernel"
  setups = {
    "full FT, AdamW": (lj.full(None), {"kind": "adamw", "lr": 1e-4, "weight_decay": 0.01}),
    "full FT, GaLore r96 (d/4)": (lj.full(None), {"kind": "galore_adamw", "lr": 1e-4, "rank": 96,
                                                  "where": layers, "weight_decay": 0.01}),
    "full FT, GaLore r96 + 8-bit": (lj.full(None), {"kind": "galore_adamw", "lr": 1e-4, "rank": 96,
                                                    "where": layers, "moments": "8bit"}),
    "LoRA r8 q,v, AdamW": (lj.lora(r"(query|value)/kernel", rank=8, alpha=16),
                           {"kind": "adamw", "lr": 2e-3}),
    "LoRA r8 q,v, AdamW 8-bit": (lj.lora(r"(query|value)/kernel", rank=8, alpha=16),
                                 {"kind": "adamw_8bit", "lr": 2e-3, "min_8bit_size": 1024}),
  }
  print("\nMiniLM-L6 memory (jax.eval_shape; frozen = theta0 minus what full FT trains)")
  print(f"{'setup':<32}{'frozen':>14}{'trainable':>14}{'grads':>14}{'opt state':>14}")
  for name, (reparam, spec) in setups.items():
    phi = jax.eval_shape(lambda t: reparam.init(jax.random.PRNGKey(0), t), theta0)
    tx = make_optimizer(spec)
    state = jax.eval_shape(tx.init, phi)
    rep = memory_report(None if name.startswith("full") else theta0, phi, state)
    print(f"{name:<32}" + "".join(f"{rep.total(c):>14,}" for c in ("frozen", "trainable", "grads"))
          + f"{rep.total('opt_state'):>14,}")


def orthonormalize_figures(args) -> None:
  """GaLore's projector refresh orthonormalizes a tall ``[dim, rank + 8]`` panel: our
  Gram-eigh (CholeskyQR2-style, :func:`lowrank_jax.optim.galore._orthonormalize`) against
  ``jnp.linalg.qr``, interleaved; both jitted, the same panel."""
  import jax
  import jax.numpy as jnp
  from bench import interleaved_medians
  from lowrank_jax.optim import galore as galore_lib
  a = jax.random.normal(jax.random.key(0), (args.dim, args.rank + 8), jnp.float32)
  ours = jax.jit(galore_lib._orthonormalize)
  qr = jax.jit(lambda x: jnp.linalg.qr(x)[0])
  q1, q2 = ours(a), qr(a)
  # the same subspace: the projectors agree (columns differ by signs/rotation only)
  gap = float(jnp.max(jnp.abs(q1 @ q1.T - q2 @ q2.T)))
  r = interleaved_medians({"gram-eigh": lambda: jax.block_until_ready(ours(a)),
                           "qr": lambda: jax.block_until_ready(qr(a))}, args.steps)
  print(f"\northonormalize [{args.dim}, {args.rank + 8}] on {jax.devices()[0].platform}: "
        f"gram-eigh {r['gram-eigh'][1]*1e3:.2f} ms, jnp.linalg.qr {r['qr'][1]*1e3:.2f} ms "
        f"(qr / ours {r['qr'][1] / r['gram-eigh'][1]:.1f}x); max |P_ours - P_qr| {gap:.1e}")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 8)))
  ap.add_argument("--dim", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--rank", type=int, default=128)
  ap.add_argument("--gap", type=int, default=200)
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--no-offload", action="store_true")
  ap.add_argument("--minilm", action="store_true", help="only the MiniLM memory reports")
  ap.add_argument("--orthonormalize", action="store_true",
                  help="only the projector orthonormalization: ours vs jnp.linalg.qr")
  args = ap.parse_args()
  import jax
  if args.minilm:
    minilm_memory()
    return
  if args.orthonormalize:
    orthonormalize_figures(args)
    return
  print(f"GaLore bench: {args.layers} x Linear({args.dim},{args.dim})+GELU, batch {args.batch}, "
        f"rank {args.rank}, gap {args.gap}, scale 0.25; backend {jax.devices()[0].platform}, "
        f"median of {args.steps} steps", flush=True)
  rows = jax_figures(args)
  if not args.no_torch:
    rows += torch_figures(args)
  print("\n" + HEADER)
  for r in rows:
    print(_fmt_row(r))
  print("(torch rows: ratio to torch AdamW; state bytes exclude torch's step counters)")
  if not args.no_offload:
    offload_figures(args)


if __name__ == "__main__":
  main()
