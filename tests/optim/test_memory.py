"""Memory report: bytes by partition against closed-form counts."""

import jax
import jax.numpy as jnp
import optax
import pytest

from lowrank_jax.methods.lora import lora
from lowrank_jax.optim.memory import memory_report
from lowrank_jax.optim.galore import galore_adamw
from lowrank_jax.optim.offload import offload


def _setup():
  theta0 = {"encoder": {"query": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
                        "value": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}},
            "head": {"kernel": jnp.ones((8, 3), jnp.bfloat16)}}
  phi = lora(r"(query|value)/kernel", rank=2).init(jax.random.PRNGKey(0), theta0)
  return theta0, phi


def test_lora_adamw_counts():
  theta0, phi = _setup()
  state = optax.adamw(1e-3).init(phi)
  rep = memory_report(theta0, phi, state)
  lora_bytes = 2 * (16 * 2 + 2 * 8) * 4
  assert rep.rows["encoder"]["frozen"] == 2 * (16 * 8 + 8) * 4
  assert rep.rows["head"]["frozen"] == 8 * 3 * 2
  assert rep.rows["encoder"]["trainable"] == lora_bytes == rep.rows["encoder"]["grads"]
  assert rep.rows["encoder"]["opt_state"] == 2 * lora_bytes  # mu and nu
  assert rep.rows["(shared)"]["opt_state"] == 4  # Adam's int32 count
  assert rep.total("opt_state") == 2 * lora_bytes + 4
  assert "encoder" in str(rep) and "total" in str(rep)


def test_eval_shape_and_dict_partition_and_galore():
  params = {"enc": {"w": jnp.zeros((64, 64)), "b": jnp.zeros(64)}, "cls": {"w": jnp.zeros((64, 4))}}
  tx = galore_adamw(1e-3, rank=16, where="enc/w")
  shapes = jax.eval_shape(tx.init, params)
  rep = memory_report(trainable=params, opt_state=shapes,
                      partition={"galore": "enc/w", "plain": ["enc/b", "cls"]})
  assert rep.rows["galore"]["opt_state"] == 2 * 16 * 64 * 4 + 16 * 64 * 2  # fp32 moments + bf16 P
  assert rep.rows["plain"]["opt_state"] == 2 * (64 + 64 * 4) * 4
  assert rep.rows["galore"]["grads"] == 64 * 64 * 4


def test_host_column_for_offloaded_state():
  params = {"w": jnp.zeros((32, 32))}
  state = offload(optax.adam(1e-3), enabled=True).init(params)
  rep = memory_report(trainable=params, opt_state=state)
  # the page of "w" holds its moments and its own step count
  assert rep.rows["w"]["opt_state_host"] == 2 * 32 * 32 * 4 + 4 and rep.rows["w"]["opt_state"] == 0


def test_bad_partition():
  with pytest.raises(TypeError, match="partition"):
    memory_report(trainable={"w": jnp.zeros(2)}, partition=3)
