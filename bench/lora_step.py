"""MiniLM training-step benchmark: our full fine-tune, LoRA (materialised and lazy),
frozen forward, and (if torch + peft are installed) peft's LoRA on the same model,
batch and thread count, side by side in one run.

    python -m bench.lora_step [--dropout 0.1] [--steps 8] [--no-torch]

Setup as the reference measurements in bench/README.md: all-MiniLM-L6-v2, batch 32, sequence 64,
random ids over the vocabulary, no padding, 3-class head on [CLS], AdamW (lr 1e-4,
weight decay 0.01, eps 1e-8: torch's defaults), LoRA r=8 alpha=16 on query+value; ``--dropout``
is the model's hidden and attention dropout and LoRA's adapter-input dropout, on both sides.
Two more rows, reported beside (not instead of) the like-for-like one: the same LoRA step
with ``bert_forward(last_layer_positions=(0,))`` (the last layer computes only the [CLS] row
the head reads: same logits and gradients; peft's model computes all 64), and with
``lj.lora(..., matmul="merged")`` (forward and input gradient through ``W0 + s A B``,
factored A/B gradients).
Each figure is the median of ``--steps`` timed rounds after 2 warm-up steps; a round calls
every variant (ours and torch's) once in turn, so a slow spell of a shared machine falls on
all of them alike.

The last lines give the step's matmul floor in the same run (``bench.gemm_floor``: every
GEMM of the LoRA step timed alone, summed), for XLA and torch, beside the step's total
FLOPs from XLA's cost analysis: no schedule of the step can beat its floor on the same
backend, so it says which step-time ratios are reachable at all on the machine.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import numpy as np

from bench import gemm_floor, interleaved_medians

B, T, N_CLASSES = 32, 64, 3
CLS_ONLY = "LoRA r8 q,v (lazy, last layer at [CLS] only)"
MERGED = 'LoRA r8 q,v (lazy, matmul="merged")'




def jax_runners(ids: np.ndarray, labels: np.ndarray, dropout: float) -> tuple[dict, Callable[[], float]]:
  """``({name: (one blocking step, trainable params)}, flops)``; ``flops()`` is the XLA
  cost-analysis FLOP count of the lazy LoRA step."""
  import jax
  import jax.numpy as jnp
  import optax

  import lowrank_jax as lj
  from lowrank_jax import train
  from lowrank_jax.models import bert

  config, params = bert.load_minilm()
  theta0 = {"bert": params, "head": bert.init_classifier(jax.random.key(0), config.hidden_size, N_CLASSES)}
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids)),
           "labels": jnp.asarray(labels)}

  def make_loss(positions=None):
    def loss_fn(theta, b, rng):
      h = bert.bert_forward(theta["bert"], config, b["input_ids"], b["attention_mask"],
                            deterministic=rng is None or dropout == 0.0, rng=rng,
                            last_layer_positions=positions)
      return train.softmax_cross_entropy(bert.classifier_logits(theta["head"], h), b["labels"])
    return loss_fn

  opt = optax.adamw(1e-4, eps=1e-8, weight_decay=0.01)
  out = {}
  # LoRA dropout on the adapter input as peft's lora_dropout (same rate as the model's).
  lora = lj.lora(r"(query|value)/kernel", rank=8, alpha=16, dropout=dropout)
  variants = {
    "full fine-tune": lj.full(None),
    "LoRA r8 q,v (materialised)": None,
    "LoRA r8 q,v (lazy, ours)": lj.chain(lora, lj.full(r"^head/")),
    MERGED: lj.chain(lj.lora(r"(query|value)/kernel", rank=8, alpha=16, dropout=dropout,
                             matmul="merged"),
                     lj.full(r"^head/")),
  }
  materialised = lj.chain(lora, lj.full(r"^head/"))
  variants["LoRA r8 q,v (materialised)"] = lj.Reparam(
      init=materialised.init,
      apply=lambda t, p, rng=None: lj.materialize(materialised.apply(t, p, rng=rng)),
      init_with_base=materialised.init_with_base, unmerge=materialised.unmerge)
  # The head reads [CLS] only, so the last layer may compute that row alone (exact).
  variants[CLS_ONLY] = variants["LoRA r8 q,v (lazy, ours)"]
  for name, reparam in variants.items():
    phi = reparam.init(jax.random.key(1), theta0)
    state = opt.init(phi)
    step = train.make_train_step(reparam, opt, make_loss((0,) if name == CLS_ONLY else None))
    key = jax.random.key(2)
    holder = [phi, state]
    out[name] = (_jax_step(step, holder, theta0, batch, key), lj.count_params(phi))
    if name == "LoRA r8 q,v (lazy, ours)":
      lazy_step = (step, holder, key)

  fwd = jax.jit(lambda t, b: bert.classifier_logits(t["head"], bert.bert_forward(
      t["bert"], config, b["input_ids"], b["attention_mask"])))
  out["frozen forward"] = (lambda: jax.block_until_ready(fwd(theta0, batch)), 0)

  def flops():  # called after the timing, so the first call above includes compilation
    step, holder, key = lazy_step
    cost = step.lower(holder[0], holder[1], theta0, batch, key).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])
  return out, flops


def _jax_step(step, holder, theta0, batch, key):
  import jax

  def run():
    p, s, m = step(holder[0], holder[1], theta0, batch, key)
    jax.block_until_ready(m)
    holder[0], holder[1] = p, s
  return run


def torch_runners(ids: np.ndarray, labels: np.ndarray, dropout: float, threads: int) -> dict:
  """``{name: (one step, trainable params)}`` for torch full fine-tuning, peft LoRA and the
  eval-mode forward."""
  import torch
  import peft
  import transformers
  from lowrank_jax.models import bert as jbert

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  path = jbert.minilm_path()
  out = {}

  class Classifier(torch.nn.Module):
    def __init__(self):
      super().__init__()
      cfg = transformers.BertConfig.from_pretrained(path)
      cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
      self.bert = transformers.BertModel.from_pretrained(path, config=cfg, add_pooling_layer=False)
      self.head = torch.nn.Linear(cfg.hidden_size, N_CLASSES)

    def forward(self, ids):
      return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])

  x = torch.tensor(ids)
  y = torch.tensor(labels, dtype=torch.long)
  for name in ("torch full fine-tune", "peft LoRA r8 q,v"):
    model = Classifier()
    if name.startswith("peft"):
      model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                         target_modules=["query", "value"],
                                                         modules_to_save=["head"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    out[name] = (_torch_step(model, opt, x, y), sum(p.numel() for p in params))
  model = Classifier().eval()

  def forward():
    with torch.no_grad():
      model(x)

  out["torch frozen forward"] = (forward, 0)
  return out


def _torch_step(model, opt, x, y):
  import torch

  def run():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
  return run


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dropout", type=float, default=float(os.environ.get("DROPOUT", 0.1)))
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--no-torch", action="store_true")
  a = p.parse_args(argv)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 30522, (B, T)).astype(np.int32)
  labels = rng.integers(0, N_CLASSES, (B,)).astype(np.int32)
  runners, step_flops = jax_runners(ids, labels, a.dropout)
  gemm_gflop = gemm_floor.total_flops() / 1e9
  ref_names = []
  if not a.no_torch:
    try:
      ref_runners = torch_runners(ids.astype(np.int64), labels, a.dropout, a.threads)
      runners.update(ref_runners)
      ref_names = list(ref_runners)
    except ImportError as e:
      print(f"(torch/peft not installed: {e}; reference columns skipped)")
  timed = interleaved_medians({name: run for name, (run, _) in runners.items()}, a.steps)
  table = {name: (timed[name][1], n, timed[name][0]) for name, (_, n) in runners.items()}
  rows = {k: v for k, v in table.items() if k not in ref_names}
  flops = step_flops()
  floors = {lib: gemm_floor.floor(t) for lib, t in
            gemm_floor.gemm_times(a.steps, a.threads, with_torch=bool(ref_names)).items()}
  ref = {k: table[k] for k in ref_names}
  print(f"\nMiniLM-L6 step, B={B} T={T}, dropout {a.dropout}, median of {a.steps} rounds after 2 warm-up "
        f"(every variant once per round, interleaved), {a.threads} threads, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
  print("| variant | trainable params | step (s) | first call incl. compile (s) |")
  print("|---|---:|---:|---:|")
  for name, (t, n, first) in {**rows, **ref}.items():
    print(f"| {name} | {n:,} | {t:.3f} | {first:.2f} |")
  lazy_t = rows["LoRA r8 q,v (lazy, ours)"][0]
  print(f"\nours LoRA / ours full: {lazy_t / rows['full fine-tune'][0]:.2f} (goal <= 0.70)")
  print(f"ours LoRA lazy / materialised: {lazy_t / rows['LoRA r8 q,v (materialised)'][0]:.2f}")
  if ref:
    print(f"ours LoRA / peft LoRA: {lazy_t / ref['peft LoRA r8 q,v'][0]:.2f} (goal <= 0.80)")
    print(f"ours LoRA matmul=merged / peft LoRA: {rows[MERGED][0] / ref['peft LoRA r8 q,v'][0]:.2f}")
    print(f"ours LoRA materialised / peft LoRA: "
          f"{rows['LoRA r8 q,v (materialised)'][0] / ref['peft LoRA r8 q,v'][0]:.2f}")
    print(f"ours LoRA, last layer at [CLS] only / peft LoRA: "
          f"{rows[CLS_ONLY][0] / ref['peft LoRA r8 q,v'][0]:.2f} (same logits and gradients, fewer FLOPs)")
    print(f"ours full / torch full: {rows['full fine-tune'][0] / ref['torch full fine-tune'][0]:.2f}")
    print(f"ours forward / torch forward: {rows['frozen forward'][0] / ref['torch frozen forward'][0]:.2f}")
  print(f"\nour LoRA step: {flops / 1e9:.1f} GFLOP (XLA cost analysis), {gemm_gflop:.1f} GFLOP of them in "
        f"GEMMs; matmul floor (bench.gemm_floor, each GEMM alone, summed): "
        + ", ".join(f"{lib} {t:.3f} s ({gemm_gflop / t:.0f} GFLOP/s)" for lib, t in floors.items()))
  if ref:
    target = 0.8 * ref["peft LoRA r8 q,v"][0]
    print(f"0.8 x peft LoRA = {target:.3f} s = {target / floors['XLA']:.2f} x our matmul floor on XLA")


if __name__ == "__main__":
  main()
