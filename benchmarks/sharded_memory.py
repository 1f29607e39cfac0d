r"""Per-device memory and time of each family's update on a sharded
microbatch axis: GSPMD on the stacked axis against ``shard_map``.

For each number of devices ``D`` (simulated CPU devices; the flag is set
here before JAX starts) and each family's default optimizer, the update of
one ``--shape`` parameter from ``M`` microbatch gradients is compiled:

* ``gspmd_auto`` / ``gspmd_explicit``: ``jit`` on a ``data=D`` mesh (Auto /
  Explicit axes) with the stacked microbatch axis sharded over ``data``;
* ``shard_map``: the same transform with ``axis_name="data"`` under
  ``shard_map``, ``M / D`` microbatches per device;
* ``optax_adamw``: ``optax.adamw`` on ``jnp.mean(g, 0)`` under GSPMD, the
  cost of not correcting anything.

Records XLA's per-device memory (``harness.memory``: temp is the scratch),
whether the program all-gathers, and interleaved per-call wall and process
CPU time. Sophia's update is a curvature refresh; Shampoo's program holds
its root step. On this 2-core machine the ``D`` devices share two cores, so
a time is the total work of a step, not a pod's latency::

  python -m benchmarks.sharded_memory           # D = 1 2 4 8, M = 8
  python -m benchmarks.sharded_memory --quick   # a smoke run

Results are saved after every cell; rerunning the same command resumes.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}"

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import bcopt
from benchmarks import harness

MODULE = "benchmarks.sharded_memory"
DOC = harness.ROOT / "docs" / "scale_out.md"  # its table, between markers
FAMILIES = {"adam": bcopt.adamw_bc, "sophia": bcopt.sophia_bc,
            "shampoo": bcopt.shampoo_bc}
MODES = ("gspmd_auto", "gspmd_explicit", "shard_map", "optax_adamw")


def programs(family: str, mode: str, d: int, args):
  """``(fn(state, grads) -> (updates, state), state, grads)`` on ``d``
  devices, inputs placed on the mesh."""
  axis_type = AxisType.Explicit if mode == "gspmd_explicit" else AxisType.Auto
  mesh = jax.make_mesh((d,), ("data",), axis_types=(axis_type,),
                       devices=jax.devices()[:d])
  params = {"w": jnp.ones(args.shape)}
  grads = {"w": jax.random.normal(jax.random.key(0),
                                  (args.microbatches,) + tuple(args.shape))}
  extra = (lambda g: {"curvature": jax.tree.map(jnp.square, g)}
           if family == "sophia" else {})
  if mode == "optax_adamw":
    tx = optax.adamw(1e-3)
    step = lambda s, g: tx.update(
        jax.tree.map(lambda x: jnp.mean(x, 0), g), s, params)
  elif mode == "shard_map":
    tx = FAMILIES[family](1e-3, axis_name="data")
    step = jax.shard_map(lambda s, g: tx.update(g, s, params, **extra(g)),
                         mesh=mesh, in_specs=(P(), P("data")),
                         out_specs=P())
  else:
    tx = FAMILIES[family](1e-3)
    step = lambda s, g: tx.update(g, s, params, **extra(g))
  put = lambda t, spec: jax.device_put(t, NamedSharding(mesh, spec))
  return mesh, step, put(tx.init(params), P()), put(grads, P("data"))


def measure(args, log, rows: dict, save) -> dict:
  """Fills ``rows`` cell by cell (a family on ``D`` devices), calling
  ``save()`` after each; cells already in ``rows`` are kept."""
  for d in args.devices:
    for family in args.families:
      if all(f"{family} D={d} {mode}" in rows for mode in MODES):
        continue
      runners = {}
      for mode in MODES:
        mesh, step, state, grads = programs(family, mode, d, args)
        with jax.set_mesh(mesh):
          runners[mode] = harness.Runner(jax.jit(step), state, grads,
                                         donate=False)
        text = runners[mode].compiled.as_text()
        rows[f"{family} D={d} {mode}"] = {
            "family": family, "devices": d, "mode": mode,
            "memory": harness.memory(runners[mode].compiled),
            "all_gather": "all-gather" in text}
      harness.time_rounds(runners, args.rounds, warmup=args.warmup, log=log)
      for mode, runner in runners.items():
        row = rows[f"{family} D={d} {mode}"]
        row.update(time=harness.stats(runner),
                   compile_s=round(runner.compile_s, 2))
        log(f"{family} D={d} {mode}: temp "
            f"{row['memory']['temp'] / 2**20:.2f} MiB, all-gather "
            f"{row['all_gather']}, {row['time']['median_ms']:.1f} ms")
      save()
  return rows


def markdown(rows: dict, args) -> str:
  mib = lambda b: f"{b / 2**20:.2f}"
  body = [[r["family"], r["devices"], r["mode"], mib(r["memory"]["temp"]),
           mib(r["memory"]["argument"]), "yes" if r["all_gather"] else "no",
           f"{r['time']['median_ms']:.1f}",
           f"{r['time']['cpu_median_ms']:.1f}"] for r in rows.values()]
  return (f"Parameter {tuple(args.shape)}, M = {args.microbatches}; per "
          "device MiB, per call ms (all devices on 2 cores).\n\n"
          + harness.table(["family", "D", "program", "temp MiB", "args MiB",
                           "all-gather", "wall ms", "CPU ms"], body))


def parse_args(argv=None):
  p = harness.parser(MODULE, __doc__)
  add = p.add_argument
  add("--devices", type=int, nargs="+", help="default 1 2 4 8 (2 --quick)")
  add("--families", nargs="+", choices=sorted(FAMILIES),
      default=sorted(FAMILIES))
  add("--shape", type=int, nargs=2, help="default 1024 1024 (64 32 --quick)")
  add("--microbatches", type=int, default=8)
  add("--rounds", type=int, help="default 5 (1 with --quick)")
  add("--warmup", type=int, default=1)
  add("--quick", action="store_true", help="a smoke run; no RESULTS.md")
  add("--out", help="JSON (default results/sharded_memory[_quick].json)")
  args = p.parse_args(argv)
  args.devices = args.devices or ([2] if args.quick else [1, 2, 4, 8])
  args.shape = args.shape or ([64, 32] if args.quick else [1024, 1024])
  args.rounds = args.rounds or (1 if args.quick else 5)
  if max(args.devices) > jax.device_count():
    p.error(f"--devices up to {jax.device_count()} here (XLA_FLAGS)")
  if any(args.microbatches % d for d in args.devices):
    p.error("every --devices value must divide --microbatches")
  args.out = args.out or str(harness.RESULTS_DIR / (
      "sharded_memory_quick.json" if args.quick else "sharded_memory.json"))
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  env = harness.environment()
  command = harness.command(MODULE, argv)
  old = harness.read_json(args.out, {})
  rows = dict(old.get("rows", {})) if old.get("command") == command else {}
  result = {"command": command, "config": vars(args), "rows": rows,
            "environment": env}

  def save():  # after every cell: an interrupted run resumes from here
    result.update(markdown=markdown(rows, args),
                  environment=harness.finish(env))
    harness.write_json(args.out, result)

  measure(args, lambda s: print(s, flush=True), rows, save)
  save()
  print(result["markdown"])
  if not args.quick:
    harness.write_section("sharded_memory", (
        f"## Sharded microbatch axis: memory (`{result['command']}`)\n\n"
        + result["markdown"]))
    harness.write_section("sharded_memory", (
        f"{result['markdown']}\n\n`{command}`"
        " (benchmarks/results/sharded_memory.json)"), DOC)
  return result


if __name__ == "__main__":
  main()
