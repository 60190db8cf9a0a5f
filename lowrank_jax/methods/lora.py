"""LoRA: low-rank adaptation, ``W = W0 + (alpha / r) A B``.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
rsLoRA (Kalajdzievski, arXiv 2312.03732) scales by ``alpha / sqrt(r)``.
PiSSA (Meng et al., arXiv 2404.02948) initialises ``A B`` from the principal singular
triplets of ``W0`` and keeps the residual as the frozen base; OLoRA (Büyükakyüz,
arXiv 2406.01775) from a QR decomposition.

Layout (Flax): ``W0`` is ``[in, out]``, ``a`` is ``[in, r]``, ``b`` is ``[r, out]``, so
``x @ W = x @ W0 + s (x @ a) @ b``. peft's ``lora_A.weight`` is ``a.T`` and
``lora_B.weight`` is ``b.T``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods import full
from lowrank_jax.methods._config import configured
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt, chain

__all__ = ["LoRAWeight", "lora", "lora_scale", "lora_method"]

Init = Literal["kaiming", "gaussian", "pissa", "olora", "zeros"]
MatmulMode = Literal["factored", "merged"]


@lazy.pytree_dataclass(static=("scale", "shape_", "dropout_rate", "matmul_mode"))
class LoRAWeight(lazy.BaseLazyWeight):
  """Lazy ``W0 + scale * a @ b``; ``base`` may itself be lazy (e.g. NF4-coded).

  ``matmul_mode="factored"``: ``x @ W`` is computed as ``x @ W0 + scale * (drop(x) @ a) @ b``;
  the dense update and the dense gradient of the frozen ``W0`` are never formed.
  ``"merged"`` (dense ``base``, no active dropout): ``x @ (W0 + s a b)`` forward and input
  gradient, ``a``/``b`` gradients in factored form (:func:`lowrank_jax.lazy.merged_lowrank_matmul`);
  the ``[in, out]`` update is formed transiently each pass, the dense ``dW0`` still never.
  """
  base: Any
  a: jax.Array
  b: jax.Array
  rng: Optional[jax.Array]
  scale: float
  shape_: tuple[int, ...]
  dropout_rate: float = 0.0
  matmul_mode: str = "factored"

  def delta(self) -> jax.Array:
    return (self.scale * (self.a @ self.b)).reshape(self.shape_)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    if self.matmul_mode == "merged" and not lazy.is_lazy(self.base) and (
        self.dropout_rate == 0.0 or self.rng is None):
      return lazy.merged_lowrank_matmul(x, self.base, self.a, self.b,
                                        jnp.asarray(self.scale, jnp.float32))
    return lazy.dot(x, self.base) + lazy.factored_matmul(
        x, self.a, self.b, self.scale, self.dropout_rate, self.rng)


def lora_scale(rank: int, alpha: Optional[float], rslora: bool = False) -> float:
  """``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA); ``alpha`` defaults to ``r``."""
  alpha = float(rank if alpha is None else alpha)
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def init_factors(key, w, view: MatrixView, rank: int, scale: float, init: str, dtype):
  """Returns ``(a, b, new_base_or_None)`` in the matrix view."""
  d_in, d_out = view.d_in, view.d_out
  if init == "kaiming":  # peft default: kaiming_uniform_(a=sqrt(5)) on [r, in] -> U(+-1/sqrt(in))
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(key, (d_in, rank), dtype, -bound, bound)
    return a, jnp.zeros((rank, d_out), dtype), None
  if init == "gaussian":  # peft: normal_(std=1/r)
    a = jax.random.normal(key, (d_in, rank), dtype) / rank
    return a, jnp.zeros((rank, d_out), dtype), None
  if init == "zeros":
    return jnp.zeros((d_in, rank), dtype), jnp.zeros((rank, d_out), dtype), None
  w32 = view.to_matrix(lazy.materialize(w)).astype(jnp.float32)
  if init == "pissa":
    u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
    root = jnp.sqrt(s[:rank] / scale)
    a = u[:, :rank] * root[None, :]
    b = root[:, None] * vt[:rank]
  elif init == "olora":
    q, r = jnp.linalg.qr(w32.T)  # torch layout [out, in]: B = Q[:, :r], A = R[:r]
    a = r[:rank].T
    b = q[:, :rank].T
  else:
    raise ValueError(f"unknown LoRA init {init!r}; expected kaiming, gaussian, pissa, olora or zeros")
  residual = w32 - scale * (a @ b)
  return a.astype(dtype), b.astype(dtype), view.from_matrix(residual).astype(w.dtype)


def lora_method(rank: int, alpha: Optional[float] = None, *, rslora: bool = False,
                init: Init = "kaiming", dropout: float = 0.0, dtype=jnp.float32,
                in_ndim: Any = None, matmul: MatmulMode = "factored") -> LeafMethod:
  """The per-leaf LoRA method (see :func:`lora`)."""
  if matmul not in ("factored", "merged"):
    raise ValueError(f"unknown LoRA matmul mode {matmul!r}; expected 'factored' or 'merged'")
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
  scale = lora_scale(rank, alpha, rslora)
  rewrites = init in ("pissa", "olora")

  def validate(path, view: MatrixView):
    if rank > min(view.d_in, view.d_out):
      raise ValueError(f"LoRA rank {rank} exceeds min(d_in, d_out) = {min(view.d_in, view.d_out)} "
                       f"for leaf '{path}' of shape {view.shape}")

  def init_leaf(key, path, w, view):
    a, b, new_base = init_factors(key, w, view, rank, scale, init, dtype)
    phi = {"a": a, "b": b}
    return (new_base, phi) if rewrites else phi

  def apply_leaf(w, phi, view, rng):
    return LoRAWeight(base=w, a=phi["a"], b=phi["b"], rng=rng if dropout > 0 else None,
                      scale=scale, shape_=view.shape, dropout_rate=dropout, matmul_mode=matmul)

  def unmerge_leaf(w, phi, view):
    delta = view.from_matrix(scale * (phi["a"] @ phi["b"]))
    return (w.astype(jnp.float32) - delta.astype(jnp.float32)).astype(w.dtype)

  return LeafMethod(name="LoRA", init_leaf=init_leaf, apply_leaf=apply_leaf,
                    unmerge_leaf=unmerge_leaf, rewrites_base=rewrites,
                    validate=validate, in_ndim=in_ndim)


@configured("lora")
def lora(where: tree_lib.Where, rank: int = 8, alpha: Optional[float] = None, *,
         rslora: bool = False, init: Init = "kaiming", dropout: float = 0.0,
         bias: Literal["none", "all", "lora_only"] = "none", dtype=jnp.float32,
         in_ndim: Any = None, matmul: MatmulMode = "factored") -> Reparam:
  """LoRA on the leaves ``where`` selects: ``W = W0 + s A B``, ``s = alpha/r``.

  Args:
    where: selection of the weights to adapt (regex, list, predicate or mask).
    rank: the rank ``r``; must not exceed ``min(d_in, d_out)`` of any selected leaf.
    alpha: scaling numerator; defaults to ``r`` (``s = 1``).
    rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
    init: ``"kaiming"`` (peft default: ``A ~ U(+-1/sqrt(in))``, ``B = 0``),
      ``"gaussian"`` (``A ~ N(0, 1/r^2)``), ``"pissa"`` or ``"olora"`` (both rewrite
      the base to the residual; use :func:`lowrank_jax.initialize`).
    dropout: dropout rate on the adapter input (active when ``apply`` gets ``rng``
      and the weight is used through :func:`lowrank_jax.dot`).
    bias: ``"none"``; ``"all"`` trains every ``bias`` leaf; ``"lora_only"`` trains the
      biases of the adapted layers.
    dtype: dtype of the adapter factors (float32 by default, as peft keeps them).
    in_ndim: for N-d weights, the number of leading input axes (or ``path -> int``).
    matmul: how our models multiply the lazy weight. ``"factored"`` (default):
      ``x W0 + s (x A) B``, nothing of size ``[in, out]`` formed. ``"merged"``:
      ``x (W0 + s A B)`` forward and input gradient with factored ``A``/``B`` gradients
      (one GEMM instead of a GEMM and two skinny matmuls; faster MiniLM steps on XLA:CPU,
      ``bench.lora_step`` in bench/README.md); it forms the ``[in, out]`` update transiently, so for
      large weights and few rows ``"factored"`` is cheaper. Quantized bases and active
      dropout always use the factored form. Same values and gradients (tested).

  Returns:
    A :class:`Reparam`; with a bias mode, a :func:`chain` of LoRA and the bias training.
  """
  r = adapt(lora_method(rank, alpha, rslora=rslora, init=init, dropout=dropout,
                        dtype=dtype, in_ndim=in_ndim, matmul=matmul), where)
  if bias == "none":
    return r
  if bias == "all":
    return chain(r, full.full(r"(^|/)bias$"))
  if bias == "lora_only":
    return chain(r, full.full(tree_lib.Siblings(where, "bias")))
  raise ValueError(f"unknown LoRA bias mode {bias!r}; expected none, all or lora_only")
