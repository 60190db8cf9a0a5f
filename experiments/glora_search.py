"""GLoRA's layer-wise configuration search on the docstring task (MiniLM-L6).

Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning",
arXiv 2306.07967, section 3, in three stages:

1. *supernet training*: every adapted layer holds the full support tensors ``A..E``
   (``glora(..., supernet=True)``) and each step samples a uniformly random per-layer
   configuration; the choices are integer indices drawn from the step's PRNG key inside
   ``jit`` (one-hot mixtures, so one compilation), and a configuration uses the shared
   weights (``vector`` = first row of the LoRA ``d``, ``constant`` = its ``[0, 0]``);
2. *evolutionary search* (:func:`lowrank_jax.methods.glora.glora_search`): the fitness of
   a candidate (one :class:`LayerConfig` per layer) is the validation accuracy of the
   trained supernet under it (weight sharing, no retraining), among candidates whose
   support tensors have at most ``--param-limit`` parameters (default: LoRA of rank
   ``--lora-rank`` on the same layers, ``L · r · (d_in + d_out)``);
3. *retraining*: the best configuration, as a fixed GLoRA (peft's layout and init), is
   trained from scratch like any config of the main job (``experiments.docstrings.run_one``),
   beside a random legal configuration trained the same way for reference.

    python -m experiments.glora_search --out outputs/glora_search [--epochs 3] \
        [--population 12 --select 4 --mutation 6 --crossover 6 --search-epochs 4]

Writes ``glora_search.json`` (settings, search history and final top-k, configurations
per layer by name, parameter counts, accuracies, timings), ``glora_search.md`` (table)
and ``glora_search.png`` (best validation accuracy per search epoch), each atomically;
the retrained runs also leave their ``glora_search_{best,random}.json`` (``run_one``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from experiments.docstrings import (_atomic_write, evaluate_split, load_problem, model_fns, run_one,
                                   save_figure)

WHERE = "(query|value)/kernel"
# the main job's settings (configs/minilm_lora.json), 3 epochs
BASE_CFG = {"epochs": 3, "batch_size": 32, "max_len": 64, "pooling": "mean", "dropout": 0.1,
            "seed": 0, "optimizer": {"kind": "adamw", "lr": 2e-3, "weight_decay": 0.01}}


def sample_choices(key, n_layers: int):
  """``[n_layers, 5]`` int32 choice indices, uniform over :data:`glora.CHOICES` (traceable)."""
  import jax
  import jax.numpy as jnp
  from lowrank_jax.methods.glora import CHOICES, TENSORS
  sizes = jnp.asarray([len(CHOICES[t]) for t in TENSORS])
  return jax.random.randint(key, (n_layers, len(TENSORS)), 0, sizes).astype(jnp.int32)


def as_indices(cand: Sequence) -> np.ndarray:
  """A candidate (tuple of :class:`LayerConfig` of names) as ``[n_layers, 5]`` indices."""
  from lowrank_jax.methods.glora import CHOICES, TENSORS
  return np.asarray([[CHOICES[t].index(v) for t, v in zip(TENSORS, c)] for c in cand], np.int32)


def supernet(paths: Sequence[str], rank: int, choices=None):
  """GLoRA supernet on ``paths`` chained with the fully trained head; ``choices``
  (``[L, 5]`` ints, possibly traced) picks each layer's configuration (default: peft's)."""
  import lowrank_jax as lj
  from lowrank_jax.methods.glora import LayerConfig
  from experiments.recipes import HEAD
  if choices is None:
    config = LayerConfig()
  else:
    config = {p: LayerConfig(*(choices[i, j] for j in range(5))) for i, p in enumerate(paths)}
  return lj.chain(lj.glora(WHERE, rank, config=config, supernet=True), lj.full(HEAD))


def make_supernet_step(loss_fn: Callable, optimizer, paths: Sequence[str], rank: int) -> Callable:
  """Jitted ``step(phi, opt_state, theta0, batch, key) -> (phi, opt_state, loss)``: one
  optimizer step of the supernet under a configuration sampled from ``key`` (so the step
  compiles once), dropout from an independent split of ``key``."""
  import jax
  import optax

  @jax.jit
  def step(phi, opt_state, theta0, batch, key):
    k_cfg, k_drop = jax.random.split(key)
    reparam = supernet(paths, rank, sample_choices(k_cfg, len(paths)))
    (loss, _), g = jax.value_and_grad(lambda p: loss_fn(reparam.apply(theta0, p), batch, k_drop),
                                      has_aux=True)(phi)
    upd, opt_state = optimizer.update(g, opt_state, phi)
    return optax.apply_updates(phi, upd), opt_state, loss
  return step


def make_supernet_predict(logits_fn: Callable, paths: Sequence[str], rank: int) -> Callable:
  """Jitted ``predict(theta0, phi, choices, batch) -> logits`` of the supernet under the
  configuration ``choices`` (``[L, 5]`` int32, traced: every candidate reuses one
  compilation)."""
  import jax

  @jax.jit
  def predict(theta0, phi, choices, batch):
    return logits_fn(supernet(paths, rank, choices).apply(theta0, phi), batch)
  return predict


def adapter_params(cand: Sequence, dims: Sequence[tuple[int, int]], rank: int) -> int:
  """Parameters of the support tensors of a candidate (the search's count)."""
  from lowrank_jax.methods.glora import glora_param_count
  return sum(glora_param_count(c, di, do, rank) for c, (di, do) in zip(cand, dims))


def random_legal(rng: np.random.Generator, n_layers: int, ok: Callable[[tuple], bool],
                 max_tries: int = 100_000) -> tuple:
  """A uniformly random candidate (rejection sampling) for which ``ok`` holds."""
  from lowrank_jax.methods.glora import random_config
  for _ in range(max_tries):
    cand = tuple(random_config(rng) for _ in range(n_layers))
    if ok(cand):
      return cand
  raise ValueError(f"no legal random configuration in {max_tries} tries")


def run(a: argparse.Namespace) -> dict[str, Any]:
  """The three stages; returns the results dict that :func:`write` stores."""
  import jax
  from tqdm import tqdm

  import lowrank_jax as lj
  from lowrank_jax import train
  from lowrank_jax.methods.glora import glora_layers, glora_search
  from experiments import recipes

  t_all = time.perf_counter()
  cfg = dict(BASE_CFG, epochs=a.epochs, seed=a.seed, max_len=a.max_len, name="glora_supernet")
  if a.max_per_class:
    cfg["data"] = {"max_per_class": a.max_per_class}
  task, config, theta0, (k_method, k_train) = load_problem(cfg)
  splits, bs = task.splits, cfg["batch_size"]
  layers = glora_layers(theta0, WHERE)
  paths = [p for p, _, _ in layers]
  dims = [(di, do) for _, di, do in layers]
  limit = a.param_limit if a.param_limit is not None else sum(a.lora_rank * (di + do) for di, do in dims)
  loss_fn, logits_fn = model_fns(cfg, config)

  # 1. supernet training, a random configuration per step
  steps_per_epoch = len(splits["train"]["labels"]) // bs
  _, phi = lj.initialize(supernet(paths, a.rank), k_method, theta0)
  opt = recipes.build_optimizer(cfg["optimizer"], a.epochs * steps_per_epoch)
  opt_state = opt.init(phi)
  step = make_supernet_step(loss_fn, opt, paths, a.rank)
  rng = np.random.default_rng(a.seed)
  supernet_losses = []
  t0 = time.perf_counter()
  for epoch in range(a.epochs):
    losses = []
    for i, b in enumerate(tqdm(train.batches(splits["train"], bs, rng=rng), total=steps_per_epoch,
                               desc=f"supernet epoch {epoch + 1}/{a.epochs}", disable=a.quiet,
                               file=sys.stderr, mininterval=2.0)):
      k = jax.random.fold_in(k_train, epoch * steps_per_epoch + i)
      phi, opt_state, loss = step(phi, opt_state, theta0, b, k)
      losses.append(float(loss))
    supernet_losses.append(float(np.mean(losses)))
    print(f"[supernet] epoch {epoch + 1}: train loss {supernet_losses[-1]:.4f}", flush=True)
  supernet_time = time.perf_counter() - t0

  # 2. evolutionary search; fitness = validation accuracy under the candidate (weight sharing)
  predict = make_supernet_predict(logits_fn, paths, a.rank)

  def accuracy(cand, split: str) -> float:
    idx = as_indices(cand)
    return evaluate_split(lambda b: predict(theta0, phi, idx, b), splits[split], bs)[0]

  t0 = time.perf_counter()
  res = glora_search(jax.random.key(a.seed), dims, lambda c: accuracy(c, "validation"), rank=a.rank,
                     population=a.population, select=a.select, mutation=a.mutation,
                     crossover=a.crossover, m_prob=a.m_prob, epochs=a.search_epochs, param_limit=limit)
  search_time = time.perf_counter() - t0
  print(f"[search] {res.evaluated} candidates in {search_time:.0f} s, best validation accuracy "
        f"{res.best_fitness:.4f}", flush=True)

  # 3. retrain the best (and a random legal) configuration as a fixed GLoRA from scratch
  rows = {"best": res.best}
  if a.random_baseline:
    rows["random"] = random_legal(np.random.default_rng(a.seed + 1), len(dims),
                                  lambda c: adapter_params(c, dims, a.rank) <= limit)

  def by_name(cand) -> dict:
    return {p: dict(zip("ABCDE", c)) for p, c in zip(paths, cand)}

  out = {"settings": {k: v for k, v in vars(a).items() if k not in ("out", "quiet")},
         "train_config": cfg, "param_limit": limit, "layers": paths,
         "n_examples": {k: len(v["labels"]) for k, v in splits.items()},
         "supernet_train_loss": supernet_losses, "evaluated": res.evaluated,
         "history": res.history,
         "top": [{"val_accuracy": f, "adapter_params": adapter_params(c, dims, a.rank),
                  "layers": by_name(c)} for c, f in res.top],
         "timings_s": {"supernet_train": supernet_time, "search": search_time,
                       "per_candidate": search_time / max(1, res.evaluated)},
         "configs": {}}
  for label, cand in rows.items():
    spec = {"kind": "glora", "where": WHERE, "rank": a.rank,
            "config": {p: list(c) for p, c in zip(paths, cand)}}
    t0 = time.perf_counter()
    r = run_one(dict(cfg, name=f"glora_search_{label}", method=spec), pathlib.Path(a.out), quiet=a.quiet)
    out["timings_s"][f"retrain_{label}"] = time.perf_counter() - t0
    out["configs"][label] = {
        "layers": by_name(cand), "adapter_params": adapter_params(cand, dims, a.rank),
        "trainable_params": r["trainable_params"],
        "supernet_val_accuracy": accuracy(cand, "validation"),
        "supernet_test_accuracy": accuracy(cand, "test"),
        "retrained_val_accuracy": r["history"][-1]["val_accuracy"],
        "retrained_test_accuracy": r["test_accuracy"]}
  out["timings_s"]["total"] = time.perf_counter() - t_all
  return out


def table(out: dict) -> str:
  """The markdown summary of :func:`run`'s results."""
  t = out["timings_s"]
  lines = [f"GLoRA search (MiniLM-L6, training epochs {out['train_config']['epochs']}): {out['evaluated']} "
           f"candidates, parameter limit {out['param_limit']:,}; supernet {t['supernet_train']:.0f} s, "
           f"search {t['search']:.0f} s, total {t['total']:.0f} s", "",
           "| configuration | adapter params | trainable params | supernet val acc. "
           "| supernet test acc. | retrained test acc. |",
           "|---|---:|---:|---:|---:|---:|"]
  for label, c in out["configs"].items():
    lines.append(f"| {label} | {c['adapter_params']:,} | {c['trainable_params']:,} | "
                 f"{c['supernet_val_accuracy']:.4f} | {c['supernet_test_accuracy']:.4f} | "
                 f"{c['retrained_test_accuracy']:.4f} |")
  return "\n".join(lines)


def plot(history: Sequence[float], final: float, path: pathlib.Path) -> None:
  """Best validation accuracy per search epoch (and after ranking the last epoch's
  candidates, ``final``), written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(range(1, len(history) + 1), [100 * h for h in history], marker="o", label="best so far")
  ax.axhline(100 * final, color="gray", ls=":", label=f"final best {100 * final:.1f}%")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend(fontsize=8, loc="lower right")
  ax.set_xlabel("search epoch")
  ax.set_ylabel("best validation accuracy (%)")
  ax.set_title("GLoRA evolutionary search (MiniLM, docstrings)")
  ax.grid(alpha=0.3)
  save_figure(fig, path)


def write(out: dict, folder: pathlib.Path) -> None:
  """``glora_search.{json,md,png}`` in ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  _atomic_write(folder / "glora_search.json", json.dumps(out, indent=1, default=str))
  md = table(out)
  _atomic_write(folder / "glora_search.md", md + "\n")
  plot(out["history"], out["top"][0]["val_accuracy"], folder / "glora_search.png")
  print("\n" + md)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="outputs/glora_search")
  p.add_argument("--epochs", type=int, default=3, help="supernet and retraining epochs")
  p.add_argument("--max-len", type=int, default=64, help="tokens per docstring")
  p.add_argument("--rank", type=int, default=4, help="rank of the low-rank support tensors")
  p.add_argument("--lora-rank", type=int, default=8,
                 help="parameter limit = LoRA of this rank on the same layers (unless --param-limit)")
  p.add_argument("--param-limit", type=int, default=None, help="largest legal adapter parameter count")
  p.add_argument("--population", type=int, default=12)
  p.add_argument("--select", type=int, default=4, help="top-k kept as parents")
  p.add_argument("--mutation", type=int, default=6, help="mutated candidates per search epoch")
  p.add_argument("--crossover", type=int, default=6, help="crossed-over candidates per search epoch")
  p.add_argument("--m-prob", type=float, default=0.2, help="per-choice mutation probability")
  p.add_argument("--search-epochs", type=int, default=4)
  p.add_argument("--no-random-baseline", dest="random_baseline", action="store_false",
                 help="skip retraining a random legal configuration")
  p.add_argument("--max-per-class", type=int, default=None, help="cap examples per class (quick runs)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true")
  a = p.parse_args(argv)
  write(run(a), pathlib.Path(a.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
