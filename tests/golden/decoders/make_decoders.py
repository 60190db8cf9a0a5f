"""Regenerates tests/golden/decoders: tiny random Hugging Face decoders and their logits.

Run with the project's venv (torch, transformers, peft; nothing is downloaded):

    .venv/bin/python tests/golden/decoders/make_decoders.py [--only FAMILY ...] [--no-peft] [--no-tokenizer]

For each family a model is built from a config (vocab 256, hidden 64, 2 layers, 4 query
heads sharing 2 key/value heads, head_dim 16), its weights redrawn at a scale where
every switch matters (norm weights away from their identity, soft-caps that saturate,
windows shorter than the sequence), saved with ``save_pretrained`` into
``<family>/`` and run in float32 (eager attention) on a batch of three sequences: no
padding, left padding and right padding, with ``position_ids = cumsum(mask) - 1`` as
``generate`` uses. ``<family>.npz`` holds ``input_ids``, ``attention_mask`` and
``logits``. Extra cases:

* ``llama.npz`` also holds ``logits_<kind>`` for the same weights under the RoPE
  scalings in ``llama_rope_variants.json`` (linear, dynamic with positions past
  ``max_position_embeddings``);
* ``qwen2/`` is saved sharded (``max_shard_size``) so ``model.safetensors.index.json``
  is exercised;
* ``llama_bf16/`` is a bfloat16 checkpoint: ``logits`` of the model run in bfloat16 and
  ``logits_f32`` of the same (rounded) weights run in float32;
* ``peft_<family>/`` (unless ``--no-peft``): a peft LoRA folder (r=4, alpha=8, random
  ``lora_B``) on q,k,v,o,gate,up,down (and the expert stacks of the MoE families through
  ``target_parameters``), with ``peft_<family>.npz`` logits;
* ``tokenizer/`` (unless ``--no-tokenizer``): a tiny BPE tokenizer trained here, saved by
  ``PreTrainedTokenizerFast`` with a chat template in ``tokenizer_config.json``, and
  ``tokenizer_cases.json`` with transformers' encodings, decodings and ``apply_chat_template``
  outputs (text and ids).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

HERE = pathlib.Path(__file__).resolve().parent
COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)
T = 12


def configs() -> dict:
  C = transformers
  return {
    "llama": C.LlamaConfig(**COMMON, intermediate_size=64, attention_bias=True, mlp_bias=True,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "mistral": C.MistralConfig(**COMMON, intermediate_size=64, sliding_window=4, tie_word_embeddings=True),
    "qwen2": C.Qwen2Config(**COMMON, intermediate_size=64, use_sliding_window=True, sliding_window=4,
                           max_window_layers=1, tie_word_embeddings=True),
    "qwen3": C.Qwen3Config(**COMMON, intermediate_size=64, tie_word_embeddings=True),
    "gemma": C.GemmaConfig(**COMMON, intermediate_size=96),
    "gemma2": C.Gemma2Config(**COMMON, intermediate_size=96, sliding_window=4, query_pre_attn_scalar=32,
                             attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": C.Gemma3TextConfig(**COMMON, intermediate_size=96, sliding_window=4, query_pre_attn_scalar=32,
                                 layer_types=["sliding_attention", "full_attention"],
                                 rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 1e6},
                                                  "sliding_attention": {"rope_type": "default",
                                                                        "rope_theta": 10000.0}}),
    "qwen3_moe": C.Qwen3MoeConfig(**COMMON, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0],
                                  tie_word_embeddings=True),
    "mixtral": C.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                               sliding_window=4, tie_word_embeddings=True),
  }


def randomize(model, seed: int, gemma_norms: bool) -> None:
  """Redraws every weight: matrices N(0, 0.15^2), biases N(0, 0.1^2), norm weights
  1 + N(0, 0.1^2) (Gemma's (1 + w) norms: N(0, 0.1^2))."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if "norm" in name:
        p.copy_(0.1 * noise + (0.0 if gemma_norms else 1.0))
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.15 * noise)


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Three rows: full, left-padded by 4, right-padded by 3."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 256, (3, T)).astype(np.int64)
  mask = np.ones((3, T), np.int64)
  mask[1, :4] = 0
  mask[2, -3:] = 0
  ids[mask == 0] = 0
  return ids, mask


def hf_logits(model, ids, mask) -> np.ndarray:
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


def build(name: str, cfg, seed: int):
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  randomize(model, seed, gemma_norms=name.startswith("gemma"))
  return model


def save_folder(model, folder: pathlib.Path, **kw) -> None:
  if folder.exists():
    shutil.rmtree(folder)
  model.save_pretrained(folder, **kw)
  gen = folder / "generation_config.json"
  if gen.exists():
    gen.unlink()


def make_family(name: str, cfg, seed: int) -> None:
  model = build(name, cfg, seed)
  ids, mask = batch(seed)
  kw = {"max_shard_size": "100KB"} if name == "qwen2" else {}
  save_folder(model, HERE / name, **kw)
  arrays = {"input_ids": ids, "attention_mask": mask, "logits": hf_logits(model, ids, mask)}
  if name == "llama":
    variants = {}
    for kind, extra in (("linear", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
                        ("dynamic", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                     "max_position_embeddings": 8})):
      vcfg = type(cfg)(**{**cfg.to_dict(), "rope_parameters": None, **extra})
      vmodel = build(name, vcfg, seed)
      vmodel.load_state_dict(model.state_dict())
      variants[kind] = json.loads(vcfg.to_json_string())
      arrays[f"logits_{kind}"] = hf_logits(vmodel, ids, mask)
    (HERE / "llama_rope_variants.json").write_text(json.dumps(variants, indent=2, sort_keys=True) + "\n")
  np.savez(HERE / f"{name}.npz", **arrays)
  print(name, {k: v.shape for k, v in arrays.items()},
        sum(f.stat().st_size for f in (HERE / name).iterdir()) // 1024, "KB")


def make_bf16(cfg, seed: int) -> None:
  """Saved in bfloat16, then loaded back by transformers twice: in bfloat16 and in float32."""
  save_folder(build("llama", cfg, seed).to(torch.bfloat16), HERE / "llama_bf16")
  ids, mask = batch(seed)
  out = {}
  for key, dtype in (("logits", torch.bfloat16), ("logits_f32", torch.float32)):
    model = AutoModelForCausalLM.from_pretrained(HERE / "llama_bf16", dtype=dtype,
                                                 attn_implementation="eager").eval()
    out[key] = hf_logits(model, ids, mask)
  np.savez(HERE / "llama_bf16.npz", input_ids=ids, attention_mask=mask, **out)
  print("llama_bf16", sum(f.stat().st_size for f in (HERE / "llama_bf16").iterdir()) // 1024, "KB")


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft(name: str, seed: int) -> None:
  """A peft LoRA (r=4, alpha=8, A and B random: init_lora_weights=False) on the family's
  saved folder; expert stacks through target_parameters (peft fuses gate/up at rank 2r)."""
  import peft
  model = AutoModelForCausalLM.from_pretrained(HERE / name, attn_implementation="eager").eval()
  kw = {}
  if name in ("qwen3_moe", "mixtral"):
    kw["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
  torch.manual_seed(1000 + seed)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kw)
  pm = peft.get_peft_model(model, cfg).eval()
  folder = HERE / f"peft_{name}"
  if folder.exists():
    shutil.rmtree(folder)
  pm.save_pretrained(folder)
  (folder / "README.md").unlink(missing_ok=True)
  cfg_path = folder / "adapter_config.json"
  cfg_json = json.loads(cfg_path.read_text())
  cfg_json["base_model_name_or_path"] = name  # not this machine's absolute path
  cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
  ids, mask = batch(seed)
  np.savez(HERE / f"peft_{name}.npz", input_ids=ids, attention_mask=mask, logits=hf_logits(pm, ids, mask))
  print(f"peft_{name}", sum(f.stat().st_size for f in folder.iterdir()) // 1024, "KB")


CHAT_TEMPLATE = (
  "{{ bos_token }}{% set ns = namespace(users=0) %}"
  "{% for message in messages %}"
  "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
  "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
  "{% if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}"
  "<|im_start|>{{ message['role'] }}\n"
  "{% if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}"
  "{% else %}{{ message['content'] | trim }}{% endif %}<|im_end|>\n"
  "{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
  "{% if ns.users > 1 %}{{ eos_token }}{% endif %}"
)
CORPUS = [
  "The quick brown fox jumps over the lazy dog.", "Low-rank adapters fine-tune large models cheaply.",
  "JAX transforms pure functions: grad, jit, vmap.", "Hello, world! How are you today?",
  "Tokenizers split text into pieces; a chat template renders conversations.",
  "naïve café déjà vu — ünïcödé text 123 4567",
]
TEXTS = ["Hello, world!", "The lazy fox fine-tunes JAX.", "  leading and trailing spaces  ",
         "unseen wörds ✓ and <|im_start|> inside", ""]
CONVERSATIONS = [
  [{"role": "user", "content": "Hi there"}],
  [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " What is JAX? "},
   {"role": "assistant", "content": "A library."}, {"role": "user", "content": "Thanks"}],
  [{"role": "user", "content": "call it"},
   {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": 1, "y": "é"}}]}],
]


def make_tokenizer() -> None:
  """A BPE tokenizer trained here, saved by PreTrainedTokenizerFast with the chat template
  in tokenizer_config.json; transformers' encodings and chat renderings as the reference."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import AutoTokenizer, PreTrainedTokenizerFast
  specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", tok.token_to_id("<s>"))])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>", chat_template=CHAT_TEMPLATE)
  folder = HERE / "tokenizer"
  if folder.exists():
    shutil.rmtree(folder)
  fast.save_pretrained(folder, save_jinja_files=False)
  hf = AutoTokenizer.from_pretrained(folder)
  cases = {"texts": [], "chats": []}
  for text in TEXTS:
    with_special = hf(text)["input_ids"]
    cases["texts"].append({"text": text, "ids": with_special,
                           "ids_no_special": hf(text, add_special_tokens=False)["input_ids"],
                           "decoded": hf.decode(with_special),
                           "decoded_skip": hf.decode(with_special, skip_special_tokens=True)})
  for conv in CONVERSATIONS:
    for gen in (False, True):
      cases["chats"].append({"messages": conv, "add_generation_prompt": gen,
                             "text": hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen),
                             "ids": list(hf.apply_chat_template(conv, tokenize=True, return_dict=True,
                                                                add_generation_prompt=gen)["input_ids"])})
  cases["vocab_size"] = len(hf)
  (HERE / "tokenizer_cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
  print("tokenizer", len(hf), "tokens")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", nargs="*")
  ap.add_argument("--no-peft", action="store_true")
  ap.add_argument("--no-tokenizer", action="store_true")
  args = ap.parse_args()
  cfgs = configs()
  meta = {"transformers": transformers.__version__, "torch": torch.__version__, "families": sorted(cfgs)}
  for seed, (name, cfg) in enumerate(cfgs.items()):
    if args.only and name not in args.only:
      continue
    make_family(name, cfg, seed)
  if not args.only or "llama_bf16" in args.only:
    make_bf16(configs()["llama"], 100)
  for seed, name in enumerate(cfgs):
    if not args.no_peft and (not args.only or f"peft_{name}" in args.only):
      make_peft(name, seed)
  if not args.no_tokenizer and (not args.only or "tokenizer" in args.only):
    make_tokenizer()
  (HERE / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
  main()
