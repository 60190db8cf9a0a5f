"""The tasks a run can train: what the model is, what the data rows are, the loss and the
evaluation. Each task turns a :class:`~lowrank_jax.trainer.config.RunConfig` into a
:class:`Problem`; the loop only sees rows, a loss and an evaluation function.

* ``classification``: the standard-library docstring task on BERT (all-MiniLM-L6-v2 by
  default): a linear head on the pooled encoder output, trained in full beside the method;
  cross-entropy; accuracy and loss on validation (every epoch) and test (at the end).
* ``sft``: causal-LM supervised fine-tuning of a decoder on JSONL
  (:mod:`lowrank_jax.data.sft`): packed rows, next-token cross-entropy on the response
  tokens only, attention confined to each packed example; eval loss and perplexity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import train, validate
from lowrank_jax.data import chat as chat_data, docstrings, sft as sft_data, tokenization
from lowrank_jax.interop import peft
from lowrank_jax.methods.full import full
from lowrank_jax.models import bert, decoder, hf_decoder
from lowrank_jax.reparam import Reparam
from lowrank_jax.trainer import base as base_lib
from lowrank_jax.trainer.config import RunConfig
from lowrank_jax.trainer.placement import LoadReport, Placement, load_bert, load_decoder

__all__ = ["Problem", "build_problem", "classifier_fns", "evaluate_classifier", "sft_loss",
           "TASKS"]

PyTree = Any
HEAD = r"^head/"
BERT_KERNELS = r"^bert/encoder/.*/kernel$"
DECODER_KERNELS = r"^layers/.*/kernel$"


@dataclasses.dataclass(frozen=True)
class Problem:
  """What a task gives the loop.

  Attributes:
    theta0: the frozen base (+ the task's own fresh parameters, e.g. a classifier head).
    base: ``{"path", "sha256"}`` of the pretrained base (:mod:`lowrank_jax.trainer.base`).
    head: the task's own trainable part (chained after the methods), or ``None``.
    quantize_where: the leaves ``quantize`` stores by a codec unless the config says.
    train_rows: the training rows (equal-length numpy arrays); a batch is a subset of rows.
    loss_fn: ``(theta, batch, rng) -> (loss, metrics)``.
    evaluate: ``(theta, split) -> {metric: float}`` on a whole split.
    epoch_split, final_split: ``(split, key prefix)`` evaluated after every epoch / at the
      end (``None``: no evaluation).
    tokens: the number of real tokens of a batch (for tokens/s).
    info: JSON facts for the results (labels, data fingerprint, sizes).
    path_to_module: our leaf path -> the peft module name (PEFT export).
    save_merged: ``(folder, merged_params, dtype, fetch=None, max_shard_size=None)`` writes a
      Hugging Face folder (``fetch(path)``: each leaf, one at a time; ``folder=None``: fetch
      only), or ``None``.
    placement: where the run's arrays live (the config's mesh and the model family's rules);
      ``theta0`` is already placed when it was read slice by slice (``load_report``).
    load_report: how much of the base's files this process read, or ``None`` (not a folder
      read by slices).
  """
  theta0: PyTree
  base: dict
  head: Optional[Reparam]
  quantize_where: str
  train_rows: Mapping[str, np.ndarray]
  loss_fn: Callable
  evaluate: Callable[[PyTree, str], dict]
  epoch_split: Optional[tuple[str, str]]
  final_split: Optional[tuple[str, str]]
  tokens: Callable[[Mapping[str, np.ndarray]], int]
  info: dict
  path_to_module: Callable[[str], str]
  save_merged: Optional[Callable[[str, PyTree, Any], None]] = None
  placement: Placement = Placement()
  load_report: Optional[LoadReport] = None


class Keys(NamedTuple):
  """The run's keys, all from ``training.seed``."""
  model: jax.Array   # a random base
  head: jax.Array    # the task's fresh parameters
  method: jax.Array  # the methods' init
  train: jax.Array   # dropout: fold_in(train, step)

  @classmethod
  def from_seed(cls, seed: int) -> "Keys":
    k = jax.random.key(seed)
    k_head, k_method, k_train = jax.random.split(k, 3)
    return cls(model=jax.random.fold_in(k, 0x6D6F64), head=k_head, method=k_method, train=k_train)


def _padded_batches(split: Mapping[str, np.ndarray], batch_size: int):
  """``(batch, n_real)``: the split in order, the last batch padded by repeating its last row,
  so a jitted function compiles once."""
  for b in train.batches(split, batch_size, drop_last=False):
    m = len(next(iter(b.values())))
    yield {k: np.concatenate([v, np.repeat(v[-1:], batch_size - m, 0)]) for k, v in b.items()}, m


def _base(m, keys: "Keys", init: Callable, load: Callable, folder: Optional[str]):
  """``(model config, params, {"path", "sha256"}, LoadReport or None)`` of ``model``: randomly
  initialised from ``model.random`` with ``keys.model`` (no report), or loaded from
  ``folder`` by ``load(folder) -> (config, params, LoadReport or None)``."""
  if m.random is not None:
    params = init(keys.model, m.random, jnp.dtype(m.dtype))
    return m.random, params, base_lib.tree_ref(f"random {type(m.random).__name__}({m.random})", params), None
  model_config, params, report = load(folder)
  return model_config, params, base_lib.folder_ref(folder), report


def _placed_loader(load: Callable, dtype, placement_of: Callable[[str], Placement]) -> Callable:
  """``folder -> (config, params, LoadReport or None)`` with ``load(folder, dtype, placement)``
  (:func:`~lowrank_jax.trainer.placement.load_bert` / ``load_decoder``): on a mesh each process
  reads only the slices of its devices, and the report says how much (``None`` without a mesh)."""
  def load_placed(folder):
    placement = placement_of(folder)
    model_config, params, report = load(folder, dtype, placement)
    return model_config, params, report if placement.sharded else None
  return load_placed


# ------------------------------------------------------------------------ classification


def classifier_fns(config: bert.BertConfig, pooling: str):
  """``(loss_fn(theta, batch, rng), logits_fn(theta, batch, rng=None))`` of a BERT classifier
  ``theta = {"bert": ..., "head": ...}``; dropout (the config's rates) is on when ``rng`` is given."""

  def logits_fn(theta, batch, rng=None):
    deterministic = rng is None or (config.hidden_dropout_prob == 0.0
                                    and config.attention_probs_dropout_prob == 0.0)
    h = bert.bert_forward(theta["bert"], config, batch["input_ids"], batch["attention_mask"],
                          deterministic=deterministic, rng=rng)
    return bert.classifier_logits(theta["head"], h, batch["attention_mask"], pooling)

  def loss_fn(theta, batch, rng):
    return train.softmax_cross_entropy(logits_fn(theta, batch, rng), batch["labels"])
  return loss_fn, logits_fn


def evaluate_classifier(logits_fn, split: Mapping[str, np.ndarray], batch_size: int) -> tuple[float, float]:
  """``(accuracy, mean cross-entropy)`` of ``logits_fn(batch)`` over a whole split (float64)."""
  correct, loss_sum, n = 0, 0.0, 0
  for b, m in _padded_batches(split, batch_size):
    logits = np.asarray(logits_fn(b), np.float64)[:m]
    labels = b["labels"][:m]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    correct += int((logits.argmax(-1) == labels).sum())
    loss_sum -= float(logp[np.arange(m), labels].sum())
    n += m
  return correct / n, loss_sum / n


def _bert_path_to_module(path: str) -> str:
  if not path.startswith("bert/"):
    raise KeyError(f"no peft module name for {path!r} (not a BERT weight)")
  return peft.bert_path_to_module(path[len("bert/"):])


def classification(config: RunConfig, keys: Keys) -> Problem:
  """The docstring task on BERT (see the module docstring)."""
  m, d = config.model, config.data
  dtype = jnp.dtype(m.dtype)
  placement = Placement.from_config(config.mesh, "bert")
  bcfg, params, base, load_report = _base(m, keys, bert.init_bert,
                                          _placed_loader(load_bert, dtype, lambda _: placement),
                                          m.path or (None if m.random is not None else bert.minilm_path()))
  if m.dropout is not None:
    bcfg = dataclasses.replace(bcfg, hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
  tok_path = m.tokenizer or m.path
  tokenizer = tokenization.load_tokenizer(tok_path)
  if tokenizer.get_vocab_size() > bcfg.vocab_size:
    raise ValueError(f"{config.name}: the tokenizer has {tokenizer.get_vocab_size()} tokens, the model's "
                     f"vocab_size is {bcfg.vocab_size}")
  if d.max_len > bcfg.max_position_embeddings:
    raise ValueError(f"{config.name}: data.max_len {d.max_len} exceeds the model's "
                     f"max_position_embeddings {bcfg.max_position_embeddings}")
  task = docstrings.load_docstring_task(
      max_len=d.max_len, packages=d.packages, fractions=d.fractions, min_chars=d.min_chars,
      min_words=d.min_words, max_per_class=d.max_per_class, tokenizer=tokenizer, salt=d.salt)
  theta0 = {"bert": params,
            "head": bert.init_classifier(keys.head, bcfg.hidden_size, task.num_classes, dtype)}
  loss_fn, logits_fn = classifier_fns(bcfg, m.pooling)
  logits_jit = jax.jit(logits_fn)
  eval_bs = config.training.eval_batch_size or config.training.batch_size

  def evaluate(theta, split):
    acc, loss = evaluate_classifier(
        lambda b: placement.to_host(logits_jit(theta, placement.whole_batch(b))), task[split], eval_bs)
    return {"accuracy": acc, "loss": loss}

  return Problem(
      theta0=theta0, base=base, head=full(HEAD), quantize_where=BERT_KERNELS,
      train_rows=task["train"], loss_fn=loss_fn, evaluate=evaluate,
      epoch_split=("validation", "val"), final_split=("test", "test"),
      tokens=lambda b: int(b["attention_mask"].sum()),
      info={"n_train": task.sizes()["train"], "sizes": task.sizes(), "labels": list(task.label_names),
            "data_fingerprint": task.fingerprint, "python": task.python_version},
      path_to_module=_bert_path_to_module, placement=placement,
      load_report=load_report)


# -------------------------------------------------------------------------------- SFT


def sft_loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(sum of masked token cross-entropies, number of loss tokens)`` of packed rows."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  w = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w)


FolderTokenizer = chat_data.load_tokenizer
"""A Hugging Face tokenizer folder (or ``tokenizer.json`` file) as a
:class:`lowrank_jax.data.sft.TextTokenizer`: :func:`lowrank_jax.data.chat.load_tokenizer`'s
:class:`~lowrank_jax.data.chat.ChatTokenizer` (kept under its old name)."""


def sft(config: RunConfig, keys: Keys) -> Problem:
  """Causal-LM SFT of a decoder on JSONL (see the module docstring)."""
  m, d = config.model, config.data
  dtype = jnp.dtype(m.dtype)
  placement_of = lambda folder: Placement.from_config(config.mesh, hf_decoder.read_config(folder).family)
  dcfg, params, base, load_report = _base(m, keys, decoder.init_decoder,
                                          _placed_loader(load_decoder, dtype, placement_of), m.path)
  placement = Placement.from_config(config.mesh, dcfg.family)
  if m.dropout is not None:
    dcfg = dataclasses.replace(dcfg, attention_dropout=m.dropout)
  tokenizer = FolderTokenizer(m.tokenizer or m.path)
  load = lambda path: sft_data.load_sft(path, tokenizer, d.seq_len, packing=d.pack, loss_on=d.loss_on,
                                        too_long=d.too_long)
  rows = {"train": load(d.train)}
  if d.eval is not None:
    rows["eval"] = load(d.eval)
  for split, r in rows.items():  # load_sft checked the ids against the tokenizer; these against the model
    validate.check_token_ids(r.arrays["input_ids"], dcfg.vocab_size,
                             what=f"{config.name}: data.{split} ({getattr(d, split)}) input_ids [row, token] "
                                  f"for the model's vocab_size")
  def logits_fn(theta, batch, rng=None):
    return decoder.decoder_forward(theta, dcfg, batch["input_ids"], segment_ids=batch["segment_ids"],
                                   positions=batch["positions"], rng=rng, remat=m.remat)

  def loss_fn(theta, batch, rng):
    total, count = sft_loss(logits_fn(theta, batch, rng), batch)
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"loss": loss, "tokens": count}

  @jax.jit
  def eval_sums(theta, batch):
    total, count = sft_loss(logits_fn(theta, batch), {**batch, "loss_mask": batch["loss_mask"] * batch["real"][:, None]})
    return total, count

  eval_bs = config.training.eval_batch_size or config.training.batch_size

  def evaluate(theta, split):
    total = count = 0.0
    for b, n in _padded_batches(rows[split].arrays, eval_bs):
      real = (np.arange(eval_bs) < n).astype(np.float32)
      t, c = eval_sums(theta, placement.whole_batch({**b, "real": real}))
      total, count = total + float(t), count + float(c)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}

  def save_merged(folder, merged, out_dtype, fetch=None, max_shard_size=None):  # trainer.export.write_merged
    hf_decoder.save_pretrained(folder, dcfg, merged, dtype=out_dtype, fetch=fetch, max_shard_size=max_shard_size)

  split = ("eval", "eval") if d.eval is not None else None
  info = {"n_train": rows["train"].rows,
          "sizes": {k: {"rows": r.rows, "examples": r.examples, "loss_tokens": r.loss_tokens,
                        "truncated": r.truncated, "dropped": r.dropped} for k, r in rows.items()},
          "data_fingerprint": rows["train"].fingerprint}
  return Problem(
      theta0=params, base=base, head=None, quantize_where=DECODER_KERNELS,
      train_rows=rows["train"].arrays, loss_fn=loss_fn, evaluate=evaluate,
      epoch_split=split, final_split=split,
      tokens=lambda b: int((b["segment_ids"] > 0).sum()), info=info,
      path_to_module=peft.decoder_path_to_module(dcfg),
      save_merged=save_merged, placement=placement, load_report=load_report)


TASKS: dict[str, Callable[[RunConfig, Keys], Problem]] = {"classification": classification, "sft": sft}


def build_problem(config: RunConfig, keys: Keys) -> Problem:
  """The task's :class:`Problem` for ``config``."""
  return TASKS[config.task](config, keys)
