"""MiniLM training step of every PEFT method in the library, side by side with LoRA.

    python -m bench.methods [--methods lora,dora,...] [--steps 5] [--dropout 0.0] [--rss]

Setup as bench/lora_step.py (shared/notes/anchor_figures.md): all-MiniLM-L6-v2, batch 32,
sequence 64, random ids, no padding, 3-class head on [CLS] (always trained in full), AdamW
(lr 1e-4, weight decay 0.01, eps 1e-8), jitted step from ``lowrank_jax.train.make_train_step``
with buffer donation, dropout off unless ``--dropout``. Each step figure is the median of
``--steps`` timed steps after 2 warm-up steps; the first call (with compilation) is shown too.

Memory: ``phi + opt`` is the bytes of the trainable parameters and the optimizer state
(:func:`lowrank_jax.optim.memory.memory_report`), ``frozen`` the bytes of the frozen base
(smaller for QLoRA's NF4 codes). ``--rss`` runs every method in its own subprocess and adds
the peak resident set size of that process (model load, compilation and step included).

Method notes: adapters and prefix tuning are read by the model from the parameter tree
(``layer_i/*_adapter`` subtrees, ``bert/prefix``); AdaLoRA's step is the adapter's
forward/backward/update only (no orthogonal regulariser, no rank allocator); Intrinsic SAID
moves the encoder weights (``--said-where``) through one ``d``-dim vector (``--said-d``) and
materialises them every step; QLoRA stores the encoder kernels as NF4 + double quantization.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from typing import Callable

import numpy as np

from bench import first_and_median

B, T, N_CLASSES = 32, 64, 3
QV = r"(query|value)/kernel"

# name -> (label, builder(theta0, args) -> (theta0', reparam or None)); None = frozen forward.
METHODS: dict[str, tuple[str, Callable]] = {}


def method(name: str, label: str):
  def deco(fn):
    METHODS[name] = (label, fn)
    return fn
  return deco


@method("lora", "LoRA r8 q,v")
def _lora(theta0, a):
  import lowrank_jax as lj
  return theta0, lj.lora(QV, rank=8, alpha=16)


@method("dora", "DoRA r8 q,v")
def _dora(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.dora").dora(QV, rank=8, alpha=16)


@method("lokr", "LoKr r8 q,v")
def _lokr(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.lokr").lokr(QV, rank=8, alpha=16)


@method("loha", "LoHa r8 q,v")
def _loha(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.loha").loha(QV, rank=8, alpha=16)


@method("vera", "VeRA r256 q,v")
def _vera(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.vera").vera(QV, rank=256)


@method("ia3", "IA3 k,v,ffn-out")
def _ia3(theta0, a):
  # peft's BERT defaults: key, value, output.dense; feed-forward (input scaling): output.dense.
  ff = r"layer_\d+/output/kernel$"
  return theta0, importlib.import_module("lowrank_jax.methods.ia3").ia3(rf"(attention/(key|value)/kernel$|{ff})",
                                                          feedforward=ff)


@method("glora", "GLoRA r8 q,v")
def _glora(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.glora").glora(QV, rank=8)


@method("adalora", "AdaLoRA r12 q,v")
def _adalora(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.adalora").adalora(QV, init_r=12, alpha=8.0)


@method("said", "Intrinsic SAID")
def _said(theta0, a):
  fn = importlib.import_module("lowrank_jax.methods.said").intrinsic_said
  return theta0, fn(a.said_d, where=a.said_where)


@method("adapters", "Adapters Houlsby m=24")
def _adapters(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.adapters").bottleneck_adapters("houlsby", reduction_factor=16)


@method("adapters_pfeiffer", "Adapters Pfeiffer m=24")
def _pfeiffer(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.adapters").bottleneck_adapters("pfeiffer", reduction_factor=16)


@method("prefix", "Prefix tuning P=10")
def _prefix(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.prefix").prefix_reparam(10)


@method("prefix_mlp", "Prefix tuning P=10, MLP 512")
def _prefix_mlp(theta0, a):
  return theta0, importlib.import_module("lowrank_jax.methods.prefix").prefix_reparam(10, reparam_mlp=512)


@method("qlora", "QLoRA NF4+DQ, r8 q,v")
def _qlora(theta0, a):
  import lowrank_jax as lj
  quantize = importlib.import_module("lowrank_jax.quant.qlora").quantize
  return quantize(theta0, r"^bert/encoder/.*/kernel$", codec="nf4"), lj.lora(QV, rank=8, alpha=16)


@method("full", "full fine-tune")
def _full(theta0, a):
  import lowrank_jax as lj
  return theta0, lj.full(None)


@method("frozen", "frozen forward")
def _frozen(theta0, a):
  return theta0, None


DEFAULT = ",".join(METHODS)


def _memory(theta0, phi, opt_state) -> tuple[int, int]:
  """(bytes of phi + optimizer state, bytes of the frozen base)."""
  from lowrank_jax.optim.memory import memory_report
  rep = memory_report(frozen=theta0, trainable=phi, opt_state=opt_state)
  return rep.total("trainable") + rep.total("opt_state"), rep.total("frozen")


def run_methods(names: list[str], a) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import lowrank_jax as lj
  from lowrank_jax import train
  from lowrank_jax.models import bert

  config, params = bert.load_minilm()
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, config.vocab_size, (B, T)).astype(np.int32))
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
           "labels": jnp.asarray(rng.integers(0, N_CLASSES, (B,)).astype(np.int32))}
  base = {"bert": params, "head": bert.init_classifier(jax.random.key(0), config.hidden_size, N_CLASSES)}
  deterministic = a.dropout == 0.0
  if not deterministic:
    import dataclasses
    config = dataclasses.replace(config, hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout)

  def loss_fn(theta, b, rng):
    # prefix tuning puts its prefix in theta["bert"]["prefix"]; bert_forward reads it there
    h = bert.bert_forward(theta["bert"], config, b["input_ids"], b["attention_mask"],
                          deterministic=rng is None, rng=rng)
    return train.softmax_cross_entropy(bert.classifier_logits(theta["head"], h), b["labels"])

  opt = optax.adamw(1e-4, eps=1e-8, weight_decay=0.01)
  out = {}
  for name in names:
    label, build = METHODS[name]
    theta0, method_ = build(base, a)
    if method_ is None:  # frozen forward
      fwd = jax.jit(lambda t, b: bert.classifier_logits(
          t["head"], bert.bert_forward(t["bert"], config, b["input_ids"], b["attention_mask"])))
      first, step_t = first_and_median(lambda: jax.block_until_ready(fwd(theta0, batch)), a.steps)
      _, frozen_b = _memory(theta0, None, None)
      out[name] = {"label": label, "params": 0, "step": step_t, "first": first,
                   "phi_opt_bytes": 0, "frozen_bytes": frozen_b}
      print(f"  {name}: {out[name]['step']:.3f} s", flush=True)
      continue
    reparam = method_ if name == "full" else lj.chain(method_, lj.full(r"^head/"))
    theta0, phi = lj.initialize(reparam, jax.random.key(1), theta0)
    state = opt.init(phi)
    n_params = lj.count_params(phi)
    phi_opt, frozen_b = _memory(theta0, phi, state)
    step = train.make_train_step(reparam, opt, loss_fn)
    key = None if deterministic else jax.random.key(2)
    holder = [phi, state, None]

    def run():
      holder[0], holder[1], holder[2] = step(holder[0], holder[1], theta0, batch, key)
      jax.block_until_ready(holder[2])

    first, step_t = first_and_median(run, a.steps)
    m = holder[2]
    out[name] = {"label": label, "params": n_params, "step": step_t, "first": first,
                 "phi_opt_bytes": phi_opt, "frozen_bytes": frozen_b,
                 "loss": float(m["loss"])}
    print(f"  {name}: {out[name]['step']:.3f} s (first call {first:.1f} s)", flush=True)
    del phi, state
    holder.clear()
  return out


def _child(name: str, a) -> dict:
  """Runs one method in a fresh interpreter; adds its peak RSS."""
  cmd = [sys.executable, "-m", "bench.methods", "--methods", name, "--steps", str(a.steps),
         "--dropout", str(a.dropout), "--said-d", str(a.said_d), "--said-where", a.said_where, "--json"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {name: {"label": METHODS[name][0], "skipped": f"subprocess failed: {proc.stderr[-300:]}"}}
  return json.loads(lines[-1])


def _mib(b: int) -> str:
  return f"{b / 2**20:.2f}"


def print_table(rows: dict, a, with_rss: bool) -> None:
  import jax
  print(f"\nMiniLM-L6 train step, B={B} T={T}, dropout {a.dropout}, AdamW; median of {a.steps} steps "
        f"after 2 warm-up; {jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} cores (shared: figures are noisy)\n")
  ref = rows.get("lora", {}).get("step")
  head = "| method | trainable params | step (s) | step / LoRA | first call (s) | phi + opt (MiB) | frozen (MiB) |"
  sep = "|---|---:|---:|---:|---:|---:|---:|"
  if with_rss:
    head += " peak RSS (MiB) |"
    sep += "---:|"
  print(head)
  print(sep)
  for name, r in rows.items():
    if "skipped" in r:
      print(f"| {r['label']} | skipped: {r['skipped']} |")
      continue
    ratio = f"{r['step'] / ref:.2f}" if ref else "-"
    line = (f"| {r['label']} | {r['params']:,} | {r['step']:.3f} | {ratio} | {r['first']:.1f} | "
            f"{_mib(r['phi_opt_bytes'])} | {_mib(r['frozen_bytes'])} |")
    if with_rss:
      line += f" {_mib(r.get('peak_rss', 0))} |"
    print(line)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default=DEFAULT, help=f"comma-separated subset of: {DEFAULT}")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--said-d", type=int, default=1000, help="intrinsic dimension of SAID")
  p.add_argument("--said-where", default=r"^bert/encoder/", help="leaves SAID moves")
  p.add_argument("--rss", action="store_true", help="one subprocess per method, with its peak RSS")
  p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  names = [n.strip() for n in a.methods.split(",") if n.strip()]
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    p.error(f"unknown methods {unknown}; known: {DEFAULT}")
  if a.rss:
    rows = {}
    for n in names:
      print(f"  {n}: subprocess ...", flush=True)
      rows.update(_child(n, a))
  else:
    rows = run_methods(names, a)
  if a.json:
    from lowrank_jax.train import peak_rss_bytes
    for r in rows.values():
      r["peak_rss"] = peak_rss_bytes()
    print(json.dumps(rows))
    return
  print_table(rows, a, a.rss)


if __name__ == "__main__":
  main()
