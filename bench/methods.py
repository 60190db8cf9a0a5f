"""MiniLM training step of every PEFT method in the library, side by side with LoRA.

    python -m bench.methods [--methods lora,dora,...] [--steps 5] [--dropout 0.0] [--rss]

Setup as bench/lora_step.py (bench/README.md): all-MiniLM-L6-v2, batch 32,
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
materialises them every step; QLoRA stores the encoder kernels as NF4 + double quantization;
LoftQ (NF4), QA-LoRA and L4Q (int4, groups of 32 input rows) rewrite the q,v kernels at
initialisation (``lj.initialize``). Rows are named as the registry names the methods
(``lowrank_jax.methods.registry``), plus the variants of :data:`VARIANTS`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

from bench import first_and_median
from lowrank_jax.methods import registry

B, T, N_CLASSES = 32, 64, 3
QV = r"(query|value)/kernel"
FF = r"layer_\d+/output/kernel$"
ENCODER_KERNELS = r"^bert/encoder/.*/kernel$"
HEAD = r"^head/"


class Row(NamedTuple):
  """One benchmarked configuration."""
  label: str
  method: Optional[str]                    # registry name; None: the frozen forward
  params: Mapping[str, Any] = {}           # the method's parameters (checked by the registry)
  quant: Optional[Mapping[str, Any]] = None  # lj.quantize keywords applied to the base first


# The bench setting of every registered method, under its registry name (tests/test_bench.py
# checks that none is missing and that each parses). Intrinsic SAID's d and where come from
# --said-d and --said-where.
SETTINGS: dict[str, Row] = {
    "lora": Row("LoRA r8 q,v", "lora", {"where": QV, "rank": 8, "alpha": 16}),
    "dora": Row("DoRA r8 q,v", "dora", {"where": QV, "rank": 8, "alpha": 16}),
    "lokr": Row("LoKr r8 q,v", "lokr", {"where": QV, "rank": 8, "alpha": 16}),
    "loha": Row("LoHa r8 q,v", "loha", {"where": QV, "rank": 8, "alpha": 16}),
    "glora": Row("GLoRA r8 q,v", "glora", {"where": QV, "rank": 8}),
    "adalora": Row("AdaLoRA r12 q,v", "adalora", {"where": QV, "init_r": 12, "alpha": 8.0}),
    "vera": Row("VeRA r256 q,v", "vera", {"where": QV, "rank": 256}),
    # peft's BERT defaults: key, value, output.dense; feed-forward (input scaling): output.dense
    "ia3": Row("IA3 k,v,ffn-out", "ia3", {"where": rf"(attention/(key|value)/kernel$|{FF})",
                                          "feedforward": FF}),
    "intrinsic_said": Row("Intrinsic SAID", "intrinsic_said", {"d": 1000, "where": r"^bert/encoder/"}),
    "bottleneck_adapters": Row("Adapters Houlsby m=24", "bottleneck_adapters",
                               {"placement": "houlsby", "reduction_factor": 16}),
    "prefix_tuning": Row("Prefix tuning P=10", "prefix_tuning", {"num_prefix": 10}),
    "full": Row("full fine-tune", "full", {"where": None}),
    "loftq": Row("LoftQ NF4 r8 q,v", "loftq", {"where": QV, "rank": 8, "alpha": 16}),
    "qalora": Row("QA-LoRA int4 g32 r8 q,v", "qalora",
                  {"where": QV, "rank": 8, "alpha": 16, "group_size": 32}),
    "l4q": Row("L4Q int4 g32 r8 q,v", "l4q", {"where": QV, "rank": 8, "alpha": 16, "group_size": 32}),
    # MiniLM has no expert stacks: on its 2-d kernels batched LoRA is LoRA (the wrapper's cost)
    "batched_lora": Row("batched LoRA r8 q,v", "batched_lora", {"where": QV, "rank": 8, "alpha": 16}),
}

# Further rows: other settings of a registered method, and the frozen forward.
VARIANTS: dict[str, Row] = {
    "adapters_pfeiffer": Row("Adapters Pfeiffer m=24", "bottleneck_adapters",
                             {"placement": "pfeiffer", "reduction_factor": 16}),
    "prefix_mlp": Row("Prefix tuning P=10, MLP 512", "prefix_tuning", {"num_prefix": 10, "reparam_mlp": 512}),
    "qlora": Row("QLoRA NF4+DQ, r8 q,v", "lora", {"where": QV, "rank": 8, "alpha": 16},
                 quant={"where": ENCODER_KERNELS, "codec": "nf4"}),
    "frozen": Row("frozen forward", None),
}

ROWS: dict[str, Row] = {**{n: SETTINGS[n] for n in registry.METHODS if n in SETTINGS}, **VARIANTS}
DEFAULT = ",".join(ROWS)


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
    row = ROWS[name]
    label = row.label
    theta0 = base if row.quant is None else lj.quantize(base, **row.quant)
    if row.method is None:  # frozen forward
      fwd = jax.jit(lambda t, b: bert.classifier_logits(
          t["head"], bert.bert_forward(t["bert"], config, b["input_ids"], b["attention_mask"])))
      first, step_t = first_and_median(lambda: jax.block_until_ready(fwd(theta0, batch)), a.steps)
      _, frozen_b = _memory(theta0, None, None)
      out[name] = {"label": label, "params": 0, "step": step_t, "first": first,
                   "phi_opt_bytes": 0, "frozen_bytes": frozen_b}
      print(f"  {name}: {out[name]['step']:.3f} s", flush=True)
      continue
    kw = dict(row.params)
    if row.method == "intrinsic_said":
      kw.update(d=a.said_d, where=a.said_where)
    method_ = registry.build(row.method, **kw)
    reparam = method_ if row.method == "full" else lj.chain(method_, lj.full(HEAD))
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
    return {name: {"label": ROWS[name].label, "skipped": f"subprocess failed: {proc.stderr[-300:]}"}}
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
  unknown = [n for n in names if n not in ROWS]
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
