"""The method registry: a method built from a (JSON) config equals the factory called
directly, configs are validated (unknown/missing keys, wrong types, unknown names), and the
lists that used to be kept by hand are checked against it: the public API, the test files,
the README's method table and the configs."""

import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.methods import registry
from lowrank_jax.methods.glora import LayerConfig
from lowrank_jax.models import bert

ROOT = pathlib.Path(__file__).resolve().parents[2]
CFG = bert.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32)
GLORA = ["lora", "vector", "lora", "constant", "none"]
FF = r"layer_\d+/output/kernel$"

# Every registered method, as a JSON config would give it (lists, ints for floats, dtype
# names), and the factory arguments those values stand for when they differ.
PARAMS = {
    "lora": {"where": ["query/kernel", "value/kernel"], "rank": 4, "alpha": 8, "dtype": "float32"},
    "dora": {"where": "(query|value)/kernel", "rank": 2, "alpha": 4},
    "lokr": {"where": "query/kernel", "rank": 2, "decompose_both": True, "init": "random"},
    "loha": {"where": "value/kernel", "rank": 2},
    "glora": {"where": "query/kernel", "rank": 2, "config": GLORA},
    "adalora": {"where": "query/kernel", "init_r": 4, "init_std": 0.1},
    "vera": {"where": "(query|value)/kernel", "rank": 8, "d_initial": 0.5},
    "ia3": {"where": rf"(attention/(key|value)/kernel$|{FF})", "feedforward": FF},
    "intrinsic_said": {"d": 50, "where": "^bert/encoder/.*/kernel$", "seed": 3},
    "bottleneck_adapters": {"placement": "pfeiffer", "bottleneck": 4, "init_std": 0.1},
    "prefix_tuning": {"num_prefix": 3, "reparam_mlp": 8},
    "full": {"where": "^head/"},
    "loftq": {"where": "query/kernel", "rank": 2, "num_iter": 2, "block_size": 16},
    "qalora": {"where": "query/kernel", "rank": 2, "alpha": 4, "group_size": 8},
    "l4q": {"where": "query/kernel", "rank": 2, "group_size": 8, "integer_zero": True},
    "batched_lora": {"where": "(query|value)/kernel", "rank": 2, "init": "gaussian"},
}
NATIVE = {"lora": {"where": ["query/kernel", "value/kernel"], "alpha": 8.0, "dtype": jnp.float32},
          "glora": {"config": LayerConfig(*GLORA)}}


@pytest.fixture(scope="module")
def theta0():
  return {"bert": bert.init_bert(jax.random.key(0), CFG, pooler=False),
          "head": bert.init_classifier(jax.random.key(1), CFG.hidden_size, 3)}


def _perturbed(phi, key):
  """``phi`` plus noise in every float leaf (zero-initialised factors would hide terms)."""
  leaves, treedef = jax.tree.flatten(phi)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                      if jnp.issubdtype(x.dtype, jnp.floating) else x
                                      for k, x in zip(keys, leaves)])


def _outputs(reparam, theta0):
  """``(theta0', phi, dense apply(theta0', phi + noise))`` from fixed keys."""
  base, phi = lj.initialize(reparam, jax.random.key(2), theta0)
  return base, phi, lj.materialize(reparam.apply(base, _perturbed(phi, jax.random.key(3))))


def _assert_same_trees(a, b):
  la, ta = jax.tree.flatten(lj.materialize(a))
  lb, tb = jax.tree.flatten(lj.materialize(b))
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_test_configs_cover_every_registered_method():
  assert set(PARAMS) == set(registry.METHODS)


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_build_from_a_json_config_equals_the_factory_called_directly(name, theta0):
  spec = registry.get(name)
  params = json.loads(json.dumps(PARAMS[name]))
  assert isinstance(registry.parse(name, params), (spec.config_cls, registry.MethodConfig))
  ours = _outputs(registry.build(name, **params), theta0)
  direct = _outputs(spec.factory(**{**PARAMS[name], **NATIVE.get(name, {})}), theta0)
  for a, b in zip(ours, direct):
    _assert_same_trees(a, b)
  # the perturbed method really changed the model (the comparison is not of two identities)
  la, ta = jax.tree.flatten(ours[2])
  l0, t0 = jax.tree.flatten(theta0)
  assert ta != t0 or any(not np.array_equal(x, y) for x, y in zip(la, l0))


def test_config_defaults_and_conversions():
  cfg = registry.parse("lora", {"where": ["query/kernel"], "alpha": 16, "dtype": "bfloat16"})
  assert cfg.rank == 8 and cfg.init == "kaiming" and cfg.matmul == "factored"  # lj.lora's defaults
  assert cfg.where == ("query/kernel",) and cfg.alpha == 16.0 and isinstance(cfg.alpha, float)
  assert cfg.dtype == jnp.bfloat16
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.rank = 4  # type: ignore[misc]
  said = registry.parse("intrinsic_said", {"d": 10})
  assert said.where is None and said.said is True and said.dtype == jnp.float32


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_as_dict_round_trips_through_json(name):
  cfg = registry.parse(name, PARAMS[name])
  item = json.loads(json.dumps(registry.as_dict(cfg)))
  assert item.pop("name") == name
  assert registry.parse(name, item) == cfg


def test_unknown_key_lists_the_valid_keys_and_the_closest():
  with pytest.raises(registry.ConfigError, match=r"lora: unknown parameter 'rnak' \(did you mean 'rank'\?\); "
                                                 r"valid parameters: where, rank, alpha, rslora"):
    registry.build("lora", where="query/kernel", rnak=4)
  with pytest.raises(registry.ConfigError, match="unknown parameter 'zzz'; valid"):  # nothing close
    registry.get("dora").config_cls(where="x", zzz=1)


@pytest.mark.parametrize("name, params, key, expected", [
    ("lora", {"where": "q", "rank": "8"}, "rank", "int"),
    ("lora", {"where": "q", "rank": 8.0}, "rank", "int"),
    ("lora", {"where": "q", "rank": True}, "rank", "int"),
    ("lora", {"where": "q", "rslora": 1}, "rslora", "bool"),
    ("lora", {"where": "q", "alpha": "16"}, "alpha", "float or None"),
    ("lora", {"where": "q", "init": "kaming"}, "init", "one of 'kaiming', 'gaussian'"),
    ("lora", {"where": "q", "dtype": "float33"}, "dtype", "a dtype or dtype name"),
    ("lora", {"where": 3}, "where", "a regex, a list of regexes"),
    ("lora", {"where": "(query"}, "where", "a regex"),
    ("bottleneck_adapters", {"layers": [0, "1"]}, "layers", r"Sequence\[int\] or None"),
    ("glora", {"where": "q", "config": [1, 2]}, "config", "LayerConfig or Mapping"),
    ("vera", {"where": "q", "key": 0}, "key", "jax.Array or None"),
])
def test_wrong_type_names_the_key_and_the_type(name, params, key, expected):
  with pytest.raises(registry.ConfigError, match=rf"{name}: parameter '{key}' must be {expected}"):
    registry.parse(name, params)


def test_missing_required_and_bad_mappings():
  with pytest.raises(registry.ConfigError, match="lora: missing required parameter.*'where'"):
    registry.parse("lora", {"rank": 4})
  with pytest.raises(registry.ConfigError, match="intrinsic_said: missing required parameter.*'d'"):
    registry.build("intrinsic_said")
  with pytest.raises(registry.ConfigError, match="parameters must be a mapping"):
    registry.parse("lora", [("where", "q")])


def test_unknown_method_name_suggests_the_closest():
  with pytest.raises(registry.ConfigError, match=r"unknown method 'lroa' \(did you mean 'lora'\?\); "
                                                 r"registered methods: lora, dora"):
    registry.get("lroa")
  with pytest.raises(registry.ConfigError, match="unknown method 'said'.*intrinsic_said"):
    registry.build("said", d=4)
  with pytest.raises(registry.ConfigError, match="expects a registry method config"):
    registry.build_from({"name": "lora"})


def test_chain_from_equals_lj_chain(theta0):
  items = [{"name": "lora", "where": "query/kernel", "rank": 2},
           registry.parse("full", {"where": "^head/"})]
  ours = _outputs(registry.chain_from(items), theta0)
  direct = _outputs(lj.chain(lj.lora("query/kernel", rank=2), lj.full("^head/")), theta0)
  for a, b in zip(ours, direct):
    _assert_same_trees(a, b)
  assert items[0]["name"] == "lora"  # the caller's mapping is not consumed
  with pytest.raises(registry.ConfigError, match="item 0 must be a config or a mapping with a 'name'"):
    registry.chain_from([{"where": "q"}])
  with pytest.raises(registry.ConfigError, match="non-empty list"):
    registry.chain_from({"name": "lora", "where": "q"})
  with pytest.raises(registry.ConfigError, match="lora: unknown parameter 'rnak'"):
    registry.chain_from([{"name": "lora", "where": "q", "rnak": 2}])


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_every_method_is_public_api_with_a_test_file(name):
  spec = registry.get(name)
  assert spec.call == f"lj.{spec.factory.__name__}" and getattr(lj, spec.factory.__name__) is spec.factory
  for extra in spec.extras:
    assert extra.startswith("lj.") and callable(getattr(lj, extra[3:]))
  assert all(re.fullmatch(r"\d{4}\.\d{4,5}", p) for p in spec.paper), spec.paper
  assert spec.reference and spec.title
  assert (ROOT / spec.test_file).is_file(), f"{name}: test file {spec.test_file} does not exist"


def _readme() -> str:
  return (ROOT / "README.md").read_text()


def test_readme_method_table_is_the_generated_one():
  table = registry.markdown_table()
  assert table in _readme(), ("README.md's method table differs from the registry's; paste this "
                              "(`registry.markdown_table()`) in its place:\n" + table)


def test_every_method_has_a_readme_row():
  rows = [line for line in _readme().splitlines() if line.startswith("|")]
  for name in registry.METHODS:
    assert sum(f"| `{name}` |" in row for row in rows) == 1, name


def _method_names(node, key=None):
  """Strings a config gives as method names, in the old (``"method": {"kind": ...}``) and
  new (``"method"``/``"methods"`` entries with ``"name"``, or plain strings) formats."""
  if isinstance(node, dict):
    for k, v in node.items():
      yield from _method_names(v, k)
  elif isinstance(node, list):
    for v in node:
      yield from _method_names(v, key)
  elif isinstance(node, str) and key in ("method", "methods", "name", "kind"):
    yield node


def test_every_method_is_used_by_a_config():
  used = set()
  for path in sorted((ROOT / "configs").rglob("*.json")):
    used.update(_method_names(json.loads(path.read_text())))
  missing = [n for n in registry.METHODS if n not in used]
  if missing:
    pytest.xfail(f"no config in configs/ uses {missing} yet (configs to be added by the trainer work)")
