"""Helpers running a microbatched transform under each named-axis mapping."""

import jax
from jax.sharding import PartitionSpec as P

AXIS = "mb"
DEVICES = 4


def split_for_members(tree, members=DEVICES):
  """(M, ...) leaves -> (members, M // members, ...) leaves."""
  return jax.tree.map(
      lambda x: x.reshape((members, x.shape[0] // members) + x.shape[1:]),
      tree)


def run_mapped(mapping, step, grads, state, extra=None):
  """Runs ``step(grads, state, extra)`` with the microbatch axis on a named axis.

  ``step`` must reduce with collectives over AXIS; its outputs are identical
  on every member, so the first member's copy is returned.
  """
  if mapping == "pmap":
    out = jax.pmap(step, axis_name=AXIS, in_axes=(0, None, 0),
                   devices=jax.devices()[:DEVICES])(
                       split_for_members(grads), state,
                       split_for_members(extra) if extra is not None else None)
    return jax.tree.map(lambda x: x[0], out)
  if mapping == "vmap":
    out = jax.jit(jax.vmap(step, axis_name=AXIS, in_axes=(0, None, 0)))(
        split_for_members(grads), state,
        split_for_members(extra) if extra is not None else None)
    return jax.tree.map(lambda x: x[0], out)
  if mapping == "shard_map":
    mesh = jax.make_mesh((DEVICES,), (AXIS,),
                         devices=jax.devices()[:DEVICES])
    mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(AXIS), P(), P(AXIS)),
                           out_specs=P())
    shard = lambda t: jax.device_put(
        t, jax.sharding.NamedSharding(mesh, P(AXIS)))
    replicate = lambda t: jax.device_put(t, jax.sharding.NamedSharding(mesh, P()))
    return jax.jit(mapped)(shard(grads), replicate(state),
                           None if extra is None else shard(extra))
  raise ValueError(mapping)


# jax.pmap is in maintenance mode: tests/test_named_axis.py keeps a few pmap
# cases, the rest run the current mappings.
CURRENT_MAPPINGS = ["shard_map", "vmap"]
