"""Collective operations per training step, read from the compiled HLO.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.collectives [--layers 2]

A Llama-style decoder (``models.llama``, random weights, bfloat16 or float32 base),
LoRA (r=8) on every attention and MLP kernel, AdamW, one jitted step (forward,
backward, update) on 8 devices, for each base and layout:

* bases: ``dense`` (the kernels in the base dtype) and ``nf4`` (the same kernels in
  NF4 + double quantization, :func:`lowrank_jax.quant.quantize`);
* layouts: ``fsdp`` (mesh ``fsdp:8``, the batch and every kernel split over ``fsdp``,
  :func:`lowrank_jax.sharding.decoder_sharding_rules` with ``tensor=None``, each kernel
  gathered inside its matmul: :func:`lowrank_jax.sharding.gather_at_use`, which for
  ``nf4`` gathers the 4-bit codes; the small embedding replicated, so that activations
  stay split over the batch) and ``tensor`` (mesh ``data:2,tensor:4``: Megatron
  column/row rules, batch over ``data``).

The step is compiled, not run: :func:`parse_collectives` reads ``all-gather``,
``all-reduce``, ``reduce-scatter``, ``all-to-all`` and ``collective-permute`` (and
their ``-start`` forms) from ``compiled.as_text()`` with their result shapes.
Each op is counted once as written (an op inside a loop body counts once); bytes are
each op's result per device (the gathered buffer of an all-gather). The table's
ratio column is the all-gather bytes of each base over the dense base's in the same
layout (the goal for NF4 under FSDP: at most 0.3x of a bfloat16 base). XLA:CPU
all-gathers bfloat16 arrays as float32, so with a bfloat16 base on CPU a last column
recounts float gathers at 2 bytes an element (what GPU and TPU move). Measured
figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections import defaultdict
from typing import Optional

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
             "s4": 0.5, "u4": 0.5}
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<result>.+?)\s+"
                   r"(?P<op>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op of the HLO: its kind, the dtype of its (first) result and the
  bytes it moves per device."""
  kind: str
  dtype: str
  nbytes: float


def _arrays(text: str) -> list[tuple[str, float]]:
  """``(dtype, bytes)`` of every array shape written in ``text``."""
  out = []
  for dtype, dims in _SHAPE.findall(text):
    size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out.append((dtype, size * _ITEMSIZE.get(dtype, 1 if dtype.startswith("f8") else 4)))
  return out


def parse_collectives(hlo_text: str) -> list[Collective]:
  """The collectives of an HLO module's text (``compiled.as_text()``), in order.

  ``-done`` halves of asynchronous pairs are skipped (the ``-start`` is counted).
  Bytes: the op's result per device (an all-gather's gathered buffer, a
  reduce-scatter's scattered part, an all-reduce's reduced buffer), summed over a
  tuple result. The result tuple of an ``all-gather-start`` / ``collective-permute-start``
  holds its operands first (and ``u32[]`` contexts last): only its second half counts.
  """
  ops = []
  for line in hlo_text.splitlines():
    m = _LINE.match(line)
    if m is None:
      continue
    kind, arrays = m["op"], _arrays(m["result"])
    if m["start"] and kind in ("all-gather", "collective-permute"):
      while arrays and arrays[-1][0] == "u32" and arrays[-1][1] == 4:
        arrays = arrays[:-1]
      arrays = arrays[len(arrays) // 2:]
    ops.append(Collective(kind, arrays[0][0] if arrays else "?", sum(b for _, b in arrays)))
  return ops


def summarize(ops: list[Collective]) -> dict[str, dict]:
  """``{kind: {"count", "bytes", "bytes_by_dtype"}}`` over ``ops`` (every kind present)."""
  out = {k: {"count": 0, "bytes": 0.0, "bytes_by_dtype": defaultdict(float)} for k in KINDS}
  for op in ops:
    s = out[op.kind]
    s["count"] += 1
    s["bytes"] += op.nbytes
    s["bytes_by_dtype"][op.dtype] += op.nbytes
  for s in out.values():
    s["bytes_by_dtype"] = dict(s["bytes_by_dtype"])
  return out


# ------------------------------------------------------------------------- the bench

def _setup(base: str, layout: str, *, layers: int, hidden: int, ffn: int, heads: int, vocab: int,
           batch: int, seq: int, rank: int, dtype):
  """Placed ``(step, args)`` of one configuration."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  import lowrank_jax as lj
  from lowrank_jax import sharding, train
  from lowrank_jax.models.llama import LlamaConfig, init_llama, llama_forward

  config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                       num_layers=layers, num_heads=heads, max_seq_len=seq)
  kernels = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
  theta0 = init_llama(jax.random.key(0), config, dtype)
  if base == "nf4":
    theta0 = lj.quantize(theta0, kernels, codec="nf4")
  elif base != "dense":
    raise ValueError(f"unknown base {base!r}")
  reparam = lj.lora(kernels, rank=rank)
  phi = reparam.init(jax.random.key(1), theta0)
  if layout == "fsdp":  # the embedding replicated: a vocab- or hidden-split table would split
    # the activations along something else than the batch
    mesh, batch_spec = sharding.make_mesh("fsdp:8"), P("fsdp")
    rules = [(r"embedding$", P())] + sharding.decoder_sharding_rules(tensor=None)
  elif layout == "tensor":
    mesh = sharding.make_mesh("data:2,tensor:4")
    rules, batch_spec = sharding.decoder_sharding_rules(fsdp=None), P("data")
  else:
    raise ValueError(f"unknown layout {layout!r}")
  specs = sharding.partition_specs(theta0, rules, mesh)
  t0 = sharding.shard(theta0, specs, mesh)
  if layout == "fsdp":  # every kernel gathered inside its matmul (the codes, for nf4)
    t0 = sharding.gather_at_use(t0, specs, mesh)
  pspecs = sharding.phi_specs(phi, theta0, specs)
  sphi = sharding.shard(phi, pspecs, mesh)
  opt = optax.adamw(1e-3)
  state = sharding.like(opt.init(sphi), sphi, pspecs, mesh)
  tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, vocab)
  tokens = sharding.shard({"t": tokens}, {"t": batch_spec}, mesh)["t"]

  def loss(theta, tokens, rng):
    del rng
    logits = llama_forward(theta, config, tokens)
    return train.softmax_cross_entropy(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])

  step = sharding.jit_train_step(train.make_train_step(reparam, opt, loss, jit=False), donate=False)
  return step, (sphi, state, t0, tokens, None)


def measure(base: str, layout: str, **kw) -> dict:
  """The collective summary of one configuration's compiled step."""
  step, args = _setup(base, layout, **kw)
  return summarize(parse_collectives(step.lower(*args).compile().as_text()))


def _fmt_bytes(b: float) -> str:
  return f"{b / 2**20:.3f} MiB" if b >= 2**16 else f"{b / 2**10:.1f} KiB"


def _bf16_gathered(summary: dict) -> float:
  """All-gather bytes if the float arrays were gathered in bfloat16 (XLA:CPU gathers
  bfloat16 as float32; GPU and TPU do not)."""
  by = summary["all-gather"]["bytes_by_dtype"]
  return sum(b / 2 if d == "f32" else b for d, b in by.items())


def table(results: dict, dense_key: dict, half_floats: bool = False) -> str:
  """A markdown table of ``{(base, layout): summary}``; ``half_floats`` adds the gather
  ratio with float gathers counted at 2 bytes an element (a bfloat16 base on GPU/TPU)."""
  head = ["base", "layout", "all-gather (n, bytes)", "u8 gathered", "all-reduce", "reduce-scatter",
          "all-to-all", "collective-permute", "gather bytes / dense"]
  if half_floats:
    head.append("same, bf16 gathered as bf16")
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (base, layout), s in results.items():
    ag = s["all-gather"]
    ref = results.get((dense_key[layout], layout))
    ratio = ag["bytes"] / ref["all-gather"]["bytes"] if ref and ref["all-gather"]["bytes"] else float("nan")
    cells = [base, layout, f"{ag['count']}, {_fmt_bytes(ag['bytes'])}",
             _fmt_bytes(ag["bytes_by_dtype"].get("u8", 0.0))]
    cells += [f"{s[k]['count']}, {_fmt_bytes(s[k]['bytes'])}" for k in KINDS[1:]]
    cells.append(f"{ratio:.3f}")
    if half_floats:
      den = _bf16_gathered(ref) if ref else 0.0
      cells.append(f"{_bf16_gathered(s) / den:.3f}" if den else "nan")
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--ffn", type=int, default=512)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  args = parser.parse_args(argv)
  import jax
  import jax.numpy as jnp
  if len(jax.devices()) < 8:
    raise SystemExit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  kw = dict(layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads, vocab=args.vocab,
            batch=args.batch, seq=args.seq, rank=args.rank, dtype=jnp.dtype(args.dtype))
  results = {}
  for layout in ("fsdp", "tensor"):
    for base in ("dense", "nf4"):
      results[(base, layout)] = measure(base, layout, **kw)
  print(f"{args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, "
        f"{args.dtype} base, LoRA r={args.rank}, batch {args.batch}x{args.seq}, 8 devices")
  half = args.dtype == "bfloat16" and jax.devices()[0].platform == "cpu"
  print(table(results, {"fsdp": "dense", "tensor": "dense"}, half_floats=half))
  if half:
    print("XLA:CPU all-gathers bfloat16 arrays as float32; the last column counts float "
          "gathers at 2 bytes an element, as a bfloat16 base is gathered on GPU and TPU.")


if __name__ == "__main__":
  main()
