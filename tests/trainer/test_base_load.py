"""A BERT base read slice by slice on a mesh (trainer.placement.load_bert) equals the whole
load (models.bert.load_bert) leaf for leaf, in its target sharding; the two-process share of
the bytes is checked in tests/test_distributed.py."""

import dataclasses
import json

import jax
import numpy as np

from lowrank_jax.io import hf as hf_io, safetensors as st
from lowrank_jax.models import bert
from lowrank_jax.trainer.config import MeshConfig
from lowrank_jax.trainer.placement import Placement, load_bert
from tests.test_distributed import needs_8

TINY = bert.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=24)


def save_tiny_bert(folder, config: bert.BertConfig = TINY, seed: int = 0):
  """A Hugging Face BERT folder (``config.json``, ``model.safetensors``, torch layout) of random weights."""
  folder.mkdir(parents=True)
  params = bert.init_bert(jax.random.key(seed), config)
  flat = {bert.hf_name(p): (np.asarray(v).T if p.endswith("/kernel") else np.asarray(v))
          for p, v in hf_io.flatten(params).items()}
  st.save_file(flat, folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps({"model_type": "bert", **dataclasses.asdict(config)}))
  return params


@needs_8
def test_sliced_bert_load_equals_the_whole_load(tmp_path):
  params = save_tiny_bert(tmp_path / "bert")
  cfg, whole = bert.load_bert(tmp_path / "bert")
  assert cfg == TINY
  placement = Placement.from_config(MeshConfig(mesh="fsdp:4,tensor:2"), "bert")
  cfg2, sliced, report = load_bert(str(tmp_path / "bert"), np.float32, placement)
  assert cfg2 == TINY
  flat_w, flat_s, flat_p = (hf_io.flatten(t) for t in (whole, sliced, params))
  assert sorted(flat_s) == sorted(flat_w) == sorted(flat_p)
  specs = hf_io.flatten(placement.specs(whole))
  sharded = 0
  for path, w in flat_w.items():
    np.testing.assert_array_equal(np.asarray(flat_s[path]), np.asarray(w), err_msg=path)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(flat_p[path]), err_msg=path)
    assert flat_s[path].sharding.spec == specs[path], path
    sharded += any(e is not None for e in specs[path])
  assert sharded >= 12  # kernels split over fsdp / tensor: the slices are really sliced
  total = sum(np.asarray(w).nbytes for w in flat_w.values())
  assert report.bytes_total == total and report.bytes_read == total  # one process: every slice once
  # without a mesh: the whole load
  _, one, report1 = load_bert(str(tmp_path / "bert"), np.float32, Placement())
  assert report1.bytes_read == total
  jax.tree.map(np.testing.assert_array_equal, one, whole)
