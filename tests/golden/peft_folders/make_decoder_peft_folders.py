"""Regenerates the decoder PEFT folders of ``tests/golden/peft_folders/decoders`` (optional
extra; CI never runs it: the tests read the committed folders and logits without torch).

    .venv/bin/python tests/golden/peft_folders/make_decoder_peft_folders.py [CASE ...]

The bases are the tiny random decoders already stored in ``tests/golden/decoders/<family>/``
(``make_decoders.py``; nothing new is stored for them): Llama (q, k, v, o and MLP biases,
untied ``lm_head``), Qwen2 (q, k, v biases, tied embeddings), Mixtral (4 experts, fused
``gate_up_proj`` / ``down_proj`` stacks) and Gemma (``intermediate_size`` 96, so targets
differ in size). Every case of :data:`CASES` loads its family's folder with transformers,
wraps it with a peft config, sets every trainable parameter to seeded random values
(``make_peft_folders.randomize_trainable``), runs AdaLoRA's allocator where asked
(``make_peft_folders.allocate``) and stores

* ``decoders/<case>/``: peft's ``save_pretrained`` folder (``base_model_name_or_path`` set
  to the family's name, not this machine's path; peft's README dropped);
* ``decoders/<case>.npz``: ``input_ids``, ``attention_mask`` (the family's batch of
  ``make_decoders.batch``: full, left-padded, right-padded rows) and ``logits`` (float32) of
  ``PeftModel.from_pretrained`` of the folder on a fresh load of the base, with
  ``position_ids = cumsum(mask) - 1`` (``make_decoders.hf_logits``).

What peft 0.21.2 cannot do on these models (so no case): ``target_parameters`` (the
Mixtral / Qwen3-MoE expert stacks, which are ``nn.Parameter`` s, not ``nn.Linear`` s) exists
for LoRA only (LoKr, LoHa, VeRA and IA3 configs have no such field; AdaLoRA and DoRA on
expert stacks are refused by peft, see :data:`REFUSED`), so the MoE cases adapt the experts
with plain LoRA and the attention with the other tuners.

Draws: the adapter from a ``torch.Generator`` seeded ``2000 +`` the case's index in :data:`CASES`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import peft
import torch
from transformers import AutoModelForCausalLM

HERE = pathlib.Path(__file__).resolve().parent
DECODERS = HERE.parent / "decoders"
OUT = HERE / "decoders"
sys.path[:0] = [str(HERE), str(DECODERS)]
from make_decoders import batch, configs, hf_logits  # noqa: E402  (the scripts beside us)
from make_peft_folders import allocate, randomize_trainable  # noqa: E402

QV = ["q_proj", "v_proj"]
EXPERTS = dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
CASES = {
  # LoRA variants
  "llama_lora_patterns": ("llama", lambda: peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=QV + ["down_proj"], rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 3},
      alpha_pattern={"q_proj": 3.0})),
  "llama_lora_layers": ("llama", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"],
                                                         layers_to_transform=[1], layers_pattern="layers")),
  "llama_lora_bias_all": ("llama", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV, bias="all")),
  "llama_lora_bias_lora_only": ("llama", lambda: peft.LoraConfig(r=2, lora_alpha=4, bias="lora_only",
                                                                 target_modules=["q_proj", "down_proj"])),
  "llama_lora_modules_to_save": ("llama", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV,
                                                                  modules_to_save=["lm_head", "norm"])),
  "llama_lora_dora": ("llama", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV + ["down_proj"],
                                                       use_dora=True)),
  "qwen2_lora_rslora": ("qwen2", lambda: peft.LoraConfig(r=4, lora_alpha=4, use_rslora=True,
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                         rank_pattern={"k_proj": 2})),
  "qwen2_lora_bias_all": ("qwen2", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                                           bias="all")),
  "qwen2_lora_bias_lora_only": ("qwen2", lambda: peft.LoraConfig(r=2, lora_alpha=4, bias="lora_only",
                                                                 target_modules=["q_proj", "k_proj", "v_proj"])),
  "mixtral_lora_patterns": ("mixtral", lambda: peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=QV, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0}, **EXPERTS)),
  "mixtral_lora_dora": ("mixtral", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV, use_dora=True)),
  "mixtral_lora_rslora": ("mixtral", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"],
                                                             use_rslora=True, **EXPERTS)),
  # other tuners
  "llama_adalora": ("llama", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                                        target_modules=QV + ["up_proj"])),
  "llama_adalora_allocated": ("llama", lambda: peft.AdaLoraConfig(
      init_r=4, target_r=2, lora_alpha=8, tinit=0, tfinal=0, deltaT=1, total_step=3, target_modules=QV)),
  "mixtral_adalora": ("mixtral", lambda: peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, total_step=10,
                                                            target_modules=["q_proj", "o_proj"])),
  "llama_lokr": ("llama", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=QV + ["down_proj"])),
  "gemma_lokr_decomposed": ("gemma", lambda: peft.LoKrConfig(r=1, alpha=2, decompose_both=True,
                                                             target_modules=["down_proj", "k_proj"])),
  "mixtral_lokr": ("mixtral", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"],
                                                      rank_pattern={"o_proj": 1})),
  "llama_loha": ("llama", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=QV + ["gate_proj"])),
  "qwen2_loha": ("qwen2", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["k_proj", "up_proj"],
                                                  alpha_pattern={"up_proj": 1.0})),
  "llama_vera": ("llama", lambda: peft.VeraConfig(r=4, save_projection=True, target_modules=QV + ["down_proj"])),
  "gemma_vera": ("gemma", lambda: peft.VeraConfig(r=4, save_projection=True,
                                                  target_modules=["q_proj", "k_proj", "down_proj", "up_proj"])),
  "llama_ia3": ("llama", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                                                feedforward_modules=["down_proj"])),
  "qwen2_ia3": ("qwen2", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "gate_proj", "down_proj"],
                                                feedforward_modules=["gate_proj", "down_proj"])),
  "mixtral_ia3": ("mixtral", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "o_proj"],
                                                    feedforward_modules=["o_proj"])),
}
# Configs peft 0.21.2 refuses on these models (checked by --refused): case -> (family, config).
REFUSED = {
  "mixtral_lora_dora_experts": ("mixtral", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=QV,
                                                                   use_dora=True, **EXPERTS)),
  "mixtral_adalora_experts": ("mixtral", lambda: peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6,
                                                                    total_step=10, target_modules=QV, **EXPERTS)),
}


def load_base(family: str):
  return AutoModelForCausalLM.from_pretrained(DECODERS / family, attn_implementation="eager").eval()


def _logits_with_grad(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               position_ids=torch.tensor(pos)).logits


def make(name: str) -> None:
  family, config = CASES[name]
  seed = list(configs()).index(family)  # the batch make_decoders stored for this family
  ids, mask = batch(seed)
  model = peft.get_peft_model(load_base(family), config())
  randomize_trainable(model, torch.Generator().manual_seed(2000 + list(CASES).index(name)))
  if name.endswith("_allocated"):
    model.train()
    allocate(model, lambda m: _logits_with_grad(m, ids, mask))
  folder = OUT / name
  shutil.rmtree(folder, ignore_errors=True)
  model.eval().save_pretrained(str(folder))
  (folder / "README.md").unlink(missing_ok=True)
  cfg_path = folder / "adapter_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["base_model_name_or_path"] = family  # not this machine's absolute path
  cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
  # what a user of the folder gets: peft loads it onto a fresh load of the base
  fresh = peft.PeftModel.from_pretrained(load_base(family), str(folder)).eval()
  np.savez(OUT / f"{name}.npz", input_ids=ids, attention_mask=mask, logits=hf_logits(fresh, ids, mask))
  print(name, sorted(p.name for p in folder.iterdir()), sum(p.stat().st_size for p in folder.iterdir()) // 1024, "KB")


def refused() -> None:
  """Prints what peft says to each config of :data:`REFUSED`."""
  for name, (family, config) in REFUSED.items():
    try:
      peft.get_peft_model(load_base(family), config())
      print(name, "ACCEPTED (move it to CASES)")
    except Exception as e:  # noqa: BLE001  (peft's own error is the point)
      print(name, "->", type(e).__name__, str(e).splitlines()[0][:200])


def main() -> None:
  torch.use_deterministic_algorithms(True)
  args = sys.argv[1:]
  if args == ["--refused"]:
    return refused()
  OUT.mkdir(exist_ok=True)
  for name in args or list(CASES):
    make(name)


if __name__ == "__main__":
  main()
