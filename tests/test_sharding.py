"""Sharded training steps equal unsharded ones (8 fake CPU devices in CI)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lowrank_jax as lj
from lowrank_jax import sharding, train

needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices "
                             "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def test_make_mesh_parsing():
  n = len(jax.devices())
  mesh = sharding.make_mesh("data:1,model:-1")
  assert mesh.shape == {"data": 1, "model": n}
  with pytest.raises(ValueError, match=f"needs {2 * n} devices, {n} available"):
    sharding.make_mesh(f"a:{n * 2}")
  with pytest.raises(ValueError, match="expected 'name:size'"):
    sharding.make_mesh("data")


def test_make_mesh_hybrid_dcn_checks():
  """A hybrid (multislice) mesh in one process: one slice, so a DCN size over 1 is refused
  naming what was expected (the two-process case is in tests/test_distributed.py)."""
  n = len(jax.devices())
  mesh = sharding.make_mesh(f"data:1,fsdp:{n}", dcn="data:1")
  assert mesh.shape == {"data": 1, "fsdp": n} and set(mesh.devices.flat) == set(jax.devices())
  with pytest.raises(ValueError, match=f"2 processes of {n // 2} devices each expected"):
    sharding.make_mesh(f"data:2,fsdp:{n // 2}", dcn="data:2")
  with pytest.raises(ValueError, match="names axis 'model', which the mesh"):
    sharding.make_mesh(f"data:2,fsdp:{n // 2}", dcn="model:2")
  with pytest.raises(ValueError, match="axis 'data' of size 2 .* not divisible by 4"):
    sharding.make_mesh(f"data:2,fsdp:{n // 2}", dcn="data:4")
  with pytest.raises(ValueError, match=f"must use every one of the {n} devices"):
    sharding.make_mesh("data:1", dcn="data:1")


def _mlp_setup(key):
  k = jax.random.split(key, 4)
  theta0 = {"l1": {"kernel": jax.random.normal(k[0], (32, 64)) / 6, "bias": jnp.zeros(64)},
            "l2": {"kernel": jax.random.normal(k[1], (64, 16)) / 8, "bias": jnp.zeros(16)}}
  batch = {"x": jax.random.normal(k[2], (16, 32)), "y": jax.random.randint(k[3], (16,), 0, 16)}
  return theta0, batch


def _loss(theta, batch, rng):
  h = jax.nn.gelu(lj.dot(batch["x"], theta["l1"]["kernel"]) + theta["l1"]["bias"])
  logits = lj.dot(h, theta["l2"]["kernel"]) + theta["l2"]["bias"]
  return train.softmax_cross_entropy(logits, batch["y"])


@needs_8
def test_sharded_lora_step_matches_unsharded():
  theta0, batch = _mlp_setup(jax.random.key(0))
  reparam = lj.lora(r"kernel", rank=4, alpha=8)
  phi = jax.tree.map(lambda a: a + 0.01, reparam.init(jax.random.key(1), theta0))
  opt = optax.sgd(0.1, momentum=0.9)  # linear in the gradients: no amplification of rounding
  step = train.make_train_step(reparam, opt, _loss, donate=False)
  ref_phi, ref_state = phi, opt.init(phi)
  for _ in range(3):
    ref_phi, ref_state, ref_m = step(ref_phi, ref_state, theta0, batch, None)

  mesh = sharding.make_mesh("data:2,model:4")
  specs = sharding.partition_specs(theta0, [(r"l1/kernel", P(None, "model")), (r"l1/bias", P("model")),
                                            (r"l2/kernel", P("model", None))], mesh)
  t0 = sharding.shard(theta0, specs, mesh)
  pspecs = sharding.phi_specs(phi, theta0, specs)
  assert pspecs["l1"]["kernel"]["b"] == P(None, "model") and pspecs["l1"]["kernel"]["a"] == P()
  assert pspecs["l2"]["kernel"]["a"] == P("model", None)
  sphi = sharding.shard(phi, pspecs, mesh)
  sstate = sharding.like(opt.init(phi), phi, pspecs, mesh)
  assert sstate[0].trace["l1"]["kernel"]["b"].sharding.spec == P(None, "model")
  sbatch = sharding.shard(batch, {"x": P("data"), "y": P("data")}, mesh)
  for _ in range(3):
    sphi, sstate, m = step(sphi, sstate, t0, sbatch, None)
  chex.assert_trees_all_close(sphi, ref_phi, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
  # the compiled step kept the adapter factor sharded like its base weight's output axis
  assert sphi["l1"]["kernel"]["b"].sharding.spec == P(None, "model")


@needs_8
def test_fsdp_specs_and_errors():
  mesh = sharding.make_mesh("fsdp:8")
  tree = {"big": jnp.zeros((8 * 300, 64)), "small": jnp.zeros(10), "odd": jnp.zeros((129, 131))}
  specs = sharding.fsdp_specs(tree, mesh, min_size=1000)
  assert specs == {"big": P("fsdp"), "small": P(), "odd": P()}
  placed = sharding.shard(tree, specs, mesh)
  assert placed["big"].addressable_shards[0].data.shape == (300, 64)
  with pytest.raises(ValueError, match=r"leaf 'odd' of shape \(129, 131\): axis 0"):
    sharding.partition_specs(tree, [("odd", P("fsdp"))], mesh)


def _decoder_tree(d=64, f=128, v=96, kv=48, e=4):
  """Leaves with the decoder layout of CONTRACTS.md (dense and MoE layers)."""
  z = jnp.zeros
  attn = {n: {"kernel": z((d, kv if n in ("k_proj", "v_proj") else d))}
          for n in ("q_proj", "k_proj", "v_proj")}
  attn["q_proj"]["bias"] = z(d)
  attn["o_proj"] = {"kernel": z((d, d))}
  mlp = {"gate_proj": {"kernel": z((d, f))}, "up_proj": {"kernel": z((d, f))},
         "down_proj": {"kernel": z((f, d))}}
  moe = {"router": {"kernel": z((d, e))},
         "experts": {"gate_proj": {"kernel": z((e, d, f))}, "up_proj": {"kernel": z((e, d, f))},
                     "down_proj": {"kernel": z((e, f, d))}}}
  layer = lambda m: {"input_norm": {"scale": z(d)}, "attention": attn, "post_attention_norm": {"scale": z(d)},
                     "mlp": m}
  return {"embed_tokens": {"embedding": z((v, d))}, "norm": {"scale": z(d)},
          "layers": {"layer_0": layer(mlp), "layer_1": layer(moe)}, "lm_head": {"kernel": z((d, v))}}


@needs_8
def test_decoder_rules_layout_overrides_and_indivisible():
  mesh = sharding.make_mesh("fsdp:2,tensor:2,expert:2")
  tree = _decoder_tree()
  specs = sharding.partition_specs(tree, sharding.family_rules("llama", expert="expert"), mesh)
  l0, l1 = specs["layers"]["layer_0"], specs["layers"]["layer_1"]
  assert l0["attention"]["q_proj"] == {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}
  assert l0["attention"]["k_proj"]["kernel"] == P("fsdp", "tensor")
  assert l0["attention"]["o_proj"]["kernel"] == P("tensor", "fsdp")
  assert l0["mlp"]["gate_proj"]["kernel"] == l0["mlp"]["up_proj"]["kernel"] == P("fsdp", "tensor")
  assert l0["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
  assert l1["mlp"]["experts"]["gate_proj"]["kernel"] == P("expert", "fsdp", "tensor")
  assert l1["mlp"]["experts"]["down_proj"]["kernel"] == P("expert", "tensor", "fsdp")
  assert l1["mlp"]["router"]["kernel"] == P("fsdp")
  assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
  assert specs["norm"]["scale"] == l0["input_norm"]["scale"] == P()
  placed = sharding.shard(tree, specs, mesh)
  assert placed["layers"]["layer_1"]["mlp"]["experts"]["down_proj"]["kernel"].addressable_shards[0]\
      .data.shape == (2, 64, 32)
  # a rule put first overrides the family's
  over = sharding.partition_specs(tree, [(r"lm_head/kernel$", P())] + sharding.decoder_sharding_rules(), mesh)
  assert over["lm_head"]["kernel"] == P()
  # GQA: k/v kernels of 3 heads x 14 do not split over tensor:4
  mesh4 = sharding.make_mesh("fsdp:2,tensor:4")
  odd = {"attention": {"k_proj": {"kernel": jnp.zeros((64, 42))}, "q_proj": {"kernel": jnp.zeros((64, 64))}}}
  rules = sharding.decoder_sharding_rules(fsdp=None)
  with pytest.raises(ValueError, match=r"leaf 'attention/k_proj/kernel' of shape \(64, 42\): axis 1 \(42\) "
                                       r"is not divisible by mesh axis 'tensor' of size 4"):
    sharding.partition_specs(odd, rules, mesh4)
  with pytest.warns(UserWarning, match=r"replicated instead of sharded: leaf 'attention/k_proj/kernel'"):
    s = sharding.partition_specs(odd, rules, mesh4, on_indivisible="replicate")
  assert s["attention"] == {"k_proj": {"kernel": P()}, "q_proj": {"kernel": P(None, "tensor")}}
  with pytest.raises(ValueError, match="no sharding rules for model family 'gpt9'"):
    sharding.family_rules("gpt9")


@needs_8
def test_bert_rules_match_the_bert_tree():
  from lowrank_jax.models import bert
  config = bert.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=16)
  params = bert.init_bert(jax.random.key(0), config)
  mesh = sharding.make_mesh("fsdp:4,tensor:2")
  specs = sharding.partition_specs(params, sharding.family_rules("bert"), mesh)
  layer = specs["encoder"]["layer_1"]
  assert layer["attention"]["query"] == {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}
  assert layer["attention"]["output"]["kernel"] == P("tensor", "fsdp")
  assert layer["attention"]["output"]["bias"] == P()
  assert layer["intermediate"]["kernel"] == P("fsdp", "tensor")
  assert layer["output"]["kernel"] == P("tensor", "fsdp")
  assert layer["output"]["LayerNorm"]["scale"] == P()
  assert specs["embeddings"]["word_embeddings"]["embedding"] == P("tensor", "fsdp")


@needs_8
def test_phi_specs_of_a_chain_and_sharded_chain_step():
  """chain(lora, full) gives a tuple phi: LoRA factors follow the base's axes, the fully
  trained bias the bias's spec; the sharded step equals the unsharded one."""
  theta0, batch = _mlp_setup(jax.random.key(0))
  reparam = lj.chain(lj.lora(r"kernel", rank=4, alpha=8), lj.full(r"bias"))
  phi = jax.tree.map(lambda a: a + 0.01, reparam.init(jax.random.key(1), theta0))
  mesh = sharding.make_mesh("data:2,model:4")
  specs = sharding.partition_specs(theta0, [(r"l1/kernel", P(None, "model")), (r"l1/bias", P("model")),
                                            (r"l2/kernel", P("model", None))], mesh)
  pspecs = sharding.phi_specs(phi, theta0, specs)
  assert isinstance(pspecs, tuple) and len(pspecs) == 2
  lora_s, full_s = pspecs
  assert lora_s["l1"]["kernel"] == {"a": P(), "b": P(None, "model")}
  assert lora_s["l2"]["kernel"] == {"a": P("model", None), "b": P()}
  assert lora_s["l1"]["bias"] is None and full_s["l1"]["kernel"] is None
  assert full_s["l1"]["bias"] == {"w": P("model")} and full_s["l2"]["bias"] == {"w": P()}
  opt = optax.sgd(0.1, momentum=0.9)
  step = train.make_train_step(reparam, opt, _loss, donate=False)
  ref = step(phi, opt.init(phi), theta0, batch, None)
  sphi = sharding.shard(phi, pspecs, mesh)
  out = step(sphi, sharding.like(opt.init(sphi), sphi, pspecs, mesh), sharding.shard(theta0, specs, mesh),
             sharding.shard(batch, {"x": P("data"), "y": P("data")}, mesh), None)
  chex.assert_trees_all_close(out[0], ref[0], atol=1e-5, rtol=1e-5)


def test_adapter_spec_rules():
  """Placement of adapter arrays from the base spec: LoRA factors, DoRA magnitude, N-d bases."""
  spec = P("fsdp", "tensor")
  assert sharding._adapter_spec((64, 8), (64, 32), spec) == P("fsdp", None)     # a [in, r]
  assert sharding._adapter_spec((8, 32), (64, 32), spec) == P(None, "tensor")   # b [r, out]
  assert sharding._adapter_spec((32,), (64, 32), spec) == P("tensor")           # per-output vector
  assert sharding._adapter_spec((64, 32), (64, 32), spec) == spec               # full
  assert sharding._adapter_spec((3, 3), (64, 32), spec) == P()
  # [E, D, F] seen as [E, D*F] (in_ndim=1): a [E, r] takes the expert entry; b [r, D*F] needs
  # the D entry alone (F unsharded)
  e3 = P("expert", "fsdp", None)
  assert sharding._adapter_spec((4, 8), (4, 16, 32), e3) == P("expert", None)
  assert sharding._adapter_spec((8, 16 * 32), (4, 16, 32), e3) == P(None, "fsdp")
  assert sharding._adapter_spec((8, 16 * 32), (4, 16, 32), P("expert", "fsdp", "tensor")) == P()


@needs_8
@pytest.mark.parametrize("name", ["adamw", "galore", "adam8bit", "offload"])
def test_like_places_state_and_the_step_compiles_once(name):
  """Optimizer state placed like its parameters (GaLore's projector and low-rank moments on
  the shared axis, offloaded pages in host memory); the second and third steps reuse the
  first compilation; the result equals the unsharded step."""
  import warnings
  from lowrank_jax import optim
  k = jax.random.split(jax.random.key(0), 4)
  theta0 = {"l1": {"kernel": jax.random.normal(k[0], (64, 128)) / 8, "bias": jnp.zeros(128)},
            "l2": {"kernel": jax.random.normal(k[1], (128, 64)) / 8, "bias": jnp.zeros(64)}}
  batch = {"x": jax.random.normal(k[2], (16, 64)), "y": jax.random.randint(k[3], (16,), 0, 64)}
  opt = {"adamw": lambda: optax.adamw(1e-3),
         "galore": lambda: optim.galore_adamw(1e-3, rank=8, update_proj_gap=2),
         "adam8bit": lambda: optim.adamw_8bit(1e-3, min_8bit_size=1024),
         "offload": lambda: optim.offload(optax.adamw(1e-3), enabled=True)}[name]()
  reparam = lj.full(r".*")
  phi = reparam.init(jax.random.key(1), theta0)
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  specs = sharding.partition_specs(theta0, [(r"l1/kernel", P("fsdp", "tensor")), (r"l1/bias", P("tensor")),
                                            (r"l2/kernel", P("tensor", "fsdp"))], mesh)
  pspecs = sharding.phi_specs(phi, theta0, specs)
  raw = train.make_train_step(reparam, opt, _loss, donate=False, jit=False)
  ref_phi, ref_state, ref_step = phi, opt.init(phi), jax.jit(raw)
  for _ in range(3):
    ref_phi, ref_state, _ = ref_step(ref_phi, ref_state, theta0, batch, None)
  sphi = sharding.shard(phi, pspecs, mesh)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    state = sharding.like(opt.init(sphi), sphi, pspecs, mesh)
  step = sharding.jit_train_step(raw, donate=False)
  t0, sbatch = sharding.shard(theta0, specs, mesh), sharding.shard(batch, {"x": P("data"), "y": P("data")}, mesh)
  placed = jax.tree.map(lambda x: x.sharding, state)
  for _ in range(3):
    sphi, state, _ = step(sphi, state, t0, sbatch, None)
  assert step._cache_size() == 1
  assert jax.tree.map(lambda x: x.sharding, state) == placed
  chex.assert_trees_all_close(sphi, ref_phi, atol=2e-5, rtol=2e-5)
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
  specs_of = {p: x.sharding.spec for p, x in flat.items()}
  if name == "adamw":
    assert specs_of["[0].mu['l1']['kernel']['w']"] == P("fsdp", "tensor")
    assert specs_of["[0].nu['l2']['kernel']['w']"] == P("tensor", "fsdp")
    assert specs_of["[0].mu['l1']['bias']['w']"] == P("tensor")
    assert specs_of["[0].count"] == P()
  if name == "galore":  # l1 [64, 128] projects left: U [64, 8], moments [8, 128]; l2 right
    assert specs_of["[0].projector['l1']['kernel']['w']"] == P("fsdp", None)
    assert specs_of["[0].inner_state.mu['l1']['kernel']['w']"] == P(None, "tensor")
    assert specs_of["[0].projector['l2']['kernel']['w']"] == P(None, "fsdp")
    assert specs_of["[0].inner_state.nu['l2']['kernel']['w']"] == P("tensor", None)
  if name == "adam8bit":  # 8-bit moments in the row layout: codes shaped and split like the kernel
    assert specs_of["[0].mu['l1']['kernel']['w'].codes"] == P("fsdp", "tensor")
    assert flat["[0].nu['l2']['kernel']['w'].codes"].shape == (128, 64)
    assert specs_of["[0].nu['l2']['kernel']['w'].codes"] == P("tensor", "fsdp")
  if name == "offload":
    kinds = {x.sharding.memory_kind for x in flat.values()}
    assert kinds == {"pinned_host"}
    assert specs_of[".pages.states['l1/kernel/w'][0].mu['l1/kernel/w']"] == P("fsdp", "tensor")


_HLO = """
  %all-gather.39 = f32[256,8]{1,0} all-gather(%param.17), channel_id=78, dimensions={0}
  ROOT %ar = (f32[4]{0}, bf16[2,2]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %rs = bf16[16,4]{1,0} reduce-scatter(%x), dimensions={0}, to_apply=%add
  %a2a = s32[8,2]{1,0} all-to-all(%y), dimensions={0}
  %cp.1 = u8[10]{0} collective-permute(%z), source_target_pairs={{0,1}}
  %ags = ((u8[4,8]{1,0}), u8[32,8]{1,0}) all-gather-start(%codes), dimensions={0}
  %agd = u8[32,8]{1,0} all-gather-done(%ags)
  %cps = (f32[6]{0}, f32[6]{0}, u32[], u32[]) collective-permute-start(%w), source_target_pairs={{0,1}}
  %not = f32[8]{0} add(%all-gather.39, %x)
"""


def test_hlo_collective_parser():
  from bench import collectives
  ops = collectives.parse_collectives(_HLO)
  assert [(o.kind, o.dtype, o.nbytes) for o in ops] == [
      ("all-gather", "f32", 256 * 8 * 4), ("all-reduce", "f32", 16 + 8), ("reduce-scatter", "bf16", 128),
      ("all-to-all", "s32", 64), ("collective-permute", "u8", 10), ("all-gather", "u8", 256),
      ("collective-permute", "f32", 24)]
  s = collectives.summarize(ops)
  assert s["all-gather"]["count"] == 2 and s["all-gather"]["bytes_by_dtype"] == {"f32": 8192, "u8": 256}
  assert s["collective-permute"] == {"count": 2, "bytes": 34, "bytes_by_dtype": {"u8": 10, "f32": 24}}


@needs_8
def test_hlo_collective_parser_on_a_compiled_gather():
  """Replicating an fsdp-sharded [64, 32] float32 array all-gathers 8 KiB per device."""
  from bench import collectives
  mesh = sharding.make_mesh("fsdp:8")
  x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("fsdp")))
  text = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
  s = collectives.summarize(collectives.parse_collectives(text))
  assert s["all-gather"]["count"] == 1 and s["all-gather"]["bytes"] == 64 * 32 * 4
  assert sum(v["count"] for v in s.values()) == 1


# ------------------------------------------------------------------- quantized bases

def _codec_cases():
  from lowrank_jax.quant import Quant4
  rng = np.random.default_rng(0)
  x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  enc = jax.jit(Quant4.encode, static_argnames=("block_size", "double_quant", "quant_type", "icq"))
  return [("w dq", enc(x(64, 512), block_size=64, double_quant=True)),
          ("w plain bs128", enc(x(16, 256), block_size=128, double_quant=False, quant_type="fp4")),
          ("bf16", enc(x(16, 128).astype(jnp.bfloat16), block_size=64, double_quant=True)),
          ("rows span blocks", enc(x(4, 96), block_size=64, double_quant=True)),
          ("icq int8", enc(x(4, 512) + 0.3, block_size=64, double_quant=True, icq=True)),
          ("3-d", enc(x(2, 4, 128), block_size=64, double_quant=True))]


@pytest.mark.slow
def test_quant4_row_layout_is_the_same_bits():
  """rows() re-lays the bytes out per row (packed [..., last/2], scales [..., last/block]);
  decode and error bound are bit-identical, flat() gives bitsandbytes' buffers back."""
  from lowrank_jax.quant import Blockwise8, Quant4
  cases = _codec_cases()
  for name, q in cases:
    r = q.rows()
    assert r.row_layout and not q.row_layout, name
    assert r.packed.shape == q.shape[:-1] + (q.shape[-1] // 2,), name
    if q.shape[-1] % q.block_size == 0:
      scales = r.absmax.codes if r.double_quant else r.absmax
      assert scales.shape == q.shape[:-1] + (q.shape[-1] // q.block_size,), name
    decode, bound = jax.jit(lambda q: q.decode()), jax.jit(lambda q: q.error_bound())
    np.testing.assert_array_equal(np.asarray(decode(r)), np.asarray(decode(q)), err_msg=name)
    np.testing.assert_array_equal(np.asarray(bound(r)), np.asarray(bound(q)), err_msg=name)
    chex.assert_trees_all_equal(r.flat(), q)
    assert r.rows() is r and r.nbytes == q.nbytes
  odd = Quant4.encode(jnp.ones((3, 333)), 64)
  assert odd.rows() is odd  # a byte would span two rows: stays flat
  b = Blockwise8.encode(jnp.asarray(np.random.default_rng(1).standard_normal((16, 512)), jnp.float32))
  br = b.rows()
  assert br.codes.shape == (16, 512) and br.absmax.shape == (16, 2)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.decode())(br)), np.asarray(b.decode()))
  chex.assert_trees_all_equal(br.flat(), b)
  bs = Blockwise8.encode(jnp.ones((8, 96)), 256).rows()  # blocks span rows: absmax stays flat
  assert bs.codes.shape == (8, 96) and bs.absmax.shape == (3,)
  bound = jax.jit(lambda q: q.error_bound())
  np.testing.assert_array_equal(np.asarray(bound(bs)), np.asarray(bound(bs.flat())))
  with pytest.raises(ValueError, match=r"packed codes have shape \(64, 255\) but shape \(64, 512\) "
                                       r"needs \(64, 256\)"):
    dataclasses.replace(cases[0][1].rows(), packed=jnp.zeros((64, 255), jnp.uint8)).decode()


@needs_8
@pytest.mark.slow
def test_quantized_leaves_through_the_helpers():
  """QuantizedWeight leaves take the weight's spec (tensor-parallel rules, fsdp_specs): the
  codes and per-block scales are sharded with it; an indivisible spec is a clear error."""
  from lowrank_jax import quant
  k = jax.random.split(jax.random.key(0), 3)
  theta0 = {"attention": {"q_proj": {"kernel": jax.random.normal(k[0], (128, 256)) / 8},
                          "o_proj": {"kernel": jax.random.normal(k[1], (256, 128)) / 8}},
            "norm": {"scale": jnp.ones(128)}}
  tq = quant.quantize(theta0, r"kernel$", codec="nf4")
  mesh = sharding.make_mesh("fsdp:2,tensor:4")
  specs = sharding.partition_specs(tq, sharding.decoder_sharding_rules(), mesh)
  assert specs["attention"]["q_proj"]["kernel"] == P("fsdp", "tensor")
  placed = sharding.shard(tq, specs, mesh)
  q = placed["attention"]["q_proj"]["kernel"]
  assert q.q.packed.shape == (128, 128) and q.q.packed.sharding.spec == P("fsdp", "tensor")
  assert q.q.absmax.codes.shape == (128, 4) and q.q.absmax.codes.sharding.spec == P("fsdp", "tensor")
  assert q.q.packed.addressable_shards[0].data.shape == (64, 32)
  assert q.compute_sharding == NamedSharding(mesh, P(None, "tensor"))  # gathered over fsdp only
  o = placed["attention"]["o_proj"]["kernel"]
  assert o.q.packed.sharding.spec == P("tensor", "fsdp")
  np.testing.assert_array_equal(np.asarray(o.materialize()), np.asarray(tq["attention"]["o_proj"]["kernel"]
                                                                        .materialize()))
  fs = sharding.fsdp_specs(tq, sharding.make_mesh("fsdp:8"), min_size=1000)
  assert fs["attention"]["q_proj"]["kernel"] == P(None, "fsdp")  # the larger axis, bytes divide
  sharding.shard(tq, fs, sharding.make_mesh("fsdp:8"))
  bad = quant.quantize({"w": jnp.ones((64, 36))}, r"w")
  with pytest.raises(ValueError, match=r"leaf 'w' of shape \(64, 36\) \(QuantizedWeight\): nf4: the last "
                                       r"axis \(36, 18 bytes\) does not split into 4 shards"):
    sharding.partition_specs(bad, [("w", P(None, "tensor"))], mesh)
  with pytest.warns(UserWarning, match="replicated instead of sharded: leaf 'w'"):
    assert sharding.partition_specs(bad, [("w", P(None, "tensor"))], mesh,
                                    on_indivisible="replicate")["w"] == P()


def _qlora_step_setup(mesh_spec, rules):
  from lowrank_jax import quant
  k = jax.random.split(jax.random.key(0), 4)
  theta0 = {"l1": {"kernel": jax.random.normal(k[0], (128, 256)) / 8, "bias": jnp.zeros(256)},
            "l2": {"kernel": jax.random.normal(k[1], (256, 128)) / 8, "bias": jnp.zeros(128)}}
  batch = {"x": jax.random.normal(k[2], (64, 128)), "y": jax.random.randint(k[3], (64,), 0, 128)}
  tq = quant.quantize(theta0, r"kernel$", codec="nf4")
  reparam = lj.lora(r"kernel", rank=4, alpha=8)
  phi = jax.tree.map(lambda a: a + 0.01, reparam.init(jax.random.key(1), tq))
  opt = optax.sgd(0.1)
  raw = train.make_train_step(reparam, opt, _loss, donate=False, jit=False)
  ref = jax.jit(raw)(phi, opt.init(phi), tq, batch, None)
  mesh = sharding.make_mesh(mesh_spec)
  specs = sharding.partition_specs(tq, rules, mesh)
  pspecs = sharding.phi_specs(phi, tq, specs)
  sphi = sharding.shard(phi, pspecs, mesh)
  args = (sphi, sharding.like(opt.init(sphi), sphi, pspecs, mesh), sharding.shard(tq, specs, mesh),
          sharding.shard(batch, {"x": P(mesh.axis_names[0]), "y": P(mesh.axis_names[0])}, mesh), None)
  step = sharding.jit_train_step(raw, donate=False)
  return step, args, ref


@needs_8
@pytest.mark.parametrize("layout", ["fsdp", "tensor"])
def test_qlora_step_on_a_mesh_moves_codes_not_decoded_weights(layout):
  """FSDP: the 4-bit codes (uint8) are all-gathered, never a decoded float weight;
  tensor parallel: no weight is gathered at all. Both equal the unsharded step."""
  from bench import collectives
  if layout == "fsdp":
    step, args, ref = _qlora_step_setup("fsdp:8", [(r"kernel", P("fsdp"))])
  else:
    step, args, ref = _qlora_step_setup("data:2,tensor:4", [(r"l1/kernel", P(None, "tensor")),
                                                            (r"l2/kernel", P("tensor", None))])
  out = step(*args)
  chex.assert_trees_all_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[2]["loss"], ref[2]["loss"], rtol=1e-5)
  ops = collectives.parse_collectives(step.lower(*args).compile().as_text())
  gathers = [o for o in ops if o.kind == "all-gather"]
  weight_bytes = 128 * 256 * 4  # a decoded float32 kernel
  assert not [o for o in gathers if o.dtype != "u8" and o.nbytes >= weight_bytes / 8], gathers
  if layout == "fsdp":
    u8 = sum(o.nbytes for o in gathers if o.dtype == "u8")
    # both kernels' codes (and their 8-bit scales), forward and backward (l1's dx is not needed)
    assert 128 * 128 * 1.0 <= u8 <= 2 * 2 * 128 * 128 * 1.1, u8
  else:
    assert not [o for o in gathers if o.dtype == "u8"], gathers


@needs_8
def test_gather_at_use_dense_fsdp_step():
  """Dense kernels under FSDP with gather_at_use: each kernel is all-gathered inside its
  matmul (forward, and again backward where its input gradient is needed), nothing else
  is moved but the adapter gradients' all-reduce; the step equals the unsharded one."""
  from bench import collectives
  k = jax.random.split(jax.random.key(0), 4)
  theta0 = {"l1": {"kernel": jax.random.normal(k[0], (128, 256)) / 8, "bias": jnp.zeros(256)},
            "l2": {"kernel": jax.random.normal(k[1], (256, 128)) / 8, "bias": jnp.zeros(128)}}
  batch = {"x": jax.random.normal(k[2], (64, 128)), "y": jax.random.randint(k[3], (64,), 0, 128)}
  reparam = lj.lora(r"kernel", rank=4, alpha=8)
  phi = jax.tree.map(lambda a: a + 0.01, reparam.init(jax.random.key(1), theta0))
  opt = optax.sgd(0.1)
  raw = train.make_train_step(reparam, opt, _loss, donate=False, jit=False)
  ref = jax.jit(raw)(phi, opt.init(phi), theta0, batch, None)
  mesh = sharding.make_mesh("fsdp:8")
  specs = sharding.partition_specs(theta0, [(r"kernel", P("fsdp"))], mesh)
  t0 = sharding.gather_at_use(sharding.shard(theta0, specs, mesh), specs, mesh)
  w = t0["l1"]["kernel"]
  assert isinstance(w, sharding.GatherAtUse) and w.compute_sharding == NamedSharding(mesh, P())
  assert t0["l1"]["bias"] is not None and not lj.lazy.is_lazy(t0["l1"]["bias"])
  np.testing.assert_array_equal(np.asarray(w.materialize()), np.asarray(theta0["l1"]["kernel"]))
  pspecs = sharding.phi_specs(phi, theta0, specs)
  assert pspecs["l1"]["kernel"] == {"a": P(), "b": P()}  # small factors stay off the fsdp axis
  sphi = sharding.shard(phi, pspecs, mesh)
  args = (sphi, sharding.like(opt.init(sphi), sphi, pspecs, mesh), t0,
          sharding.shard(batch, {"x": P("fsdp"), "y": P("fsdp")}, mesh), None)
  step = sharding.jit_train_step(raw, donate=False)
  out = step(*args)
  chex.assert_trees_all_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
  s = collectives.summarize(collectives.parse_collectives(step.lower(*args).compile().as_text()))
  assert s["all-gather"]["count"] == 3 and s["all-gather"]["bytes"] == 3 * 128 * 256 * 4
  assert s["all-to-all"]["count"] == s["collective-permute"]["count"] == 0


def test_config_mesh_dcn_names_axes_of_the_mesh():
  from lowrank_jax.trainer.config import ConfigError, from_dict
  raw = {"name": "x", "model": {"random": {"vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
                                           "num_attention_heads": 1, "intermediate_size": 8}},
         "mesh": {"mesh": "data:2,fsdp:2,tensor:2", "dcn": "data:2"}}
  assert from_dict(raw).mesh.dcn == "data:2"
  with pytest.raises(ConfigError, match=r"mesh\.dcn: the mesh 'data:2,fsdp:2,tensor:2' has no axis 'dta'"):
    from_dict({**raw, "mesh": {"mesh": "data:2,fsdp:2,tensor:2", "dcn": "dta:2"}})
  with pytest.raises(ConfigError, match=r"mesh\.dcn: bad mesh spec part"):
    from_dict({**raw, "mesh": {"mesh": "data:2,fsdp:2,tensor:2", "dcn": "data"}})
