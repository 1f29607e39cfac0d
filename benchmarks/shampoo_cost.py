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
and minimum of the process CPU time (all threads). On a shared machine the
minimum and the CPU time are the robust numbers (the JSON records the load
average at the start and end).

**OpenBLAS threads.** On CPU, ``jnp.linalg.eigh`` calls LAPACK through
SciPy's OpenBLAS, whose worker threads busy-wait. On an oversubscribed
machine (load 9 on 2 cores) a ``256 x 256`` eigendecomposition then takes
1-2 s instead of 4 ms, at random, which made earlier root-step timings
meaningless. The script therefore sets ``OPENBLAS_NUM_THREADS=1`` before
JAX starts unless the variable is already set (``--openblas-threads``
overrides it; the JSON records the value). The variant ``eigh (one
factor)`` times one ``jnp.linalg.eigh`` of a ``d x d`` factor, the unit of a
root step's cost.

Memory: XLA's buffer assignment for the compiled step
(``memory_analysis()``): ``temp`` is the scratch memory of the step on top
of its arguments (the ``M`` gradients and the state) and outputs, and
``peak`` = arguments + outputs + temp - aliased bytes. The eigenvalue
variance loops over the microbatches with a rolled ``lax.map`` (one
microbatch's tile buffers at a time), so ``temp`` does not depend on ``M``;
the summary records ``temp(M=16) - temp(M=4)`` per variant. For
comparison the script also compiles every variant in a subprocess with
XLA:CPU's memory-minimising scheduler
(``--xla_cpu_enable_concurrency_optimized_scheduler=false``) and records that
``temp`` (``temp_MiB_memory_scheduler``).

Cost model of the correction (per tile, square ``d``): the jackknife
projects each microbatch of its group on both eigenbases (``Q_L^T G_j Q_R``,
two ``d x d x d`` products, ``4 d^3`` flops: the variant ``projection (one
microbatch)`` times exactly that call of the library). The persistent roots
use all ``M`` microbatches; with ``"twofold"`` the candidate roots use the
``M / 2`` of group B (a static range on a stacked axis): ``1.5 M``
projections, ``6 M d^3`` flops, against four eigendecompositions and about
``20 d^3`` flops of products (five projections' worth) for the root step
without it. No exact computation of the SPEC's per-microbatch eigenvalues
needs fewer flops (each ``row_k(Q^T G_j)`` norm depends on all of
``Q^T G_j``). With an eigendecomposition costing ``E`` projections, the
correction adds about ``1.5 M / (4 E + 5)`` to a twofold root step; the
summary records ``E`` (``eigh_in_projections``) and the prediction
``1.5 M x projection / root`` (``predicted_overhead_twofold``; for large
``d``, where the products run at the machine's matmul rate, it comes
within a few percent of the measured overhead; for small ``d`` it also
counts 1.5 M call overheads that the step does not pay) next to the
measured ``correction_overhead_twofold``. At ``M = 16`` a
correction of at most 30% needs ``E >= 18.75``.

Usage::

  python benchmarks/shampoo_cost.py --quick      # d = 128, M = 4; ~1 minute
  python benchmarks/shampoo_cost.py              # d in {256,1024}, M in {4,16}
  python benchmarks/shampoo_cost.py --table benchmarks/results/shampoo_cost.json
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time


def _openblas_threads(argv):
  """``--openblas-threads N`` from argv, else the environment's, else 1."""
  for i, a in enumerate(argv):
    if a == "--openblas-threads" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith("--openblas-threads="):
      return a.split("=", 1)[1]
  return os.environ.get("OPENBLAS_NUM_THREADS", "1")


# Before numpy / SciPy's OpenBLAS is loaded (see the module docstring).
os.environ["OPENBLAS_NUM_THREADS"] = _openblas_threads(sys.argv)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import bcopt
from bcopt._src import shampoo as shampoo_lib  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optimizer_overhead as oo  # pylint: disable=g-import-not-at-top

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
  p.add_argument("--openblas-threads", default=None,
                 help="OPENBLAS_NUM_THREADS for LAPACK's eigh (default: the"
                 " environment's, else 1; read before JAX starts)")
  p.add_argument("--table", metavar="JSON", default=None,
                 help="print the markdown table of a results JSON and exit")
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
  """optimizer_overhead's environment plus git describe and OpenBLAS threads."""
  try:
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True,
        text=True, check=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    git = None
  return {"git": git, **oo.environment(),
          "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}


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
  factor = grads["w"][0] @ grads["w"][0].T / d + 1e-3 * jnp.eye(d)
  out["eigh (one factor)"] = (jax.jit(jnp.linalg.eigh), (factor,))
  # The correction's unit of work: one microbatch projected on both
  # eigenbases (two d x d x d products), by the library's own code.
  q = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (1, d, d)))[0]
  out["projection (one microbatch)"] = (
      jax.jit(shampoo_lib._project),  # pylint: disable=protected-access
      (q, grads["w"][:1], q))
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
        "peak_MiB": round((mem.argument_size_in_bytes
                           + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes
                           - mem.alias_size_in_bytes) / 2**20, 2),
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
                    "cpu_min_ms": round(float(np.min(cpu[name])) * 1e3, 2),
                    "rounds": len(s), **memory[name]}
  summary = {"gradients_MiB": round(m * d * d * 4 / 2**20, 2)}
  # On a shared machine the minimum is the least disturbed run, and the
  # process CPU time (all threads) is insensitive to waiting for a core.
  for stat in ("median_ms", "min_ms", "cpu_median_ms", "cpu_min_ms"):
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
        "root_twofold_plain_in_eighs": round(t("root twofold plain")
                                             / t("eigh (one factor)"), 1),
        # The cost model: the twofold jackknife projects 1.5 M microbatches
        # (M for the cached roots, M / 2 for the candidate), so it costs
        # about 1.5 M projections; E is an eigh in projections.
        "eigh_in_projections": round(t("eigh (one factor)")
                                     / t("projection (one microbatch)"), 2),
        "predicted_overhead_twofold": round(
            1.5 * m * t("projection (one microbatch)")
            / t("root twofold plain"), 3),
    }
  return {"d": d, "M": m, "timing": timing, "summary": summary}


def memory_growth(results):
  """Per d and variant: temp and gradients at the smallest and largest M."""
  out = {}
  for d in sorted({r["d"] for r in results}):
    rs = sorted((r for r in results if r["d"] == d), key=lambda r: r["M"])
    lo, hi = rs[0], rs[-1]
    if lo is hi:
      continue
    out[str(d)] = {
        "M": [lo["M"], hi["M"]],
        "gradients_MiB": [lo["summary"]["gradients_MiB"],
                          hi["summary"]["gradients_MiB"]],
        "temp_MiB": {n: [lo["timing"][n]["temp_MiB"],
                         hi["timing"][n]["temp_MiB"]]
                     for n in lo["timing"]},
    }
  return out


TABLE_COLUMNS = [
    ("root standard plain", "root, standard"),
    ("root standard jackknife", "root, standard + jackknife"),
    ("root twofold plain", "root, twofold"),
    ("root twofold jackknife", "root, twofold + jackknife"),
    ("cached twofold jackknife", "non-root step"),
    ("optax.adam", "optax.adam"),
    ("eigh (one factor)", "one eigh"),
    ("projection (one microbatch)", "one projection"),
]


def table(data):
  """Markdown table of a results JSON: median wall / CPU ms, overheads, memory.

  Each time cell is ``median wall / median process CPU`` (all threads) in
  ms; the overhead cells are the same two ratios.
  """
  lines = [
      "| d | M | " + " | ".join(h for _, h in TABLE_COLUMNS)
      + " | correction, twofold | 1.5 M projections timed alone"
      " | correction, standard"
      " | temp MiB (twofold + jackknife) | gradients MiB |",
      "|" + " --- |" * (len(TABLE_COLUMNS) + 7),
  ]
  pct = lambda x: f"{100 * x:+.0f}%"
  for r in data["results"]:
    cells = [str(r["d"]), str(r["M"])]
    for name, _ in TABLE_COLUMNS:
      t = r["timing"].get(name)  # older files have no projection row
      cells.append(f"{t['median_ms']:.4g} / {t['cpu_median_ms']:.4g}"
                   if t else "")
    wall, cpu = r["summary"]["median_ms"], r["summary"]["cpu_median_ms"]
    both = lambda key: (f"{pct(wall[key])} / {pct(cpu[key])}"
                        if key in wall else "")
    cells += [both("correction_overhead_twofold"),
              both("predicted_overhead_twofold"),
              both("correction_overhead_standard"),
              f"{r['timing']['root twofold jackknife']['temp_MiB']:.4g}",
              f"{r['summary']['gradients_MiB']:.4g}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.table:
    with open(args.table) as f:
      print(table(json.load(f)))
    return
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
              f" cpu {t['cpu_median_ms']:.2f}, cpu min {t['cpu_min_ms']:.2f})"
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
               "results": results,
               "memory_growth": memory_growth(results)}, f, indent=1)
  print(f"wrote {args.out}")
  print(table({"results": results}))


if __name__ == "__main__":
  main()
