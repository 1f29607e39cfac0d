"""Per-device memory of the LM example's train step, compiled abstractly.

What ``python -m examples.lm.train --dry-run`` prints (``train.step_memory``:
XLA's buffer assignment of the compiled step, nothing allocated) for the
``qwen2.5-0.5b`` preset with Qwen2.5's vocabulary (494M parameters), M x 8
sequences of 1024 tokens, at M in {8, 32}, ``--microbatch-mode`` vmap and
scan, ``--grad-dtype`` float32 and bfloat16, on the meshes data=1, data=8
and data=8,fsdp=8 (64 devices: data alone would need M >= 64): AdamW-BC
(LOO + jackknife) next to plain AdamW on the mean gradient (``--optimizer
adamw``, the same step). Steps compile with ``--fast-compile`` (the sizes
match full optimisation to a few hundred bytes; docs/scale_out.md). Cells
are measured in order and saved one by one; a rerun skips saved cells, so
``--max-minutes`` bounds a run; ``--report-only`` rewrites the table in
docs/scale_out.md and README.md from the JSON. Needs 64 (simulated)
devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=64 python -m benchmarks.lm_memory
"""

import itertools
import time

import jax

from benchmarks import harness
from examples.lm import config as config_lib
from examples.lm import train

OUT = harness.RESULTS_DIR / "lm_memory.json"
BASE = ["--preset", "qwen2.5-0.5b", "--vocab-size", "151936",
        "--microbatch-size", "8", "--seq-len", "1024", "--fast-compile"]
MESHES = ("data=8", "data=1", "data=8,fsdp=8")


# Measured first (a cell of AdamW-BC compiles in about 9 minutes on the
# loaded 2-core CPU): the comparisons the table is for.
FIRST = [("adamw_bc", 8, "scan", "float32", "data=8"),
         ("adamw", 8, "scan", "float32", "data=8"),
         ("adamw_bc", 8, "scan", "bfloat16", "data=8"),
         ("adamw_bc", 32, "scan", "float32", "data=8"),
         ("adamw_bc", 32, "vmap", "float32", "data=8"),
         ("adamw_bc", 32, "scan", "bfloat16", "data=8"),
         ("adamw_bc", 8, "scan", "float32", "data=8,fsdp=8"),
         ("adamw", 32, "scan", "float32", "data=8"),
         ("adamw", 32, "vmap", "float32", "data=8"),
         ("adamw_bc", 8, "scan", "float32", "data=1"),
         ("adamw_bc", 8, "vmap", "float32", "data=1")]


def cells():
  """``(optimizer, M, mode, grad dtype, mesh)``, FIRST first."""
  grid = itertools.product((8, 32), MESHES, ("scan", "vmap"),
                           ("float32", "bfloat16"), ("adamw_bc", "adamw"))
  return FIRST + [(opt, m, mode, dtype, mesh)
                  for m, mesh, mode, dtype, opt in grid
                  if (opt == "adamw_bc" or dtype == "float32")
                  and (opt, m, mode, dtype, mesh) not in FIRST]


def measure(cell) -> dict:
  opt, m, mode, dtype, mesh = cell
  cfg = train.parse_args(BASE + [
      "--optimizer", opt, "--microbatches", str(m), "--microbatch-mode", mode,
      "--grad-dtype", dtype, "--mesh", mesh])
  config_lib.validate(cfg)
  t0 = time.time()
  sizes = train.step_memory(cfg, config_lib.model_config(cfg, 151936))[False]
  return {"cell": dict(zip(("optimizer", "microbatches", "mode", "grad_dtype",
                            "mesh"), cell)), "bytes": sizes,
          "compile_s": round(time.time() - t0, 1),
          "argv": BASE + ["--optimizer", opt, "--microbatches", str(m),
                          "--microbatch-mode", mode, "--grad-dtype", dtype,
                          "--mesh", mesh, "--dry-run"]}


ROWS = list(itertools.product((8, 32), ("vmap", "scan"),
                              ("float32", "bfloat16")))
# README's short table: data=8, the rows that show each switch.
SHORT = ((8, "scan", "float32"), (32, "vmap", "float32"),
         (32, "scan", "float32"), (32, "scan", "bfloat16"))
PAGES = {"docs/scale_out.md": {}, "README.md": {"rows": SHORT,
                                                  "meshes": ("data=8",)}}


def report(saved: dict, rows=ROWS, meshes=MESHES) -> str:
  """The table: peak GiB of AdamW-BC (plain AdamW's in brackets)."""
  gib = lambda r: f"{r['bytes']['peak'] / 2**30:,.1f}" if r else "-"
  found = {tuple(r["cell"].values()): r for r in saved["results"]}
  return harness.table(["M", "mode", "gradients"] + list(meshes), [
      [m, mode, dtype] + [
          f"{gib(found.get(('adamw_bc', m, mode, dtype, mesh)))} "
          f"({gib(found.get(('adamw', m, mode, 'float32', mesh)))})"
          for mesh in meshes] for m, mode, dtype in rows]) + (
              "\n\nPeak memory per device in GiB (argument + output - alias "
              "+ temp of the compiled step) of AdamW-BC, plain AdamW's "
              "(float32 gradients) in brackets; qwen2.5-0.5b with 151,936 "
              "tokens, M x 8 sequences of 1024 tokens; `-`: not measured. "
              f"`{saved['command']}` (benchmarks/results/lm_memory.json).")


def parse_args(argv=None):
  p = harness.parser("benchmarks.lm_memory", __doc__)
  p.add_argument("--max-minutes", type=float, default=600,
                 help="start no new cell after this many minutes")
  p.add_argument("--report-only", action="store_true",
                 help="rewrite the tables from the JSON; measure nothing")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.report_only:
    for page, kwargs in PAGES.items():
      harness.write_section("lm_memory", report(harness.read_json(OUT),
                                                **kwargs), harness.ROOT / page)
    return
  if jax.device_count() < 64:
    raise SystemExit("needs 64 devices: XLA_FLAGS="
                     "--xla_force_host_platform_device_count=64 python -m "
                     "benchmarks.lm_memory")
  saved = harness.read_json(OUT, {"results": []})
  results, t0 = saved["results"], time.time()
  done = [tuple(r["cell"].values()) for r in results]
  for cell in cells():
    if cell in done or time.time() - t0 > 60 * args.max_minutes:
      continue
    results.append(measure(cell))
    print(results[-1]["cell"], results[-1]["bytes"]["peak"], flush=True)
    harness.write_json(OUT, {
        "command": "XLA_FLAGS=--xla_force_host_platform_device_count=64 "
                   + harness.command("benchmarks.lm_memory"),
        "environment": harness.environment(), "results": results,
        "missing": [c for c in cells()
                    if c not in [tuple(r["cell"].values()) for r in results]]})
  print(report(harness.read_json(OUT)))


if __name__ == "__main__":
  main()
