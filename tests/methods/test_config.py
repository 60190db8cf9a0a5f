"""Every method carries its own config (issue 16, "nothing silent"): a factory called
directly records the same typed config as the registry's ``parse`` of the same parameters
(positional arguments too, the outer call's config for composite methods), the config is
JSON data both ways (``registry.describe`` / ``registry.from_description``: same config,
same outputs), and an export reads it (``interop.peft.save_peft_adapter`` of a direct
``lj.lora(...)``)."""

import ast
import dataclasses
import inspect
import json
import pathlib

import jax
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import tree as tree_lib
from lowrank_jax.interop import peft as lpeft
from lowrank_jax.methods import _config, registry
from lowrank_jax.models import bert
from lowrank_jax.reparam import PerModule, per_module
from tests.methods.test_registry import CFG, NATIVE, PARAMS, _assert_same_trees, _outputs


@pytest.fixture(scope="module")
def theta0():
  return {"bert": bert.init_bert(jax.random.key(0), CFG, pooler=False),
          "head": bert.init_classifier(jax.random.key(1), CFG.hidden_size, 3)}


def _direct(name):
  """The factory called directly, with native Python values (not the JSON ones)."""
  return registry.get(name).factory(**{**PARAMS[name], **NATIVE.get(name, {})})


def _json(data):
  return json.loads(json.dumps(data))


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_a_direct_factory_call_records_the_registry_config(name):
  spec = registry.get(name)
  r = _direct(name)
  assert type(r.config) is spec.config_cls
  assert r.config == registry.parse(name, _json(PARAMS[name]))
  assert r.config == registry.build(name, **_json(PARAMS[name])).config
  # the decorated factory keeps its name, docstring and signature; its config class has its
  # parameters, in order, with its defaults
  assert spec.factory.config_cls is spec.config_cls
  assert spec.call == f"lj.{spec.factory.__name__}" and spec.factory.__doc__
  params = inspect.signature(spec.factory).parameters
  fields = dataclasses.fields(spec.config_cls)
  assert [f.name for f in fields] == list(params)
  for f in fields:
    default = params[f.name].default
    assert (f.default is dataclasses.MISSING) == (default is inspect.Parameter.empty), f.name


def test_positional_arguments_bind_by_the_factory_order():
  cfg = registry.parse("lora", {"where": "query/kernel", "rank": 4, "alpha": 8})
  assert lj.lora("query/kernel", 4, 8).config == cfg
  assert lj.lora("query/kernel", 4, alpha=8).config == cfg
  assert lj.intrinsic_said(50, "^bert/").config == registry.parse("intrinsic_said", {"d": 50, "where": "^bert/"})
  assert lj.lora("query/kernel", 4, 8).config != lj.lora("query/kernel", 8, 4).config
  with pytest.raises(TypeError, match=r"lora\(\) takes 3 positional argument\(s\) \(where, rank, alpha\)"):
    lj.lora("query/kernel", 4, 8, True)
  with pytest.raises(TypeError, match="multiple values for argument 'rank'"):
    lj.lora("query/kernel", 4, rank=8)


def test_a_direct_call_validates_its_arguments():
  with pytest.raises(registry.ConfigError, match=r"lora: unknown parameter 'rnak' \(did you mean 'rank'\?\)"):
    lj.lora("query/kernel", rnak=4)
  with pytest.raises(registry.ConfigError, match="lora: parameter 'rank' must be int, got str '4'"):
    lj.lora("query/kernel", "4")
  with pytest.raises(registry.ConfigError, match="dora: missing required parameter.*'where'"):
    lj.dora(rank=2)
  with pytest.raises(registry.ConfigError, match="lora: parameter 'where' must be .*invalid regex"):
    lj.lora("query/(kernel")


def test_the_outer_config_wins_in_a_composite_method(theta0):
  """``lora(bias="all")`` chains ``full`` inside; the reparam records lora's config."""
  r = lj.lora("query/kernel", rank=2, bias="all")
  assert r.config == registry.parse("lora", {"where": "query/kernel", "rank": 2, "bias": "all"})
  by_hand = lj.chain(lj.lora("query/kernel", rank=2), lj.full(r"(^|/)bias$"))
  assert isinstance(by_hand.config, tuple) and by_hand.config[1] == registry.parse("full", {"where": r"(^|/)bias$"})
  for a, b in zip(_outputs(r, theta0), _outputs(by_hand, theta0)):
    _assert_same_trees(a, b)
  # rebuilt from its description, it is the composite again (not a chain of configs)
  back = registry.from_description(_json(registry.describe(r)))
  assert back.config == r.config
  for a, b in zip(_outputs(back, theta0), _outputs(r, theta0)):
    _assert_same_trees(a, b)


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_describe_then_from_description_is_the_same_method(name, theta0):
  r = _direct(name)
  data = registry.describe(r)
  assert _json(data) == data  # JSON types only
  assert data == {"name": name, **{k: v for k, v in _json(registry.as_dict(r.config)).items() if k != "name"}}
  back = registry.from_description(_json(data))
  assert back.config == r.config
  for a, b in zip(_outputs(back, theta0), _outputs(r, theta0)):
    _assert_same_trees(a, b)


def test_a_chain_and_a_per_module_round_trip(theta0):
  masks = [tree_lib.select(theta0, rx) for rx in ("query/kernel", "value/kernel")]
  pm = per_module([(masks[0], lj.lora(masks[0], rank=2, alpha=4)),
                   (masks[1], lj.lora(masks[1], rank=4, alpha=16, rslora=True))])
  assert isinstance(pm.config, PerModule)
  r = lj.chain(pm, lj.chain(lj.ia3("key/kernel"), lj.full("^head/")))
  data = registry.describe(r)
  assert isinstance(data, list) and set(data[0]) == {"per_module"} and isinstance(data[1], list)
  assert data[0]["per_module"][1]["rank"] == 4 and data[0]["per_module"][1]["rslora"] is True
  back = registry.from_description(_json(data))
  assert isinstance(back.config[0], PerModule) and isinstance(back.config[1], tuple)
  assert registry.describe(back) == data
  for a, b in zip(_outputs(back, theta0), _outputs(r, theta0)):
    _assert_same_trees(a, b)
  # chain_from takes the same items
  assert registry.describe(registry.chain_from(_json(data))) == data
  # a part may select its leaves by regex: the same model as by mask
  by_regex = per_module([(masks[0], lj.lora(masks[0], rank=2, alpha=4)),
                         ("value/kernel", lj.lora("value/kernel", rank=4, alpha=16, rslora=True))])
  for a, b in zip(_outputs(by_regex, theta0), _outputs(pm, theta0)):
    _assert_same_trees(a, b)


def test_what_is_not_data_is_named():
  with pytest.raises(registry.ConfigError, match=r"config \(lora\): parameter 'where' is a callable.*not JSON data"):
    registry.describe(lj.lora(lambda path, leaf: path.endswith("query/kernel"), rank=2))
  with pytest.raises(registry.ConfigError, match=r"config\[1\] \(vera\): parameter 'key': a .*Array.* is not JSON data"):
    registry.describe(lj.chain(lj.full("^head/"), lj.vera("query/kernel", rank=4, key=jax.random.key(0))))
  with pytest.raises(registry.ConfigError, match=r"config: no config recorded"):
    registry.describe(lj.adapt(lj.lora_method(2), "query/kernel"))
  with pytest.raises(registry.ConfigError, match="from_description: expects a method config"):
    registry.from_description("lora")
  with pytest.raises(registry.ConfigError, match="per_module part 0: must be a config or a mapping with a 'name'"):
    registry.from_description({"per_module": [{"where": "q"}]})


@pytest.mark.parametrize("rslora,alpha", [(False, 8), (True, 16)])
def test_a_direct_lora_exports_its_own_alpha_and_rslora(tmp_path, rslora, alpha):
  theta = bert.init_bert(jax.random.key(0), CFG)
  r = lj.lora(r"(query|value)/kernel", 4, alpha, rslora=rslora)
  phi = jax.tree.map(lambda x: x + 0.05, r.init(jax.random.key(1), theta))
  lpeft.save_peft_adapter(tmp_path / "ad", phi, reparam=r)
  cfg = json.loads((tmp_path / "ad" / lpeft.CONFIG_NAME).read_text())
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
  assert cfg["lora_alpha"] == alpha and cfg["use_rslora"] is rslora
  # and it loads back to the same model
  back = lpeft.load_peft_adapter(tmp_path / "ad", theta)
  np.testing.assert_allclose(lj.materialize(back.reparam.apply(theta, back.phi))["encoder"]["layer_1"]
                             ["attention"]["query"]["kernel"],
                             lj.materialize(r.apply(theta, phi))["encoder"]["layer_1"]["attention"]["query"]
                             ["kernel"], rtol=1e-6, atol=1e-6)


def test_the_config_module_imports_no_method():
  """Every method imports methods._config; it must import none of them (no cycle)."""
  tree = ast.parse(pathlib.Path(_config.__file__).read_text())
  modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  assert "lowrank_jax" in modules  # (from lowrank_jax import tree): the walk sees its imports
  assert not [m for m in modules if m and m.startswith("lowrank_jax.methods")]
