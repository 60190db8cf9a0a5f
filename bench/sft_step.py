"""LoRA SFT step of the code-LM decoder: ours vs transformers + peft, and QLoRA vs bfloat16
LoRA, in one interleaved run.

    python -m bench.sft_step [--model outputs/code_lm/base | random] [--batch 8] [--seq 256]
        [--rank 8] [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
        [--steps 8] [--threads N] [--no-torch]

The model is the Llama-family decoder of :mod:`experiments.code_lm` (its Hugging Face
folder ``outputs/code_lm/base`` when it exists, else a random model of the same shape,
``configs/code_lm/pretrain.json``'s ``model.random``, written to a temporary folder), so both
sides load the *same* folder: transformers' ``LlamaForCausalLM`` and ours
(:func:`lowrank_jax.models.load_pretrained`). One step: next-token cross-entropy (mean over
the ``B x (T - 1)`` shifted positions) of random token ids, no padding, LoRA r=``--rank``
alpha=2r on the ``--targets`` projections of every layer (peft ``target_modules`` / our
``where``), no dropout, AdamW (lr 1e-4, weight decay 0.01, eps 1e-8: torch's defaults)
over the adapters only. Rows:

* ours LoRA fp32 (float32 base, factored lazy matmul) and peft LoRA fp32 (the like-for-like pair);
* ours LoRA bf16: the whole base in bfloat16 (adapters float32, as peft keeps them);
* ours QLoRA: the same bfloat16 base with the target kernels stored NF4 with double
  quantization (block 64) and decoded to bfloat16 inside the matmul (Dettmers et al. 2023).

Each figure is the median of ``--steps`` timed rounds after 2 warm-up rounds; a round calls
every variant once in turn (``bench.interleaved_medians``), so a slow spell of the shared
machine falls on all of them alike. The first-step losses of ours and peft's fp32 step are
printed side by side (same weights, same batch: they agree to float rounding). Beside the
times: each step's FLOPs from XLA's cost analysis of the lowered step and the GFLOP/s they
imply. (The matmul
floor of ``bench.gemm_floor`` is written for MiniLM's shapes only, so no floor here.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
from typing import Callable, Optional

import numpy as np

from bench import interleaved_medians

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "outputs" / "code_lm" / "base"
PRETRAIN_CONFIG = ROOT / "configs" / "code_lm" / "pretrain.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OURS_FP32, PEFT_FP32, OURS_BF16, OURS_QLORA = ("ours LoRA fp32", "peft LoRA fp32", "ours LoRA bf16",
                                               "ours QLoRA (NF4+DQ, bf16 compute)")
LR, WEIGHT_DECAY, EPS = 1e-4, 0.01, 1e-8


def processor() -> str:
  """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or "unknown"


def random_folder(folder: pathlib.Path, tiny: bool = False) -> str:
  """Writes a random decoder of the code LM's shape (``tiny``: ``DecoderConfig.tiny()`` with
  one layer) as a Hugging Face folder; returns its path."""
  import jax

  from lowrank_jax.models import decoder, hf_decoder

  if tiny:
    config = decoder.DecoderConfig.tiny(num_layers=1)
  else:
    config = decoder.DecoderConfig(**json.loads(PRETRAIN_CONFIG.read_text())["model"]["random"])
  hf_decoder.save_pretrained(folder, config, decoder.init_decoder(jax.random.key(0), config))
  return str(folder)


def _where(targets) -> str:
  return r"^layers/layer_\d+/(attention|mlp)/(" + "|".join(targets) + r")/kernel$"


def jax_runners(folder: str, ids: np.ndarray, rank: int, targets) -> tuple[dict, dict]:
  """``({name: (one blocking step, trainable params, first loss)}, {name: flops()})`` for
  our three variants."""
  import jax
  import jax.numpy as jnp
  import optax

  import lowrank_jax as lj
  from lowrank_jax import train
  from lowrank_jax.models import decoder, hf_decoder

  x = jnp.asarray(ids)
  batch = {"input_ids": x}
  opt = optax.adamw(LR, eps=EPS, weight_decay=WEIGHT_DECAY)
  where = _where(targets)

  config, fp32 = hf_decoder.load_pretrained(folder, dtype=jnp.float32)
  _, bf16 = hf_decoder.load_pretrained(folder, dtype=jnp.bfloat16)
  nf4 = lj.quantize(bf16, where, codec="nf4", block_size=64, double_quant=True, compute_dtype=jnp.bfloat16)

  def loss_fn(theta, b, rng):
    logits = decoder.decoder_forward(theta, config, b["input_ids"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b["input_ids"][:, 1:]).mean()
    return loss, {"loss": loss}

  out, flops = {}, {}
  for name, theta0 in ((OURS_FP32, fp32), (OURS_BF16, bf16), (OURS_QLORA, nf4)):
    reparam = lj.lora(where, rank=rank, alpha=2 * rank)
    phi = reparam.init(jax.random.key(1), theta0)
    state = opt.init(phi)
    step = train.make_train_step(reparam, opt, loss_fn)
    key = jax.random.key(2)
    holder = [phi, state, None]

    def run(step=step, holder=holder, theta0=theta0, key=key):
      p, s, m = step(holder[0], holder[1], theta0, batch, key)
      jax.block_until_ready(m)
      if holder[2] is None:
        holder[2] = float(m["loss"])
      holder[0], holder[1] = p, s

    def cost(step=step, holder=holder, theta0=theta0, key=key):
      c = step.lower(holder[0], holder[1], theta0, batch, key).cost_analysis()  # of the lowered HLO, no compile
      return float((c[0] if isinstance(c, list) else c)["flops"])

    out[name] = (run, lj.count_params(phi), holder)
    flops[name] = cost
  return out, flops


def torch_runners(folder: str, ids: np.ndarray, rank: int, targets, threads: int) -> dict:
  """``{name: (one step, trainable params, holder of the first loss)}`` for peft's LoRA on
  transformers' model of the same folder (float32)."""
  import peft
  import torch
  import transformers

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                     target_modules=list(targets), bias="none"))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)
  x = torch.tensor(ids.astype(np.int64))
  holder = [None]

  def run():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    if holder[0] is None:
      holder[0] = float(loss.detach())

  return {PEFT_FP32: (run, sum(p.numel() for p in params), holder)}


def _ratio(rows: dict, a: str, b: str) -> Optional[str]:
  if a in rows and b in rows:
    return f"{a} / {b}: {rows[a][0] / rows[b][0]:.2f}"
  return None


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=None,
                 help=f"Hugging Face folder, or 'random' (default: {DEFAULT_MODEL} if it exists, else random)")
  p.add_argument("--tiny", action="store_true", help="with a random model: DecoderConfig.tiny(num_layers=1) (smoke test)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated projection names")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--no-torch", action="store_true")
  a = p.parse_args(argv)
  targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
  bad = sorted(set(targets) - set(TARGETS))
  if bad:
    p.error(f"--targets: unknown projection(s) {bad}; choose from {', '.join(TARGETS)}")
  with tempfile.TemporaryDirectory() as tmp:
    model = a.model or (str(DEFAULT_MODEL) if DEFAULT_MODEL.exists() and not a.tiny else "random")
    folder = random_folder(pathlib.Path(tmp) / "model", a.tiny) if model == "random" else model
    with open(os.path.join(folder, "config.json")) as f:
      vocab = json.load(f)["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, (a.batch, a.seq)).astype(np.int32)
    runners, flops = jax_runners(folder, ids, a.rank, targets)
    if not a.no_torch:
      try:
        runners.update(torch_runners(folder, ids, a.rank, targets, a.threads))
      except ImportError as e:
        print(f"(torch/transformers/peft not installed: {e}; the peft row is skipped)")
    order = [n for n in (OURS_FP32, PEFT_FP32, OURS_BF16, OURS_QLORA) if n in runners]
    timed = interleaved_medians({n: runners[n][0] for n in order}, a.steps, a.warmup)
    step_flops = {n: f() for n, f in flops.items()}
  rows = {n: (timed[n][1], runners[n][1], timed[n][0]) for n in order}
  print(f"\nLoRA SFT step of the code-LM decoder ({'random weights' if model == 'random' else model}), "
        f"B={a.batch} T={a.seq}, LoRA r={a.rank} alpha={2 * a.rank} on {','.join(targets)}, AdamW; "
        f"median of {a.steps} interleaved rounds after {a.warmup} warm-up; {a.threads} threads; "
        f"processor: {processor()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
  print("| variant | trainable params | step (s) | vs ours LoRA fp32 | GFLOP (XLA) | GFLOP/s | first call (s) |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  base = rows[OURS_FP32][0]
  for n in order:
    t, count, first = rows[n]
    f = step_flops.get(n)
    gf = "-" if f is None else f"{f / 1e9:.1f}"
    rate = "-" if f is None else f"{f / t / 1e9:.0f}"
    print(f"| {n} | {count:,} | {t:.3f} | {t / base:.2f} | {gf} | {rate} | {first:.2f} |")
  print()
  for line in (_ratio(rows, OURS_FP32, PEFT_FP32), _ratio(rows, OURS_QLORA, OURS_BF16),
               _ratio(rows, OURS_BF16, OURS_FP32)):
    if line:
      print(line)
  losses = {n: runners[n][2][-1] for n in order}
  if PEFT_FP32 in losses:
    print(f"first-step loss: ours fp32 {losses[OURS_FP32]:.6f}, peft fp32 {losses[PEFT_FP32]:.6f} "
          f"(|difference| {abs(losses[OURS_FP32] - losses[PEFT_FP32]):.1e})")
  return {"rows": {n: {"step_s": rows[n][0], "trainable_params": rows[n][1], "first_call_s": rows[n][2],
                       "flops": step_flops.get(n), "first_loss": losses[n]} for n in order},
          "processor": processor()}


if __name__ == "__main__":
  main()
