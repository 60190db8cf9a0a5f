"""LoRA+: a larger learning rate for the B factors than for the A factors.

Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv 2402.12354: with ``ΔW = s A B`` (our layout: ``a [in, r]``, ``b [r, out]``;
peft's ``lora_A``/``lora_B``), set ``lr_B = λ lr_A`` with ``λ ≫ 1`` (the paper
suggests ``λ = 2^4``). Built from the core path selection and
``optax.multi_transform``::

    tx = loraplus(optax.adamw, 2e-4, ratio=16, weight_decay=0.01)
    opt_state = tx.init(phi)                  # phi from lj.lora(...).init

peft's ``create_loraplus_optimizer`` also puts 1-d parameters (biases) into the
``lr * ratio`` group; here the B group is ``where_b`` (default: the LoRA ``b``
factors), so pass ``where_b=[r"(^|/)b$", r"(^|/)bias"]`` to do the same.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from lowrank_jax import tree as tree_lib

__all__ = ["loraplus", "loraplus_labels"]


def loraplus_labels(params, where_b: tree_lib.Where = r"(^|/)b$"):
  """Label tree for ``optax.multi_transform``: ``"B"`` on ``where_b`` leaves, ``"A"`` elsewhere.

  Raises a ``ValueError`` listing the available paths when ``where_b`` selects nothing
  (except on a one-leaf tree: :func:`lowrank_jax.optim.leafwise` / ``offload`` label
  one leaf at a time).
  """
  single = len(tree_lib.flatten_with_paths(params)) == 1
  mask = tree_lib.select(params, where_b, allow_empty=single)
  return jax.tree.map(lambda m: "B" if m else "A", mask)


def loraplus(optimizer: Callable[..., optax.GradientTransformation],
             learning_rate: optax.ScalarOrSchedule, ratio: float = 16.0, *,
             where_b: tree_lib.Where = r"(^|/)b$", **optimizer_kwargs: Any
             ) -> optax.GradientTransformation:
  """``optimizer(learning_rate)`` on A factors (and other leaves), ``optimizer(ratio *
  learning_rate)`` on B factors.

  Args:
    optimizer: an optax optimizer constructor taking the learning rate first
      (``optax.adamw``, ``lowrank_jax.optim.adamw_8bit``, ...).
    learning_rate: base (A) learning rate, a float or a schedule.
    ratio: ``λ = lr_B / lr_A``.
    where_b: selection of the leaves that get ``λ lr`` (regex, list, predicate, mask).
    **optimizer_kwargs: passed to both optimizers.

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.multi_transform``).
  """
  if ratio <= 0:
    raise ValueError(f"LoRA+ ratio must be positive, got {ratio}")
  lr_b = (lambda count: ratio * learning_rate(count)) if callable(learning_rate) \
      else ratio * learning_rate
  return optax.multi_transform(
      {"A": optimizer(learning_rate, **optimizer_kwargs), "B": optimizer(lr_b, **optimizer_kwargs)},
      lambda params: loraplus_labels(params, where_b))
