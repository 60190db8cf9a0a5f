"""The run config: every committed config parses (one per registered method), unknown keys
with a did-you-mean, wrong types and values naming key and file, cross-section checks,
typed ``--set`` overrides, and the JSON round trip."""

import dataclasses
import json

import pytest
from hypothesis import given, settings, strategies as st

from lowrank_jax.methods import registry
from lowrank_jax.models import bert, decoder
from lowrank_jax.trainer import config as C
from tests.trainer.conftest import DATA, ROOT, tiny_config

CONFIGS = sorted((ROOT / "configs").glob("*.json"))


@pytest.fixture(autouse=True)
def _at_the_repository_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # configs name data files relative to the working directory


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_committed_config_parses_and_round_trips(path):
  c = C.load(path)
  assert c.name == json.loads(path.read_text()).get("name", path.stem)
  assert C.from_dict(json.loads(json.dumps(C.to_dict(c)))) == c


def test_every_registered_method_has_a_config_and_the_main_three_exist():
  used = {m.method_name for p in CONFIGS for m in C.load(p).methods}
  assert set(registry.METHODS) <= used, sorted(set(registry.METHODS) - used)
  names = {p.name for p in CONFIGS}
  assert {"minilm_frozen.json", "minilm_lora.json", "minilm_full.json"} <= names
  assert C.load(ROOT / "configs" / "minilm_frozen.json").methods == ()


def _err(raw, source="f.json") -> str:
  with pytest.raises(C.ConfigError) as e:
    C.from_dict(raw, source)
  return str(e.value)


@pytest.mark.parametrize("section,typo,right", [
    ("training", "batchsize", "batch_size"), ("data", "max_length", "max_len"),
    ("optimizer", "learning_rate", None), ("checkpointing", "evry", "every"),
    ("model", "pooing", "pooling"), ("schedule", "warmup_fraction", "warmup_frac")])
def test_unknown_key_lists_valid_keys_with_did_you_mean(section, typo, right):
  msg = _err({"name": "x", section: {typo: 1}})
  assert msg.startswith(f"f.json: unknown key '{section}.{typo}';")
  assert "valid keys of " + section in msg
  if right:
    assert f"did you mean '{right}'?" in msg


def test_unknown_top_level_key_and_method_parameter():
  assert "unknown key 'epochs'" in _err({"name": "x", "epochs": 3})
  msg = _err({"name": "x", "methods": [{"name": "lora", "where": "q", "rnak": 4}]})
  assert msg.startswith("f.json: methods[0]: ") and "'rnak'" in msg and "'rank'" in msg
  assert "did you mean 'lora'" in _err({"name": "x", "methods": [{"name": "lorra", "where": "q"}]})
  assert "unknown key 'model.random.hiden_size'; did you mean 'hidden_size'?" in _err(
      {"name": "x", "model": {"random": {"hiden_size": 8}}})


@pytest.mark.parametrize("raw,needle", [
    ({"training": {"epochs": "3"}}, 'training.epochs: expected an integer, got "3" (str)'),
    ({"training": {"epochs": True}}, "training.epochs: expected an integer, got true"),
    ({"training": {"batch_size": 0}}, "training.batch_size: 0 must be > 0"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number"),
    ({"model": {"dropout": 1.5}}, "model.dropout: 1.5 must be in [0, 1)"),
    ({"model": {"pooling": "max"}}, 'model.pooling: "max" is not one of "mean", "cls"'),
    ({"data": {"fractions": [0.5, 0.5, 0.5]}}, "data: fractions [0.5, 0.5, 0.5] must be non-negative and sum to 1"),
    ({"quantize": {"codec": "nf5"}}, "quantize.codec: unknown codec 'nf5'; did you mean"),
    ({"quantize": {"codec": "int4_affine", "options": {"symetric": False}}},
     "quantize.options: codec 'int4_affine' has no option 'symetric'; did you mean 'symmetric'?"),
    ({"quantize": {"where": "(("}}, "quantize.where: \"((\" is not a valid regex"),
    ({"optimizer": {"kind": "adamw", "rank": 4}}, "optimizer: optimizer 'adamw': unknown keys ['rank']"),
    ({"rank_allocator": {"target_r": 2}}, "rank_allocator: needs an 'adalora' method"),
    ({"mesh": {"mesh": "data:2", "rules": [["q_proj", ["fsdp"]]]}}, "mesh.rules[0][1][0]: the mesh 'data:2' has no axis 'fsdp'"),
    ({"export": {"merged": True}}, "export.merged: a merged Hugging Face folder is written for decoder models only"),
    ({"deploy": {"kind": "qalora_merge"}}, "deploy.kind: 'qalora_merge' needs a 'qalora' method"),
    ({"deploy": {"kind": "merge_quantize"}}, "deploy: quantize is required with kind 'merge_quantize'"),
    ({"task": "sft", "model": {"kind": "decoder", "path": "/nowhere"}, "data": {"train": "x.jsonl"}},
     "model.path: model folder '/nowhere' does not exist"),
    ({"task": "sft", "data": {"train": "x.jsonl"}}, "model.kind: task 'sft' needs a 'decoder' model"),
    ({"task": "sft", "model": {"kind": "decoder", "random": {"vocab_size": 8}}}, "missing required key 'data.train'"),
])
def test_wrong_types_and_values_name_key_and_file(raw, needle):
  msg = _err({"name": "x", **raw})
  assert msg.startswith("f.json: ") and needle in msg, msg


def test_random_models_parse_into_the_model_config_class():
  c = C.from_dict(tiny_config())
  assert isinstance(c.model.random, bert.BertConfig) and c.model.random.hidden_size == 16
  d = C.from_dict({"name": "d", "task": "sft", "data": {"train": str(DATA / "sft_train.jsonl")},
                   "model": {"kind": "decoder", "random": {"vocab_size": 103, "hidden_size": 16,
                                                           "intermediate_size": 32, "num_layers": 1,
                                                           "num_heads": 2, "num_kv_heads": 1},
                             "tokenizer": str(DATA / "chat_tokenizer")},
                   "methods": [{"name": "lora", "where": "q_proj/kernel"}]})
  assert isinstance(d.model.random, decoder.DecoderConfig) and d.model.random.num_kv_heads == 1
  assert C.from_dict(C.to_dict(d)) == d


def test_set_overrides_are_typed_by_their_key():
  raw = tiny_config()
  for assignment in ("training.epochs=1", "optimizer.lr=3e-4", "methods.0.rank=4", "methods.0.dropout=0",
                     "model.random.hidden_size=32", "quantize.codec=nf4", "export.peft=false",
                     "data.packages=[\"json\", \"html\"]", "training.max_steps=null", "name=renamed"):
    raw = C.apply_override(raw, assignment, "f.json")
  c = C.from_dict(raw, "f.json")
  assert c.training.epochs == 1 and c.optimizer.lr == 3e-4 and c.methods[0].rank == 4
  assert c.methods[0].dropout == 0.0 and c.model.random.hidden_size == 32
  assert c.quantize == C.QuantizeConfig(codec="nf4") and c.export.peft is False
  assert c.data.packages == ("json", "html") and c.training.max_steps is None and c.name == "renamed"
  with pytest.raises(C.ConfigError, match=r"--set training.epocs: unknown key|unknown key 'training.epocs'; did you mean 'epochs'"):
    C.apply_override(raw, "training.epocs=2", "f.json")
  with pytest.raises(C.ConfigError, match="--set training.epochs: expected an integer, got 'two'"):
    C.apply_override(raw, "training.epochs=two", "f.json")
  with pytest.raises(C.ConfigError, match="--set methods.3.rank: the config has 1 method"):
    C.apply_override(raw, "methods.3.rank=2", "f.json")
  with pytest.raises(C.ConfigError, match="expected key=value"):
    C.apply_override(raw, "training.epochs", "f.json")


def test_load_all_validates_every_file_and_wants_distinct_names(tmp_path):
  a = tmp_path / "a.json"
  a.write_text(json.dumps(tiny_config("same")))
  b = tmp_path / "b.json"
  b.write_text(json.dumps(tiny_config("same")))
  with pytest.raises(C.ConfigError, match="names must differ"):
    C.load_all([a, b])
  b.write_text("{\"name\": \"b\",\n \"training\": {\"epochs\": 2,}}")
  with pytest.raises(C.ConfigError, match=f"{b}: not valid JSON: .* line 2"):
    C.load_all([a, b])
  c = tmp_path / "noname.json"
  c.write_text(json.dumps({k: v for k, v in tiny_config().items() if k != "name"}))
  assert C.load(c).name == "noname"  # the file's stem


_training = st.builds(dict, epochs=st.integers(1, 100), batch_size=st.integers(1, 4096),
                      seed=st.integers(0, 2**31), max_steps=st.one_of(st.none(), st.integers(1, 10**6)),
                      log_every=st.integers(1, 1000))
_optimizer = st.builds(dict, kind=st.just("adamw"), lr=st.floats(1e-8, 10.0), weight_decay=st.floats(0, 1),
                       clip=st.one_of(st.none(), st.floats(1e-3, 100.0)))


@settings(max_examples=40, deadline=None)
@given(training=_training, optimizer=_optimizer, every=st.integers(0, 1000), keep=st.integers(1, 10))
def test_round_trip_property(training, optimizer, every, keep):
  raw = {"name": "p", "training": training, "optimizer": optimizer, "checkpointing": {"every": every, "keep": keep}}
  c = C.from_dict(raw)
  assert C.from_dict(json.loads(json.dumps(C.to_dict(c)))) == c
  assert dataclasses.asdict(c.training).items() >= training.items()


_SECTIONS = {"training": C.TrainingConfig, "optimizer": C.OptimizerConfig, "schedule": C.ScheduleConfig,
             "checkpointing": C.CheckpointConfig, "export": C.ExportConfig, "mesh": C.MeshConfig}


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(sorted(_SECTIONS)), key=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_any_unknown_key_is_an_error_naming_it(section, key):
  cls = _SECTIONS[section]
  if key in {f.name for f in dataclasses.fields(cls)}:
    return
  msg = _err({"name": "x", section: {key: 1}}, "conf.json")
  assert msg.startswith(f"conf.json: unknown key '{section}.{key}';")
  assert all(f.name in msg for f in dataclasses.fields(cls))
