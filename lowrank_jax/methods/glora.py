"""GLoRA: generalised LoRA with per-layer support tensors and an evolutionary search.

Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning",
arXiv 2306.07967 (code: Arnav0400/ViT-Slim ``GLoRA/``); peft's ``GloraConfig``.

One adapted linear layer ``y = x W + b`` (Flax layout, ``W0 [in, out]``) becomes::

    W = W0 + W0 ⊙ A + B,        b = b0 + b0 ⊙ D + E + C W0

(in torch layout ``C W0`` is ``W0 @ C``: the weights projected into the bias). Each
*support tensor* is chosen per layer among:

* ``A, B``: ``"lora"`` (``u @ d``, ``u [in, r]``, ``d [r, out]``), ``"vector"`` (``[out]``,
  one value per output unit), ``"constant"`` (a scalar) or ``"none"``;
* ``C``: ``"lora"`` (``(u @ d)[0]``, ``u [1, r]``, ``d [r, in]``), ``"vector"`` (``[in]``)
  or ``"none"``;
* ``D, E``: ``"vector"`` (``[out]``), ``"constant"`` or ``"none"``,

4·4·3·3·3 = 432 configurations per layer. Everything is zero-initialised except the
``u`` factors, so the adapted layer starts as the base.

Two ways to hold the parameters:

* fixed (``supernet=False``, peft's GLoRA): ``phi`` holds only the tensors the layer's
  :class:`LayerConfig` uses, with peft's init (``u`` kaiming-uniform, the rest 0);
* supernet (``supernet=True``, the paper): ``phi`` holds the full LoRA factors of ``A, B, C``
  and vectors ``D, E``; a configuration uses *shared weights*: ``vector`` is the first
  row of ``d`` (peft/paper: the first column of the down matrix ``Xd``), ``constant``
  its ``[0, 0]`` entry (``D[0]`` for D/E). :func:`glora_subnet` slices a supernet into
  the fixed layout of a configuration (gradients flow back into the supernet), and
  a configuration may also be *traced* integer choices (e.g. sampled each training
  step under ``jit``), which mixes the choices with one-hot weights.

:func:`glora_search` is the paper's evolutionary search over per-layer configurations
(random population, top-k selection, mutation, crossover, parameter limit) as a pure
function of a fitness callback.

peft names, same letter transposed: ``a_u = glora_A.Xu.T``, ``a_d = glora_A.Xd.T``,
``a = glora_A.X`` (vector ``[out, 1]`` -> ``[out]``, constant ``(1,)`` -> ``()``), likewise
``b, c, d, e``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import lazy, tree as tree_lib
from lowrank_jax.methods._config import configured
from lowrank_jax.reparam import LeafMethod, MatrixView, Reparam, adapt_with_bias

__all__ = ["LayerConfig", "CHOICES", "GLoRAWeight", "glora", "glora_subnet", "glora_layers",
           "glora_param_count", "glora_search", "SearchResult", "random_config"]

TENSORS = ("A", "B", "C", "D", "E")
CHOICES: dict[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "constant", "none"),
    "B": ("lora", "vector", "constant", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("vector", "constant", "none"),
    "E": ("vector", "constant", "none"),
}


class LayerConfig(NamedTuple):
  """The support-tensor choice of one layer (defaults: peft's GloraConfig).

  Each field is a choice name of :data:`CHOICES` or, in supernet mode, an integer
  index into it (possibly traced).
  """
  A: Any = "lora"
  B: Any = "lora"
  C: Any = "lora"
  D: Any = "constant"
  E: Any = "constant"


ConfigSpec = Union[LayerConfig, Mapping[str, LayerConfig], Callable[[str], LayerConfig]]


def _check_config(cfg: LayerConfig, path: str) -> LayerConfig:
  if not isinstance(cfg, LayerConfig):
    raise TypeError(f"GLoRA: config for '{path}' must be a LayerConfig, got {cfg!r}")
  for t, v in zip(TENSORS, cfg):
    if isinstance(v, str) and v not in CHOICES[t]:
      raise ValueError(f"GLoRA: config {t}={v!r} for '{path}' is not one of {CHOICES[t]}")
  return cfg


def _config_for(config: ConfigSpec, path: str) -> LayerConfig:
  if isinstance(config, LayerConfig):
    return _check_config(config, path)
  if isinstance(config, Mapping):
    if path not in config:
      raise KeyError(f"GLoRA: no config for adapted leaf '{path}' (configs given for {sorted(config)})")
    return _check_config(config[path], path)
  return _check_config(config(path), path)


# ---------------------------------------------------------------------------------------------
# Support tensors. Keys in a (fixed-layout) phi leaf, for tensor x in a..e:
#   lora: x_u, x_d;  vector: x (1-d);  constant: x (0-d);  none: absent;
#   mix (traced supernet choice): x_u, x_d (A-C) or x (D, E), plus x_w one-hot weights.
# ---------------------------------------------------------------------------------------------

def _kind(p: Mapping[str, Any], x: str) -> str:
  if x + "_w" in p:
    return "mix"
  if x + "_u" in p:
    return "lora"
  if x in p:
    return "vector" if jnp.ndim(p[x]) == 1 else "constant"
  return "none"


def _support(p: Mapping[str, Any], x: str):
  """The value of support tensor ``x``: ``[in, out]`` / ``[1, out]`` / scalar for A, B;
  ``[in]`` for C; ``[out]`` / scalar for D, E; ``None`` for none."""
  kind = _kind(p, x)
  if kind == "none":
    return None
  if kind == "lora":
    prod = p[x + "_u"] @ p[x + "_d"]
    return prod[0] if x == "c" else prod
  if kind == "vector":
    return p[x][None, :] if x in ("a", "b") else p[x]
  if kind == "constant":
    return p[x]
  w = p[x + "_w"]  # mix: the choices of CHOICES[X] weighted one-hot
  if x in ("a", "b"):
    u, d = p[x + "_u"], p[x + "_d"]
    return w[0] * (u @ d) + w[1] * d[0][None, :] + w[2] * d[0, 0]
  if x == "c":
    u, d = p[x + "_u"], p[x + "_d"]
    return w[0] * (u @ d)[0] + w[1] * d[0]
  return w[0] * p[x] + w[1] * p[x][0]  # D, E: vector, constant, none


def _sub(p: Mapping[str, Any], x: str) -> dict:
  return {k: v for k, v in p.items() if k == x or k.startswith(x + "_")}


@lazy.pytree_dataclass(static=("shape_",))
class GLoRAWeight(lazy.BaseLazyWeight):
  """Lazy ``W0 + W0 ⊙ A + B``; ``a`` and ``b`` are the phi entries of ``A`` and ``B``.

  ``x @ W = (x @ W0) ⊙ (1 + A) + x @ B`` without a dense weight when ``A`` is a
  vector, a constant or none (``x @ B``: factored for lora, ``sum(x) · B`` otherwise);
  a low-rank ``A`` (an element-wise product with ``W0``) is materialised.
  """
  base: Any
  a: dict
  b: dict
  shape_: tuple[int, ...]

  def materialize(self) -> jax.Array:
    w0 = lazy.materialize(self.base)
    w = w0.astype(jnp.float32)
    a, b = _support(self.a, "a"), _support(self.b, "b")
    if a is not None:
      w = w + w * a
    if b is not None:
      w = w + b
    return w.astype(w0.dtype)

  def matrix_matmul(self, x: jax.Array) -> jax.Array:
    ka, kb = _kind(self.a, "a"), _kind(self.b, "b")
    if ka in ("lora", "mix") or kb == "mix":
      return super().matrix_matmul(x)
    y = lazy.dot(x, self.base)
    a = _support(self.a, "a")
    if a is not None:
      y = y * (1.0 + a).astype(y.dtype)
    if kb == "lora":
      y = y + lazy.factored_matmul(x, self.b["b_u"], self.b["b_d"])
    elif kb != "none":
      y = y + (jnp.sum(x, axis=-1, keepdims=True) * _support(self.b, "b")).astype(y.dtype)
    return y


def _kaiming(key, fan_in: int, shape, dtype):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _xavier(key, fan_in: int, fan_out: int, shape, dtype):
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _init_fixed(key, cfg: LayerConfig, d_in: int, d_out: int, rank: int, dtype) -> dict:
  """peft's init (``init_weights=True``): ``u`` kaiming-uniform on torch ``Xu``, the rest 0."""
  keys = jax.random.split(key, 3)
  phi = {}
  for i, (x, kind) in enumerate(zip("abcde", cfg)):
    n_in, n_out = (d_in, d_out) if x in "ab" else (1, d_in) if x == "c" else (None, d_out)
    if kind == "lora":
      # torch Xu [r, n_in] (fan-in n_in); ours is its transpose [n_in, r].
      phi[x + "_u"] = _kaiming(keys[i], n_in, (n_in, rank), dtype)
      phi[x + "_d"] = jnp.zeros((rank, n_out), dtype)
    elif kind == "vector":
      phi[x] = jnp.zeros((d_out if x != "c" else d_in,), dtype)
    elif kind == "constant":
      phi[x] = jnp.zeros((), dtype)
  return phi


def _init_supernet(key, d_in: int, d_out: int, rank: int, dtype) -> dict:
  """The paper's supernet: ``u`` xavier-uniform on torch ``Xu``, ``d``, ``D``, ``E`` zero."""
  ka, kb, kc = jax.random.split(key, 3)
  return {"a_u": _xavier(ka, d_in, rank, (d_in, rank), dtype), "a_d": jnp.zeros((rank, d_out), dtype),
          "b_u": _xavier(kb, d_in, rank, (d_in, rank), dtype), "b_d": jnp.zeros((rank, d_out), dtype),
          "c_u": _xavier(kc, 1, rank, (1, rank), dtype), "c_d": jnp.zeros((rank, d_in), dtype),
          "d": jnp.zeros((d_out,), dtype), "e": jnp.zeros((d_out,), dtype)}


def _bias_apply(w0, b0, p, view):
  c, d, e = _support(p, "c"), _support(p, "d"), _support(p, "e")
  b = b0.astype(jnp.float32)
  out = b
  if d is not None:
    out = out + b * d
  if e is not None:
    out = out + e
  if c is not None:
    out = out + lazy.dot(c[None, :].astype(jnp.float32), w0)[0].astype(jnp.float32)
  return out.astype(b0.dtype)


def _bias_unmerge(w0, b, p, view):
  c, d, e = _support(p, "c"), _support(p, "d"), _support(p, "e")
  out = b.astype(jnp.float32)
  if e is not None:
    out = out - e
  if c is not None:
    out = out - c @ w0.astype(jnp.float32)
  if d is not None:
    out = out / (1.0 + d)
  return out.astype(b.dtype)


def _unmerge_leaf(w, p, view):
  a, b = _support(p, "a"), _support(p, "b")
  out = w.astype(jnp.float32)
  if b is not None:
    out = out - b
  if a is not None:
    out = out / (1.0 + a)
  return out.astype(w.dtype)


def _fixed_method(rank: int, config: ConfigSpec, dtype) -> LeafMethod:
  def init_leaf(key, path, w, view: MatrixView):
    return _init_fixed(key, _config_for(config, path), view.d_in, view.d_out, rank, dtype)

  def apply_leaf(w, p, view, rng):
    return GLoRAWeight(base=w, a=_sub(p, "a"), b=_sub(p, "b"), shape_=view.shape)

  return LeafMethod(name="GLoRA", init_leaf=init_leaf, apply_leaf=apply_leaf, unmerge_leaf=_unmerge_leaf)


def _needs_bias(config: ConfigSpec) -> Callable[[str], bool]:
  """Whether the layer at ``path`` trains bias terms (C, D or E)."""
  def needs(path: str) -> bool:
    cfg = _config_for(config, path)
    return not (cfg.C == "none" and cfg.D == "none" and cfg.E == "none")
  return needs


def glora_subnet(phi_super, theta0, where: tree_lib.Where, config: ConfigSpec):
  """Slices a supernet ``phi`` into the fixed layout of ``config`` (shared weights).

  ``vector`` is the first row of ``d`` (``Xd[:, 0]``), ``constant`` its ``[0, 0]`` entry
  (``D[0]`` for D/E). Integer (possibly traced) choices give a one-hot mixture.

  Returns:
    A ``phi`` for ``glora(where, rank, config=...)`` (fixed layout) that is a
    differentiable function of ``phi_super``.
  """
  mask = tree_lib.select(theta0, where)
  items = tree_lib.flatten_with_paths(theta0)
  treedef = jax.tree_util.tree_structure(theta0, is_leaf=lazy.is_lazy)
  supers = treedef.flatten_up_to(phi_super)
  out = []
  for (path, _), m, sp in zip(items, jax.tree_util.tree_leaves(mask), supers):
    if not m or sp is None:
      out.append(None)
      continue
    cfg = _config_for(config, path)
    leaf = {}
    for t, x, choice in zip(TENSORS, "abcde", cfg):
      if not isinstance(choice, str):  # traced or integer index: one-hot mixture
        w = jax.nn.one_hot(choice, len(CHOICES[t]), dtype=sp["d"].dtype)
        if x in "abc":
          leaf.update({x + "_u": sp[x + "_u"], x + "_d": sp[x + "_d"], x + "_w": w})
        else:
          leaf.update({x: sp[x], x + "_w": w})
      elif choice == "lora":
        leaf.update({x + "_u": sp[x + "_u"], x + "_d": sp[x + "_d"]})
      elif choice == "vector":
        leaf[x] = sp[x + "_d"][0] if x in "abc" else sp[x]
      elif choice == "constant":
        leaf[x] = sp[x + "_d"][0, 0] if x in "ab" else sp[x][0]
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


@configured("glora")
def glora(where: tree_lib.Where, rank: int = 8, *, config: ConfigSpec = LayerConfig(),
          supernet: bool = False, dtype=jnp.float32) -> Reparam:
  """GLoRA on the kernels ``where`` selects (their sibling ``bias`` leaves change too).

  Args:
    where: selection of the kernels (one per module; the module's ``bias`` is its
      sibling leaf).
    rank: ``r`` of the low-rank support tensors.
    config: a :class:`LayerConfig` for every layer, a mapping ``path -> LayerConfig``
      or a callable ``path -> LayerConfig``. In supernet mode the choices may be
      integer indices into :data:`CHOICES` (traced ones too, e.g. sampled per step).
    supernet: hold the paper's full supernet in ``phi`` and apply ``config`` by
      weight sharing (:func:`glora_subnet`); otherwise ``phi`` holds only the chosen
      tensors (peft's layout and init).
    dtype: dtype of the support tensors.

  Returns:
    A :class:`Reparam` producing :class:`GLoRAWeight` kernels and adapted biases; its
    ``unmerge`` inverts the merge (``W0 = (W - B) / (1 + A)``, ...).
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"GLoRA rank must be a positive int, got {rank!r}")
  if isinstance(config, LayerConfig):
    _check_config(config, "*")
  fixed = adapt_with_bias(_fixed_method(rank, config, dtype), where, _bias_apply,
                          bias_unmerge=_bias_unmerge,
                          requires_bias=False if supernet else _needs_bias(config))
  if not supernet:
    return fixed

  def init_leaf(key, path, w, view):
    return _init_supernet(key, view.d_in, view.d_out, rank, dtype)

  sup = adapt_with_bias(LeafMethod(name="GLoRA", init_leaf=init_leaf, apply_leaf=None), where,
                        _bias_apply, requires_bias=True)

  def apply(theta0, phi, rng=None):
    return fixed.apply(theta0, glora_subnet(phi, theta0, where, config), rng)

  def unmerge(theta, phi):
    return fixed.unmerge(theta, glora_subnet(phi, theta, where, config))

  return Reparam(init=sup.init, apply=apply, init_with_base=sup.init_with_base, unmerge=unmerge)


# ---------------------------------------------------------------------------------------------
# Evolutionary search
# ---------------------------------------------------------------------------------------------

def glora_layers(theta0, where: tree_lib.Where) -> list[tuple[str, int, int]]:
  """``[(path, d_in, d_out), ...]`` of the kernels ``where`` selects, in tree order."""
  mask = tree_lib.select(theta0, where)
  return [(p, int(w.shape[0]), int(math.prod(w.shape[1:])))
          for (p, w), m in zip(tree_lib.flatten_with_paths(theta0), jax.tree_util.tree_leaves(mask)) if m]


def glora_param_count(cfg: LayerConfig, d_in: int, d_out: int, rank: int) -> int:
  """Trainable parameters of one layer's configuration (as the paper's search counts them)."""
  n = 0
  for t, kind in zip(TENSORS, cfg):
    if t in "AB":
      n += {"lora": rank * (d_in + d_out), "vector": d_out, "constant": 1, "none": 0}[kind]
    elif t == "C":
      n += {"lora": rank * (d_in + 1), "vector": d_in, "none": 0}[kind]
    else:
      n += {"vector": d_out, "constant": 1, "none": 0}[kind]
  return n


def random_config(rng: np.random.Generator) -> LayerConfig:
  """A uniformly random :class:`LayerConfig` (choice names)."""
  return LayerConfig(*(CHOICES[t][rng.integers(len(CHOICES[t]))] for t in TENSORS))


class SearchResult(NamedTuple):
  """Outcome of :func:`glora_search`.

  Attributes:
    best: the best candidate (a tuple of per-layer :class:`LayerConfig`).
    best_fitness: its fitness.
    top: the final top-k ``[(candidate, fitness), ...]``, best first.
    history: the best fitness after each epoch.
    evaluated: the number of fitness evaluations (each candidate at most once).
  """
  best: tuple
  best_fitness: float
  top: list
  history: list
  evaluated: int


def glora_search(key: jax.Array, layers: Sequence[tuple[int, int]],
                 fitness: Callable[[tuple], float], *, rank: int = 4, population: int = 50,
                 select: int = 10, mutation: int = 25, crossover: int = 25, m_prob: float = 0.2,
                 epochs: int = 20, param_limit: Optional[float] = None,
                 min_param_limit: float = 0.0) -> SearchResult:
  """The paper's evolutionary search for per-layer GLoRA configurations.

  A candidate is a tuple of one :class:`LayerConfig` per layer. The initial population
  is random; each epoch keeps the ``select`` fittest candidates seen so far, then
  builds ``mutation`` candidates (each choice of a top-k parent resampled with
  probability ``m_prob``) and ``crossover`` candidates (each choice taken from one of
  two top-k parents), at most ``10×`` tries each, and refills the population with
  random candidates. A candidate is legal if its parameter count lies in
  ``[min_param_limit, param_limit]`` and it was not evaluated before; the fitness of
  each legal candidate is computed once. (After the last epoch the new candidates
  are ranked too, which the reference code omits.)

  Args:
    key: PRNG key (seeds a NumPy generator: the search is deterministic given ``key``).
    layers: ``(d_in, d_out)`` of each adapted layer (e.g. from :func:`glora_layers`).
    fitness: ``candidate -> float``, higher is better (e.g. validation accuracy of the
      supernet with ``glora(..., config=dict(zip(paths, candidate)), supernet=True)``).
    rank: ``r`` of the low-rank choices (for the parameter count).
    population, select, mutation, crossover, m_prob, epochs: search settings
      (paper defaults 50, 10, 25, 25, 0.2, 20).
    param_limit: the largest legal parameter count (``None``: no limit).
    min_param_limit: the smallest legal parameter count.

  Returns:
    A :class:`SearchResult`.
  """
  if not layers:
    raise ValueError("glora_search needs at least one layer")
  seed = np.asarray(jax.random.key_data(key)).ravel().astype(np.uint32)
  rng = np.random.default_rng(seed)
  scores: dict[tuple, float] = {}
  hi = math.inf if param_limit is None else param_limit

  def params(cand) -> int:
    return sum(glora_param_count(c, di, do, rank) for c, (di, do) in zip(cand, layers))

  def try_add(cand) -> bool:
    if cand in scores or not min_param_limit <= params(cand) <= hi:
      return False
    scores[cand] = float(fitness(cand))
    return True

  def fill(make, n: int, max_tries: int) -> list:
    out = []
    for _ in range(max_tries):
      if len(out) >= n:
        break
      cand = make()
      if try_add(cand):
        out.append(cand)
    return out

  def random_cand():
    return tuple(random_config(rng) for _ in layers)

  def mutate(top):
    parent = top[rng.integers(len(top))]
    return tuple(LayerConfig(*(CHOICES[t][rng.integers(len(CHOICES[t]))] if rng.random() < m_prob else c
                               for t, c in zip(TENSORS, layer))) for layer in parent)

  def cross(top):
    p1, p2 = top[rng.integers(len(top))], top[rng.integers(len(top))]
    return tuple(LayerConfig(*(a if rng.random() < 0.5 else b for a, b in zip(l1, l2)))
                 for l1, l2 in zip(p1, p2))

  random_tries = 1000 * population
  cands = fill(random_cand, population, random_tries)
  if not cands:
    raise ValueError(f"glora_search: no random candidate within the parameter limits "
                     f"[{min_param_limit}, {param_limit}] in {random_tries} tries")
  top: list = []
  history = []
  for _ in range(epochs):
    top = sorted(top + cands, key=lambda c: -scores[c])[:select]  # stable; disjoint lists
    history.append(scores[top[0]])
    cands = fill(lambda: mutate(top), mutation, 10 * mutation)
    cands += fill(lambda: cross(top), crossover, 10 * crossover)
    cands += fill(random_cand, population - len(cands), random_tries)
  top = sorted(top + cands, key=lambda c: -scores[c])[:select]
  return SearchResult(best=top[0], best_fitness=scores[top[0]], top=[(c, scores[c]) for c in top],
                      history=history, evaluated=len(scores))
