r"""Cost of Shampoo-BC's root and cached steps, and of its correction.

For one ``d x d`` parameter (one tile: ``block_size=1024``) and ``M``
microbatch gradients, times the jitted ``bcopt.scale_by_shampoo_bc(...)
.update`` on

* a root step (step 1, so ``(t - 1) % precondition_every == 0``) for
  ``cross_fit`` in ``{None, "twofold"}`` with and without
  ``inverse_correction="jackknife"``;
* a cached (non-root) step of the default configuration (twofold +
  jackknife, ``precondition_every=10``, step 2);
* ``optax.adam`` on the same parameter, fed ``bcopt.microbatch_mean`` of the
  same gradients (on XLA:CPU ``jnp.mean`` over the microbatch axis is a slow
  single-threaded reduction, see ``optimizer_overhead.py``).

Method: one process; every variant compiled first (compile time excluded),
two warm-up calls, then rounds in which every variant runs once
(round-robin, start rotated), each call timed with ``block_until_ready``.
The state is not fed back, so every root-step call is a root step. Reported:
median, quartiles and minimum of the wall time over rounds, and the median
process CPU time (all threads). On a shared machine the wall time of the
multithreaded eigendecompositions inflates badly; the minimum and the CPU
time are the robust numbers (the JSON records the load average).

Memory: XLA's buffer assignment for the compiled step
(``memory_analysis()``): ``temp`` is the scratch memory of the step on top
of its arguments (the ``M`` gradients and the state) and outputs. The
eigenvalue variance is a sum over microbatches of ``t1 x t2`` projections
(``microbatch.sum_over_microbatches``, an unrolled loop), never one matrix
per microbatch, so a memory-minimising schedule needs O(1) projection
buffers. XLA:CPU's default *concurrency-optimised* scheduler instead runs
the independent per-microbatch products side by side and keeps one buffer
per microbatch; the script therefore also compiles every variant in a
subprocess with ``--xla_cpu_enable_concurrency_optimized_scheduler=false``
and records that ``temp`` (``temp_MiB_memory_scheduler``).

Cost model of the correction (per tile, square ``d``): the jackknife
projects each microbatch of its group on both eigenbases,
``2 x 2 d^3`` flops per microbatch. The persistent roots use all ``M``
microbatches; with ``"twofold"`` the candidate roots use the ``M / 2`` of
group B (a static slice on a stacked axis), ``6 M d^3`` flops in all,
against about ``2 x`` (two eigendecompositions per factor) plus a few
``d^3`` products for the root step without it.

Usage::

  python benchmarks/shampoo_cost.py --quick      # d = 128, M = 4; ~1 minute
  python benchmarks/shampoo_cost.py              # d in {256, 1024}, M in {4, 16}
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bcopt

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results")
MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="d = 128, M = 4, few rounds (a smoke run)")
  p.add_argument("--dims", type=int, nargs="+", default=None)
  p.add_argument("--microbatches", type=int, nargs="+", default=None)
  p.add_argument("--reps", type=int, default=None, help="timing rounds")
  p.add_argument("--max-seconds", type=float, default=120.0,
                 help="stop a configuration's rounds after this (>= 3 rounds)")
  p.add_argument("--out", default=None, help="JSON path (default:"
                 " benchmarks/results/shampoo_cost[_quick].json)")
  p.add_argument("--memory-only", action="store_true",
                 help="only compile and write temp sizes (used internally)")
  args = p.parse_args(argv)
  args.dims = args.dims or ([128] if args.quick else [256, 1024])
  args.microbatches = args.microbatches or ([4] if args.quick else [4, 16])
  args.reps = args.reps or (3 if args.quick else 7)
  args.out = args.out or os.path.join(
      RESULTS_DIR, "shampoo_cost_quick.json" if args.quick
      else "shampoo_cost.json")
  return args


def environment():
  cpu = platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), cpu)
  except OSError:
    pass
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "python": platform.python_version(), "jax": jax.__version__,
      "optax": optax.__version__, "backend": jax.default_backend(),
      "cpu_model": cpu, "cpus_usable": len(os.sched_getaffinity(0)),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "loadavg_start": list(os.getloadavg()),
  }


def variants(d, m):
  """name -> (jitted step, args): the functions timed for one (d, M)."""
  params = {"w": jnp.zeros((d, d), jnp.float32)}
  grads = {"w": jax.random.normal(jax.random.key(0), (m, d, d)) + 0.3}
  out = {}
  for scheme in (None, "twofold"):
    for estimator in (None, "jackknife"):
      tx = bcopt.scale_by_shampoo_bc(cross_fit=scheme,
                                     inverse_correction=estimator)
      state = tx.init(params)  # count 0: the call is step 1, a root step
      out[f"root {scheme or 'standard'} {estimator or 'plain'}"] = (
          jax.jit(tx.update), (grads, state, params))
  tx = bcopt.scale_by_shampoo_bc()
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  out["cached twofold jackknife"] = (jax.jit(tx.update),
                                     (grads, state, params))
  adam = optax.adam(1e-3)
  out["optax.adam"] = (
      jax.jit(lambda g, s: adam.update(bcopt.microbatch_mean(g), s)),
      (grads, adam.init(params)))
  return out


def temp_sizes(dims, microbatches):
  """'d,M,variant' -> temp MiB of the compiled step (compile only)."""
  out = {}
  for d in dims:
    for m in microbatches:
      for name, (fn, args) in variants(d, m).items():
        mem = fn.lower(*args).compile().memory_analysis()
        out[f"{d},{m},{name}"] = round(mem.temp_size_in_bytes / 2**20, 2)
  return out


def temp_sizes_with_memory_scheduler(dims, microbatches):
  """:func:`temp_sizes` in a subprocess with the memory-minimising scheduler."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MEMORY_FLAG).strip()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "memory.json")
    subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-only", "--out",
         path, "--dims", *map(str, dims), "--microbatches",
         *map(str, microbatches)], env=env, check=True)
    with open(path) as f:
      return json.load(f)


def measure(d, m, reps, max_seconds):
  runs = variants(d, m)
  compiled, memory = {}, {}
  for name, (fn, args) in runs.items():
    t0 = time.perf_counter()
    compiled[name] = fn.lower(*args).compile()
    mem = compiled[name].memory_analysis()
    memory[name] = {
        "compile_s": round(time.perf_counter() - t0, 2),
        "temp_MiB": round(mem.temp_size_in_bytes / 2**20, 2),
        "arguments_MiB": round(mem.argument_size_in_bytes / 2**20, 2),
        "outputs_MiB": round(mem.output_size_in_bytes / 2**20, 2),
    }
    for _ in range(2):
      jax.block_until_ready(compiled[name](*args))
  names = list(runs)
  samples = {n: [] for n in names}
  cpu = {n: [] for n in names}
  start = time.perf_counter()
  for rep in range(reps):
    for i in range(len(names)):
      name = names[(rep + i) % len(names)]
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled[name](*runs[name][1]))
      samples[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
    if rep >= 2 and time.perf_counter() - start > max_seconds:
      break
  timing = {}
  for name, s in samples.items():
    ms = 1e3 * np.asarray(s)
    timing[name] = {"median_ms": round(float(np.median(ms)), 2),
                    "p25_ms": round(float(np.percentile(ms, 25)), 2),
                    "p75_ms": round(float(np.percentile(ms, 75)), 2),
                    "min_ms": round(float(np.min(ms)), 2),
                    "cpu_median_ms": round(float(np.median(cpu[name])) * 1e3,
                                           2),
                    "rounds": len(s), **memory[name]}
  summary = {"gradients_MiB": round(m * d * d * 4 / 2**20, 2)}
  # On a shared machine the minimum is the least disturbed run, and the
  # process CPU time (all threads) is insensitive to waiting for a core.
  for stat in ("median_ms", "min_ms", "cpu_median_ms"):
    t = lambda n: timing[n][stat]
    summary[stat] = {
        "correction_overhead_twofold": round(
            t("root twofold jackknife") / t("root twofold plain") - 1, 3),
        "correction_overhead_standard": round(
            t("root standard jackknife") / t("root standard plain") - 1, 3),
        "root_over_adam": round(t("root twofold jackknife")
                                / t("optax.adam"), 1),
        "cached_over_adam": round(t("cached twofold jackknife")
                                  / t("optax.adam"), 1),
    }
  return {"d": d, "M": m, "timing": timing, "summary": summary}


def main(argv=None):
  args = parse_args(argv)
  if args.memory_only:
    with open(args.out, "w") as f:
      json.dump(temp_sizes(args.dims, args.microbatches), f)
    return
  command = " ".join(shlex.quote(a) for a in ["python"] + sys.argv)
  env = environment()
  print("compiling with the memory-minimising scheduler ...", flush=True)
  scheduled = temp_sizes_with_memory_scheduler(args.dims, args.microbatches)
  results = []
  for d in args.dims:
    for m in args.microbatches:
      print(f"d={d} M={m} ...", flush=True)
      r = measure(d, m, args.reps, args.max_seconds)
      for name, t in r["timing"].items():
        t["temp_MiB_memory_scheduler"] = scheduled[f"{d},{m},{name}"]
        print(f"  {name:28s} {t['median_ms']:10.2f} ms (min {t['min_ms']:.2f},"
              f" cpu {t['cpu_median_ms']:.2f})"
              f"  temp {t['temp_MiB']:8.2f} MiB"
              f" ({t['temp_MiB_memory_scheduler']:.2f} MiB with"
              " the memory scheduler)")
      results.append(r)
      print("  ", r["summary"], flush=True)
  env["loadavg_end"] = list(os.getloadavg())
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"command": command, "environment": env,
               "memory_flag": MEMORY_FLAG,
               "settings": {"reps": args.reps,
                            "max_seconds": args.max_seconds,
                            "block_size": 1024, "precondition_every": 10},
               "results": results}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
