"""Imports point down the layers of ``lowrank_jax/_layers.py``, never up, never in a circle.

Every module under ``lowrank_jax/`` is parsed with ``ast`` (no import is executed);
module-level *and* function-level imports count. A target is the module an import
names (``from lowrank_jax.quant import nf4`` -> ``lowrank_jax.quant.nf4``;
``from lowrank_jax.quant import quantize`` -> the package ``lowrank_jax.quant``).
Parent packages are not edges (Python runs their ``__init__`` first, which is not a
dependency of the module on everything the package re-exports).
"""

from __future__ import annotations

import ast
import pathlib
from typing import NamedTuple, Optional

import pytest

from lowrank_jax import _layers

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowrank_jax"
TOP = ("lowrank_jax", "experiments", "bench")

# Edges that are known to be wrong and owned by someone else: (importer, imported) -> owner
# and reason. They make the tests xfail (not fail) while they are the only violations;
# once fixed they pass again. Empty when everything is clean.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
# a known cycle: every module of the cycle is the package named or inside it
KNOWN_CYCLES: dict[str, str] = {}
KNOWN_FUNCTION_IMPORTS: dict[tuple[str, str], str] = {}


class Edge(NamedTuple):
  src: str
  dst: str
  line: int
  in_function: bool

  def where(self) -> str:
    return f"line {self.line}{' (inside a function)' if self.in_function else ''}"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
  return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _resolve(name: str) -> str:
  """The deepest existing module of a dotted name (``a.b.c`` -> ``a.b`` if ``c`` is no module)."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    cand = ".".join(parts[:i])
    if cand in MODULES:
      return cand
  return name  # outside lowrank_jax (experiments, bench) or not written yet


class _Collector(ast.NodeVisitor):
  def __init__(self, src: str):
    self.src, self.depth, self.edges = src, 0, []
    self.package = src if _is_package(src) else src.rpartition(".")[0]

  def visit_FunctionDef(self, node):
    self.depth += 1
    self.generic_visit(node)
    self.depth -= 1

  visit_AsyncFunctionDef = visit_FunctionDef
  visit_Lambda = visit_FunctionDef

  def _add(self, target: str, node):
    if target.split(".")[0] in TOP:
      self.edges.append(Edge(self.src, _resolve(target), node.lineno, self.depth > 0))

  def visit_Import(self, node):
    for alias in node.names:
      self._add(alias.name, node)

  def visit_ImportFrom(self, node):
    if node.level:
      base = self.package.split(".")
      base = base[: len(base) - (node.level - 1)]
      module = ".".join(base + ([node.module] if node.module else []))
    else:
      module = node.module
    for alias in node.names:
      full = f"{module}.{alias.name}"
      self._add(full if full in MODULES else module, node)


def _edges() -> list[Edge]:
  edges = []
  for name, path in MODULES.items():
    c = _Collector(name)
    c.visit(ast.parse(path.read_text(), filename=str(path)))
    edges += [e for e in dict.fromkeys(c.edges) if e.dst != e.src]
  return edges


EDGES = _edges()


def _layer(module: str) -> Optional[tuple[int, str]]:
  return _layers.layer_of(module)


def _describe(module: str) -> str:
  n, _ = _layer(module)
  return f"{module} (layer {n}: {_layers.LAYER_NAMES[n]})"


def _finish(problems: list[str], known: list[str]):
  if problems:
    pytest.fail("\n".join(problems + (["known (owned elsewhere):"] + known if known else [])))
  if known:
    pytest.xfail("known, owned elsewhere:\n" + "\n".join(known))


def test_every_module_is_in_the_layer_table():
  missing = [f"{m} ({p.relative_to(ROOT)}): add it to the layer table in lowrank_jax/_layers.py"
             for m, p in MODULES.items() if _layer(m) is None]
  assert not missing, "\n".join(missing)


def test_layer_table_is_consistent():
  assert set(_layers.MODULES.values()) <= set(range(len(_layers.LAYER_NAMES)))
  # the new packages land where the architecture says (whether or not they exist yet)
  expected = {
    "lowrank_jax.trainer.loop": "trainer", "lowrank_jax.trainer.cli": "trainer",
    "lowrank_jax.distributed": "tools", "lowrank_jax.sharding": "tools",
    "lowrank_jax.models.decoder": "codecs, models, data, io",
    "lowrank_jax.io.safetensors": "codecs, models, data, io",
    "lowrank_jax.data.sft": "codecs, models, data, io",
    "lowrank_jax.methods.registry": "method registry", "lowrank_jax.methods.lora": "methods",
    "lowrank_jax.quant.loftq": "methods", "lowrank_jax.quant.nf4": "codecs, models, data, io",
    "lowrank_jax.lazy": "core", "lowrank_jax.ops": "ops", "lowrank_jax": "api",
    "experiments.recipes": "runnable",
  }
  got = {m: _layers.LAYER_NAMES[_layer(m)[0]] for m in expected}
  assert got == expected
  assert _layer("lowrank_jax.newthing") is None  # the api entry is not a catch-all


def test_layers_module_imports_nothing():
  tree = ast.parse((PACKAGE / "_layers.py").read_text())
  assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_imports_point_down():
  problems, known = [], []
  for e in EDGES:
    src, dst = _layer(e.src), _layer(e.dst)
    if src is None:
      continue  # reported by test_every_module_is_in_the_layer_table
    if dst is None:
      problems.append(f"{e.src} imports {e.dst} ({e.where()}), which no layer covers: "
                      f"add it to the layer table in lowrank_jax/_layers.py")
      continue
    if dst[0] > src[0]:
      msg = (f"upward import: {_describe(e.src)} imports {_describe(e.dst)} at {e.where()}")
      owner = KNOWN_UPWARD.get((e.src, e.dst))
      (known if owner else problems).append(msg + (f" [{owner}]" if owner else ""))
  _finish(problems, known)


def _cycles(edges: list[Edge]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  graph: dict[str, set[str]] = {}
  for e in edges:
    graph.setdefault(e.src, set()).add(e.dst)
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  problems, known = [], []
  for comp in _cycles(EDGES):
    inside = [e for e in EDGES if e.src in comp and e.dst in comp]
    msg = "import cycle between " + ", ".join(comp) + ":\n" + "\n".join(
        f"  {_describe(e.src)} imports {_describe(e.dst)} at {e.where()}" for e in inside)
    owner = next((o for pkg, o in KNOWN_CYCLES.items()
                  if all(m == pkg or m.startswith(pkg + ".") for m in comp)), None)
    (known if owner else problems).append(msg + (f"\n  [{owner}]" if owner else ""))
  _finish(problems, known)


def test_no_function_level_imports_of_the_package():
  """Imports of lowrank_jax inside functions hide dependencies; optional extras (torch,
  transformers) are the only excuse, and they are not lowrank_jax modules."""
  problems, known = [], []
  for e in EDGES:
    if e.in_function and e.src != "lowrank_jax":
      msg = f"{e.src} imports {e.dst} at {e.where()}: import it at module level"
      owner = KNOWN_FUNCTION_IMPORTS.get((e.src, e.dst))
      (known if owner else problems).append(msg + (f" [{owner}]" if owner else ""))
  _finish(problems, known)


# ----------------------------------------------------------------- the checker itself

def _check_source(src_name: str, code: str) -> list[Edge]:
  c = _Collector(src_name)
  c.visit(ast.parse(code))
  return c.edges


def test_collector_sees_function_level_relative_and_aliased_imports():
  code = ("import lowrank_jax as lj\n"
          "from lowrank_jax import lazy, tree as tree_lib\n"
          "from lowrank_jax.quant import quantize\n"
          "from . import blockwise\n"
          "import numpy\n"
          "def f():\n"
          "  from lowrank_jax.methods.lora import lora\n"
          "  return lambda: __import__('x')\n")
  edges = _check_source("lowrank_jax.quant.nf4", code)
  assert [(e.dst, e.in_function) for e in edges] == [
    ("lowrank_jax", False), ("lowrank_jax.lazy", False), ("lowrank_jax.tree", False),
    ("lowrank_jax.quant", False), ("lowrank_jax.quant.blockwise", False),
    ("lowrank_jax.methods.lora", True)]


def test_checker_catches_an_upward_import_and_a_cycle():
  # a codec importing a method: upward (layer 2 -> 4), named with both layers
  e = _check_source("lowrank_jax.quant.nf4", "def f():\n  from lowrank_jax.methods import lora\n")[0]
  assert _layer(e.src)[0] == 2 and _layer(e.dst)[0] == 4 and e.in_function
  assert "layer 4: methods" in _describe(e.dst)
  # nf4 <-> icq as it was: a two-module cycle
  fake = [Edge("lowrank_jax.quant.nf4", "lowrank_jax.quant.icq", 1, True),
          Edge("lowrank_jax.quant.icq", "lowrank_jax.quant.nf4", 2, True),
          Edge("lowrank_jax.quant.icq", "lowrank_jax.quant.blockwise", 3, False)]
  assert _cycles(fake) == [["lowrank_jax.quant.icq", "lowrank_jax.quant.nf4"]]
  assert _cycles(fake[1:]) == []
