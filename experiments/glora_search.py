"""GLoRA's layer-wise configuration search on the docstring task (MiniLM-L6).

Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning",
arXiv 2306.07967, section 3: train a *supernet* in which every adapted layer holds the
full support tensors and each step samples a random per-layer configuration (weight
sharing); then run an evolutionary search whose fitness is the validation accuracy of
the supernet under a candidate configuration (no retraining); finally retrain the best
configuration as a fixed GLoRA from scratch and report its test accuracy, beside a
random legal configuration retrained the same way.

    python -m experiments.glora_search --out outputs/glora_search [--epochs 3] \
        [--population 12 --select 4 --mutation 6 --crossover 6 --search-epochs 4]

Writes ``glora_search.json``, ``glora_search.md`` and ``glora_search.png`` (best
validation accuracy per search epoch) atomically.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from experiments.docstrings import _atomic_write, evaluate_split, load_problem, model_fns, run_one

WHERE = "(query|value)/kernel"
BASE_CFG = {"epochs": 3, "batch_size": 32, "max_len": 64, "pooling": "mean", "dropout": 0.1,
            "seed": 0, "optimizer": {"kind": "adamw", "lr": 2e-3, "weight_decay": 0.01}}


def sample_choices(key, n_layers: int):
  """``[n_layers, 5]`` int32 choice indices, uniform over :data:`glora.CHOICES`."""
  import jax
  import jax.numpy as jnp
  from lowrank_jax.methods.glora import CHOICES, TENSORS
  sizes = jnp.asarray([len(CHOICES[t]) for t in TENSORS])
  return jax.random.randint(key, (n_layers, len(TENSORS)), 0, sizes).astype(jnp.int32)


def as_indices(cand) -> np.ndarray:
  """A candidate (tuple of :class:`LayerConfig` of names) as ``[n_layers, 5]`` indices."""
  from lowrank_jax.methods.glora import CHOICES, TENSORS
  return np.asarray([[CHOICES[t].index(v) for t, v in zip(TENSORS, c)] for c in cand], np.int32)


def supernet(paths: list[str], rank: int, choices=None):
  """GLoRA supernet on ``paths``; ``choices`` (``[L, 5]`` ints, possibly traced) picks
  each layer's configuration (default: peft's)."""
  import lowrank_jax as lj
  from lowrank_jax.methods.glora import LayerConfig
  if choices is None:
    config = LayerConfig()
  else:
    config = {p: LayerConfig(*(choices[i, j] for j in range(5))) for i, p in enumerate(paths)}
  return lj.chain(lj.glora(WHERE, rank, config=config, supernet=True), lj.full(r"^head/"))


def run(a) -> dict:
  import jax
  import optax
  from tqdm import tqdm

  import lowrank_jax as lj
  from lowrank_jax import train
  from lowrank_jax.methods.glora import glora_layers, glora_param_count, glora_search
  from experiments import recipes

  cfg = dict(BASE_CFG, epochs=a.epochs, seed=a.seed, name="glora_supernet")
  if a.max_per_class:
    cfg["data"] = {"max_per_class": a.max_per_class}
  task, config, theta0, (k_method, k_train) = load_problem(cfg)
  splits, bs = task.splits, cfg["batch_size"]
  layers = glora_layers(theta0, WHERE)
  paths = [p for p, _, _ in layers]
  dims = [(di, do) for _, di, do in layers]
  limit = a.param_limit or len(layers) * a.lora_rank * (dims[0][0] + dims[0][1])
  loss_fn, logits_fn = model_fns(cfg, config)

  # 1. supernet training, a random configuration per step (traced: one compile)
  steps_per_epoch = len(splits["train"]["labels"]) // bs
  total = a.epochs * steps_per_epoch
  _, phi = lj.initialize(supernet(paths, a.rank), k_method, theta0)
  opt = recipes.build_optimizer(cfg["optimizer"], total)
  opt_state = opt.init(phi)

  @jax.jit
  def step(phi, opt_state, batch, key):
    k_cfg, k_drop = jax.random.split(key)
    reparam = supernet(paths, a.rank, sample_choices(k_cfg, len(paths)))
    (loss, _), g = jax.value_and_grad(lambda p: loss_fn(reparam.apply(theta0, p), batch, k_drop),
                                      has_aux=True)(phi)
    upd, opt_state = opt.update(g, opt_state, phi)
    return optax.apply_updates(phi, upd), opt_state, loss

  rng = np.random.default_rng(a.seed)
  t0 = time.perf_counter()
  for epoch in range(a.epochs):
    losses = []
    for i, b in enumerate(tqdm(train.batches(splits["train"], bs, rng=rng), total=steps_per_epoch,
                               desc=f"supernet epoch {epoch + 1}/{a.epochs}", disable=a.quiet,
                               file=sys.stderr, mininterval=2.0)):
      phi, opt_state, loss = step(phi, opt_state, b, jax.random.fold_in(k_train, epoch * steps_per_epoch + i))
      losses.append(float(loss))
    print(f"[supernet] epoch {epoch + 1}: train loss {np.mean(losses):.4f}", flush=True)
  supernet_time = time.perf_counter() - t0

  # 2. evolutionary search; fitness = validation accuracy under the candidate (weight sharing)
  @jax.jit
  def logits_under(choices, batch):
    return logits_fn(supernet(paths, a.rank, choices).apply(theta0, phi), batch)

  def accuracy(cand, split):
    idx = as_indices(cand)
    return evaluate_split(lambda b: logits_under(idx, b), splits[split], bs)[0]

  t0 = time.perf_counter()
  res = glora_search(jax.random.key(a.seed), dims, lambda c: accuracy(c, "validation"), rank=a.rank,
                     population=a.population, select=a.select, mutation=a.mutation,
                     crossover=a.crossover, epochs=a.search_epochs, param_limit=limit)
  search_time = time.perf_counter() - t0
  print(f"[search] {res.evaluated} candidates, best validation accuracy {res.best_fitness:.4f}",
        flush=True)

  # 3. retrain the best (and a random legal) configuration as a fixed GLoRA from scratch
  def count(cand):
    return sum(glora_param_count(c, di, do, a.rank) for c, (di, do) in zip(cand, dims))

  def retrain(cand, name):
    spec = {"kind": "glora", "where": WHERE, "rank": a.rank,
            "config": {p: list(c) for p, c in zip(paths, cand)}}
    return run_one(dict(cfg, name=name, method=spec), pathlib.Path(a.out), quiet=a.quiet)

  rows = {"best": res.best}
  if a.random_baseline:
    cand_rng = np.random.default_rng(a.seed + 1)
    from lowrank_jax.methods.glora import random_config
    while True:
      cand = tuple(random_config(cand_rng) for _ in dims)
      if count(cand) <= limit:
        break
    rows["random"] = cand
  out = {"settings": vars(a), "param_limit": limit, "layers": paths,
         "supernet_train_s": supernet_time, "search_s": search_time, "evaluated": res.evaluated,
         "history": res.history, "configs": {}}
  for label, cand in rows.items():
    r = retrain(cand, f"glora_search_{label}")
    out["configs"][label] = {
        "layers": {p: dict(zip("ABCDE", c)) for p, c in zip(paths, cand)},
        "adapter_params": count(cand), "supernet_val_accuracy": accuracy(cand, "validation"),
        "supernet_test_accuracy": accuracy(cand, "test"),
        "retrained_test_accuracy": r["test_accuracy"], "trainable_params": r["trainable_params"]}
  return out


def write(out: dict, folder: pathlib.Path) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  _atomic_write(folder / "glora_search.json", json.dumps(out, indent=1, default=str))
  lines = [f"GLoRA search: {out['evaluated']} candidates, parameter limit {out['param_limit']:,}, "
           f"supernet {out['supernet_train_s']:.0f} s, search {out['search_s']:.0f} s", "",
           "| configuration | adapter params | supernet val acc. | supernet test acc. | retrained test acc. |",
           "|---|---:|---:|---:|---:|"]
  for label, c in out["configs"].items():
    lines.append(f"| {label} | {c['adapter_params']:,} | {c['supernet_val_accuracy']:.4f} | "
                 f"{c['supernet_test_accuracy']:.4f} | {c['retrained_test_accuracy']:.4f} |")
  _atomic_write(folder / "glora_search.md", "\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(range(1, len(out["history"]) + 1), [100 * h for h in out["history"]], marker="o")
  ax.set_xlabel("search epoch")
  ax.set_ylabel("best validation accuracy (%)")
  ax.set_title("GLoRA evolutionary search (MiniLM, docstrings)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  tmp = folder / ".glora_search.tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  tmp.replace(folder / "glora_search.png")
  print("\n".join(lines))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="outputs/glora_search")
  p.add_argument("--epochs", type=int, default=3, help="supernet and retraining epochs")
  p.add_argument("--rank", type=int, default=4, help="rank of the low-rank support tensors")
  p.add_argument("--lora-rank", type=int, default=8,
                 help="parameter limit = LoRA of this rank on the same layers (unless --param-limit)")
  p.add_argument("--param-limit", type=int, default=None)
  p.add_argument("--population", type=int, default=12)
  p.add_argument("--select", type=int, default=4)
  p.add_argument("--mutation", type=int, default=6)
  p.add_argument("--crossover", type=int, default=6)
  p.add_argument("--search-epochs", type=int, default=4)
  p.add_argument("--no-random-baseline", dest="random_baseline", action="store_false")
  p.add_argument("--max-per-class", type=int, default=None, help="cap examples per class (quick runs)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true")
  a = p.parse_args(argv)
  write(run(a), pathlib.Path(a.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
