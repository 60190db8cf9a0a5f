"""Regenerates the PEFT adapter folders of ``tests/golden/peft_folders`` (optional extra; CI
never runs it: the tests read the committed folders and outputs without torch).

    pip install torch==2.13.0 transformers peft==0.21.2
    python tests/golden/peft_folders/make_peft_folders.py [--out DIR] [CASE ...]

Two tiny BERT models are made from configs (nothing downloaded) with seeded weights:
``base_bert/`` (``BertModel``) and ``base_bert_cls/`` (``BertForSequenceClassification``, 3
labels), each ``config.json`` + ``model.safetensors``. Every case of :data:`CASES` wraps one of
them with a peft config, sets every trainable parameter to seeded random values (so ``B != 0``,
trained biases and ``modules_to_save`` differ from the base), and stores:

* ``<case>/``: peft's ``save_pretrained`` folder (``adapter_config.json``,
  ``adapter_model.safetensors``);
* ``<case>.npz``: ``input_ids``, ``attention_mask`` and ``out``, the output (``last_hidden_state``,
  or ``logits`` for ``base_bert_cls``, float32) of peft's ``PeftModel.from_pretrained`` of the
  folder on a fresh copy of the base, i.e. what a user of the folder gets; ``out_in_memory`` the
  same of the model that saved it. They differ for AdaLoRA after rank allocation only: peft
  prunes the masked triplets when saving and the loaded module's ``ranknum`` becomes the kept
  rank, so the loaded scale is ``alpha / kept rank``, not ``alpha / init_r``.

AdaLoRA "after rank allocation" runs peft's ``update_and_allocate`` to its final mask
(``rank_pattern`` in the config, pruned tensors in the file). PiSSA / OLoRA: the initial adapter
is saved with ``init_lora_weights=True`` as peft asks (``<case>_initial/``), the "trained" one
(random values) under ``<case>/`` and its conversion to a plain LoRA of rank ``2r`` relative to
the original base by ``save_pretrained(path_initial_model_for_weight_conversion=...)`` under
``<case>_converted/``; ``<case>.npz`` then also holds ``out_converted`` (the converted adapter on
the original base; equal to ``out`` up to rounding), ``residual/<module>`` (the rewritten base
weights, torch layout).

Reproducibility (torch 2.13.0 CPU, transformers, peft 0.21.2): a rerun into ``--out`` gives every
tensor and array bit for bit; only the order of ``target_modules`` in the configs may differ (peft
keeps it as a set).

Draws: the base from a ``torch.Generator`` seeded 0 (the same base for every case), the adapter
from one seeded ``1000 +`` the case's index in :data:`CASES`; base weights ``0.1 N(0, 1)`` (LayerNorm
scales ``1 + 0.1 N``), adapter parameters ``0.2 N(0, 1)`` (1-d ones ``0.5 N``, IA3 ``1 + 0.2 N``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil

import numpy as np
import peft
import torch
import transformers
from safetensors.torch import save_file

HERE = pathlib.Path(__file__).parent
BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_act="gelu", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="eager")
IDS = np.array([[2, 5, 7, 9, 11, 3, 0], [2, 13, 17, 19, 23, 29, 3]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], np.int64)
QV = ["query", "value"]

CASES = {
  # LoRA variants
  "lora_patterns": ("bert", lambda: peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
      rank_pattern={"value": 2, "layer.1.intermediate.dense": 3}, alpha_pattern={"query": 3.0})),
  "lora_layers": ("bert", lambda: peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["query", "key"], layers_to_transform=[1], layers_pattern="layer")),
  "lora_bias_all": ("bert", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV, bias="all")),
  "lora_bias_lora_only": ("bert", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV,
                                                          bias="lora_only")),
  "lora_seq_cls": ("bert_cls", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV,
                                                        task_type="SEQ_CLS")),
  "lora_dora": ("bert", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV + ["output.dense"],
                                                 use_dora=True)),
  "lora_rslora": ("bert", lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=QV, use_rslora=True,
                                                   rank_pattern={"value": 2})),
  "lora_pissa": ("bert", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV,
                                                  init_lora_weights="pissa")),
  "lora_olora": ("bert", lambda: peft.LoraConfig(r=2, lora_alpha=2, target_modules=QV,
                                                  init_lora_weights="olora")),
  # other tuners
  "adalora": ("bert", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                                 target_modules=QV)),
  "adalora_allocated": ("bert", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, tinit=0,
                                                           tfinal=0, deltaT=1, total_step=3,
                                                           target_modules=QV)),
  "lokr": ("bert", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=QV + ["intermediate.dense"])),
  "lokr_decomposed": ("bert", lambda: peft.LoKrConfig(r=1, alpha=2, decompose_both=True,
                                                      target_modules=["intermediate.dense"])),
  "loha": ("bert", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=QV)),
  "vera": ("bert", lambda: peft.VeraConfig(r=4, save_projection=True, target_modules=QV)),
  "ia3": ("bert", lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                         feedforward_modules=["output.dense"])),
}


def base_model(kind: str, gen: torch.Generator):
  cfg = transformers.BertConfig(**BERT, num_labels=3)
  model = (transformers.BertModel(cfg, add_pooling_layer=True) if kind == "bert"
           else transformers.BertForSequenceClassification(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.1 * noise if "LayerNorm.weight" in name else 0.1 * noise)
  return model


def randomize_trainable(model, gen: torch.Generator) -> None:
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not p.requires_grad:
        continue
      noise = torch.randn(p.shape, generator=gen)
      if "ia3_l" in name:
        p.copy_(1 + 0.2 * noise)
      elif p.ndim == 1 or (p.ndim == 2 and 1 in p.shape and "lora_E" not in name):
        p.copy_(0.5 * noise)
      else:
        p.copy_(0.2 * noise)


def output(model) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
  t = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
  return t.detach().clone().float().numpy().copy()


def save_base(model, folder: pathlib.Path) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  model.config.to_json_file(folder / "config.json")
  save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
            str(folder / "model.safetensors"), metadata={"format": "pt"})


def allocate(model, forward=None) -> None:
  """AdaLoRA: a few steps of the rank allocator until its final mask (``rank_pattern``);
  ``forward(model)`` is the tensor whose squared sum is the loss (default: BERT's hidden state)."""
  cfg = model.peft_config["default"]
  for step in range(cfg.total_step):
    model.zero_grad()
    out = forward(model) if forward else model(input_ids=torch.tensor(IDS),
                                               attention_mask=torch.tensor(MASK)).last_hidden_state
    (out ** 2).sum().backward()
    model.base_model.update_and_allocate(step)
  model.zero_grad()
  assert cfg.rank_pattern, "the allocator set no rank_pattern"


def make(name: str, out: pathlib.Path) -> None:
  kind, config = CASES[name]
  base = base_model(kind, torch.Generator().manual_seed(0))
  save_base(base, out / f"base_{kind}")  # the same weights for every case
  gen = torch.Generator().manual_seed(1000 + list(CASES).index(name))
  cfg = config()
  arrays = {"input_ids": IDS, "attention_mask": MASK}
  if name in ("lora_pissa", "lora_olora"):
    init = cfg.init_lora_weights
    model = peft.get_peft_model(base, cfg)
    initial = out / f"{name}_initial"
    shutil.rmtree(initial, ignore_errors=True)
    model.peft_config["default"].init_lora_weights = True  # peft's rule for the initial adapter
    model.save_pretrained(str(initial))
    model.peft_config["default"].init_lora_weights = init
    randomize_trainable(model, gen)
    model.eval()
    arrays["out_in_memory"] = output(model)
    arrays.update({f"residual/{n[len('base_model.model.'):-len('.base_layer.weight')]}":
                   p.detach().clone().numpy().copy() for n, p in model.named_parameters()
                   if n.endswith(".base_layer.weight")})
    model.save_pretrained(str(out / name))
    model.save_pretrained(str(out / f"{name}_converted"),
                          path_initial_model_for_weight_conversion=str(initial))
    original = base_model(kind, torch.Generator().manual_seed(0))
    converted = peft.PeftModel.from_pretrained(original, str(out / f"{name}_converted")).eval()
    arrays["out_converted"] = output(converted)
  else:
    model = peft.get_peft_model(base, cfg)
    randomize_trainable(model, gen)
    if name == "adalora_allocated":
      model.train()
      allocate(model)
    model.eval()
    arrays["out_in_memory"] = output(model)
    model.save_pretrained(str(out / name))
  # what a user of the folder gets: peft loads it onto a fresh copy of the base
  fresh = base_model(kind, torch.Generator().manual_seed(0))
  arrays["out"] = output(peft.PeftModel.from_pretrained(fresh, str(out / name)).eval())
  np.savez(out / f"{name}.npz", **arrays)
  for folder in out.glob(f"{name}*/README.md"):  # peft's model card: not data
    folder.unlink()
  print(name, "->", sorted(os.listdir(out / name)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", type=pathlib.Path, default=HERE)
  ap.add_argument("cases", nargs="*")
  args = ap.parse_args()
  torch.use_deterministic_algorithms(True)
  names = args.cases or list(CASES)
  for name in names:
    make(name, args.out)


if __name__ == "__main__":
  main()
