r"""Cost of one optimizer update: bcopt's three families against optax.

Each cell (a family, a size, an M) times its compiled variants interleaved
(``harness``; compile and ``--warmup`` calls excluded, ``--max-seconds``
once 3 rounds are done): medians, ratios to the baselines, XLA's memory and
cost figures, state bytes (cost models: docs/performance.md).

* ``adam``: ``ADAM`` on LM-shaped trees against ``optax.scale_by_adam`` on
  the mean by (a) ``jnp.mean(g, 0)``, (b) ``bcopt.microbatch_mean``; clipped.
* ``sophia``: ``SOPHIA``'s refresh and cached steps against (a), (b),
  Adam-BC and ``optax.contrib.sophia``, amortized over ``REFRESH_EVERY``.
* ``shampoo``: one ``d x d`` parameter, ``SHAMPOO``'s root and other steps
  (timed in one program), ``optax.adam``, one ``eigh``, one projection;
  XLA's memory of that program and of each step kind (``root_step=``).
* ``soap``: the same for ``SOAP``'s steps with and without a basis refresh,
  against plain SOAP, with the rotations each variant needs.

``--ref COMMIT`` adds bcopt at COMMIT (``bcopt_ref``): twins ``NAME @ref``
and ``bitwise_equal_ref``. ``OPENBLAS_NUM_THREADS`` is 1 unless set (its
busy-waiting threads stall LAPACK ``eigh`` under load). Writes
``results/update_cost[_quick|_ref].json``, RESULTS.md without either::

  python -m benchmarks.update_cost --quick           # a smoke run
  python -m benchmarks.update_cost                   # every family
  python -m benchmarks.update_cost --family shampoo --dims 1024
  python -m benchmarks.update_cost --family soap --dims 1024
  python -m benchmarks.update_cost --ref HEAD~1 --family adam --sizes 2M \
      --variants "loo + jackknife"                   # and the baselines
"""

import os

# Before numpy loads SciPy's OpenBLAS (see the module docstring).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import hashlib
import importlib.util
import io
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bcopt
from bcopt._src import shampoo as shampoo_src
from benchmarks import harness

MODULE = "benchmarks.update_cost"
FAMILIES = ("adam", "sophia", "shampoo", "soap")
SIZES = {  # LM-shaped trees: (vocab, d_model, layers)
    "tiny": (64, 16, 1),    # tests only
    "2M": (2048, 256, 2),   # 2,098,432 parameters
    "16M": (8192, 512, 4)}  # 16,781,824 parameters
MICROBATCHES = {"adam": [2, 8, 32], "sophia": [8], "shampoo": [4, 16],
                "soap": [8]}
REFRESH_EVERY = 10
REF = " @ref"
A = "optax Adam on jnp.mean (a)"
B = "optax Adam on microbatch_mean (b)"
CLIP_OPTAX = "optax clip + optax Adam on microbatch_mean"
CLIP_BC = "bcopt clip + Adam-BC loo + jackknife"
ADAM_LOO = "Adam-BC loo + jackknife"
# With diagnostics=True as well (the bias monitor's cost; not with --ref).
MONITORED, MONITOR = (ADAM_LOO, "Adam-BC twofold + jackknife"), ", diagnostics"
ADAM = {  # name: (cross_fit, inverse_correction) of scale_by_adam_bc
    ADAM_LOO: ("loo", "jackknife"),
    "Adam-BC twofold + jackknife": ("twofold", "jackknife"),
    "Adam-BC symmetric + jackknife": ("symmetric", "jackknife"),
    "Adam-BC standard + jackknife": (None, "jackknife"),
    "Adam-BC loo, no correction": ("loo", None),
    "Adam-BC standard, no correction": (None, None)}
SOPHIA = {  # the same for scale_by_sophia_bc
    "Sophia-BC loo + jackknife": ("loo", "jackknife"),
    "Sophia-BC standard": (None, None)}
CONTRIB = "optax.contrib.sophia on the mean"
REFRESH, CACHED = ", refresh", ", no refresh"
# scale_by_shampoo_bc's (cross_fit, inverse_correction, variance_groups);
# "X + jackknife ..." is compared with "X".
SHAMPOO = {"standard": (None, None, None),
           "standard + jackknife K=4": (None, "jackknife", 4),
           "standard + jackknife exact": (None, "jackknife", None),
           "twofold": ("twofold", None, None),
           "twofold + jackknife K=4": ("twofold", "jackknife", 4),
           "twofold + jackknife exact": ("twofold", "jackknife", None)}
DEFAULT = "twofold + jackknife K=4"   # shampoo_bc's defaults
STEPS = {"root": 0, "non-root": 1}  # step kind: count before the call
# scale_by_soap_bc's (cross_fit, inverse_correction, variance_groups) and
# the rotations (projection-sized products) a step makes besides plain
# SOAP's three (numerator, denominator = second moment's, back): LOO
# rotates the M microbatches and mu, twofold the K leave-outs and the
# preconditioner group's mean.
SOAP = {"SOAP": (None, None, None, lambda m: 0),
        "SOAP-BC loo + jackknife": ("loo", "jackknife", 4, lambda m: m),
        "SOAP-BC twofold + jackknife K=4": ("twofold", "jackknife", 4,
                                            lambda m: min(4, m - m // 2) + 1)}
SOAP_STEPS = {"refresh": 0, "no refresh": 1}  # count before the call
DIMS = {"shampoo": [256, 1024], "soap": [1024]}  # d of the matrix families
EIGH, PROJECTION, ADAM_MEAN = "one eigh", "one projection", "optax.adam"


# Inputs, functions, the reference version ---------------------------------

def lm_gradients(size: str, m: int, seed: int = 0) -> dict[str, jax.Array]:
  """Synthetic microbatched gradients (leaves ``(M, *shape)``) of an
  LM-shaped tree: a per-coordinate mean plus noise, both of scale 1e-3."""
  vocab, d, layers = SIZES[size]
  shapes = {"embed": (vocab, d), "final_norm": (d,)}
  for i in range(layers):
    shapes |= {f"layer{i}/{k}": s for k, s in (
        ("attn_norm", (d,)), ("qkv", (d, 3 * d)), ("attn_out", (d, d)),
        ("mlp_norm", (d,)), ("mlp_in", (d, 4 * d)), ("mlp_out", (4 * d, d)))}
  key = jax.random.key(seed)
  out = {}
  for i, (name, shape) in enumerate(shapes.items()):
    k_mean, k_noise = jax.random.split(jax.random.fold_in(key, i))
    out[name] = 1e-3 * (jax.random.normal(k_mean, shape)
                        + jax.random.normal(k_noise, (m, *shape)))
  return jax.block_until_ready(out)


def update(tx, mean=None):
  """``fn(state, g, params=None, curvature=None) -> (updates, state)`` of
  ``tx.update`` for a Runner (on ``mean`` of ``g`` and ``curvature``)."""
  def fn(state, g, params=None, curvature=None):
    if mean is not None:
      g = mean(g)
      curvature = None if curvature is None else mean(curvature)
    extra = {} if curvature is None else {"curvature": curvature}
    return tx.update(g, state, params, **extra)
  return fn


def jnp_mean(g):
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), g)


def given_curvature() -> optax.GradientTransformationExtraArgs:
  """A Hessian "estimator" for optax.contrib.sophia returning ``curvature``."""
  def update_fn(updates, state, params=None, *, curvature=None, **extra):
    del updates, params, extra
    return curvature, state
  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def load_ref(ref: str, tmp: str):
  """bcopt at git commit ``ref`` as the package ``bcopt_ref`` (extracted to
  ``tmp``, its imports rewritten); returns it and the full commit."""
  def git(*a):
    return subprocess.run(["git", "-C", str(harness.ROOT), *a], check=True,
                          capture_output=True).stdout
  commit = git("rev-parse", "--verify", f"{ref}^{{commit}}").decode().strip()
  with tarfile.open(fileobj=io.BytesIO(git("archive", commit, "bcopt"))) as t:
    t.extractall(tmp, filter="data")
  root = pathlib.Path(tmp, "bcopt").rename(pathlib.Path(tmp, "bcopt_ref"))
  for path in root.rglob("*.py"):
    text = re.sub(r"\bbcopt\._src\b", "bcopt_ref._src", path.read_text())
    text = re.sub(r"^(\s*)from bcopt import", r"\1from bcopt_ref import",
                  text, flags=re.M)
    if re.search(r"^\s*(from|import)\s+bcopt\b", text, flags=re.M):
      raise ValueError(f"{path}: an import of bcopt left to rewrite")
    path.write_text(text)
  for name in [n for n in sys.modules if n.split(".")[0] == "bcopt_ref"]:
    del sys.modules[name]
  spec = importlib.util.spec_from_file_location(
      "bcopt_ref", root / "__init__.py", submodule_search_locations=[str(root)])
  module = sys.modules["bcopt_ref"] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, commit


def fingerprint(tree) -> list:
  """(path, dtype, shape, sha256 of the bytes) of every leaf of ``tree``."""
  return [(jax.tree_util.keystr(p), str(x.dtype), list(x.shape),
           hashlib.sha256(np.asarray(x).tobytes()).hexdigest())
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


# Cells ----------------------------------------------------------------------

def chosen(args, name: str) -> bool:
  """Whether ``--variants`` selects ``name`` (baselines always)."""
  return (not args.variants or name in (A, B, ADAM_MEAN, EIGH, PROJECTION)
          or any(part in name for part in args.variants))


class Cell:
  """The runners of one cell (compiled as they are added), then timed."""

  def __init__(self, args):
    self.args, self.runners, self.skipped = args, {}, {}   # by name

  def add(self, name: str, *args, **kwargs) -> None:
    """``harness.Runner(*args, **kwargs)`` as ``name``, unless not chosen
    or the scheme needs more microbatches (a ``ValueError`` when traced)."""
    if chosen(self.args, name.removesuffix(REF)):
      try:
        self.runners[name] = harness.Runner(*args, **kwargs)
      except ValueError as e:
        self.skipped[name] = str(e)

  def measure(self, baselines: dict, n_params: int) -> dict:
    """Times the runners interleaved; per variant its statistics, ratios
    to ``baselines`` ({label: name}) and, with ``--ref``, to its twin."""
    runners, args = self.runners, self.args
    first = {}  # the first call on the initial state (also a warm-up call)
    for name, r in runners.items():
      if name + REF in runners or name.endswith(REF):
        first[name] = fingerprint((r(record=False), r.state))
    load = list(os.getloadavg())
    rounds = harness.time_rounds(runners, args.reps, args.max_seconds,
                                 warmup=args.warmup)
    variants = {}
    for name, r in runners.items():
      cost = r.compiled.cost_analysis() or {}   # XLA's, per parameter
      v = variants[name] = {
          **harness.stats(r), "vs": {k: harness.ratios(r, runners[b])
                                     for k, b in baselines.items()},
          "compile_s": round(r.compile_s, 2),
          "memory": harness.memory(r.compiled),
          "state_bytes": harness.nbytes(r.state),
          "xla_per_param": {k: round(float(cost[k]) / n_params, 2) for k in (
              "bytes accessed", "flops", "transcendentals") if k in cost}}
      if name + REF in runners:
        v["vs"]["ref"] = harness.ratios(r, runners[name + REF])
        v["bitwise_equal_ref"] = first[name] == first[name + REF]
    return {"n_params": n_params, "loadavg_start": load, "rounds": rounds,
            "variants": variants, "skipped": self.skipped}


def adam_cell(size: str, m: int, libs: dict, args) -> dict:
  grads = lm_gradients(size, m)
  params = jax.tree.map(lambda x: x[0], grads)
  adam = optax.scale_by_adam()
  cell = Cell(args)
  cell.add(A, update(adam, jnp_mean), adam.init(params), grads)
  for tag, lib in libs.items():
    txs = {B: (adam, lib.microbatch_mean),
           CLIP_OPTAX: (optax.chain(optax.clip_by_global_norm(1.0), adam),
                        lib.microbatch_mean),
           CLIP_BC: (optax.chain(lib.clip_by_global_norm(1.0),
                                 lib.scale_by_adam_bc()), None)}
    for name, (cf, ic) in ADAM.items():
      txs[name] = (lib.scale_by_adam_bc(cross_fit=cf, inverse_correction=ic),
                   None)
      if name in MONITORED and not tag:  # the bias monitor's cost
        txs[name + MONITOR] = (lib.scale_by_adam_bc(
            cross_fit=cf, inverse_correction=ic, diagnostics=True), None)
    for name, (tx, mean) in txs.items():
      cell.add(name + tag, update(tx, mean), tx.init(params), grads)
  n = sum(x.size for x in jax.tree.leaves(params))
  out = {"size": size, "M": m, "ideal_fused_bytes_per_param": 4 * m + 20,
         **cell.measure({"a": A, "b": B}, n)}
  out["diagnostics_vs_plain"] = {  # timed in the same rounds
      name: harness.ratios(cell.runners[name + MONITOR], cell.runners[name])
      for name in MONITORED if name + MONITOR in cell.runners}
  return out


def sophia_cell(size: str, m: int, libs: dict, args) -> dict:
  grads = lm_gradients(size, m)
  # GNB estimates are squares: non-negative and heavy-tailed.
  curv = jax.tree.map(lambda r: 1e3 * r * r, lm_gradients(size, m, seed=1))
  params = jax.tree.map(lambda x: x[0], grads)
  adam = optax.scale_by_adam()
  contrib = optax.contrib.sophia(1.0, weight_decay=0.0,
                                 update_interval=REFRESH_EVERY,
                                 hessian_diagonal_fn=given_curvature())
  cell = Cell(args)
  cell.add(A, update(adam, jnp_mean), adam.init(params), grads)
  for kind, count in ((REFRESH, 0), (CACHED, 1)):
    cell.add(CONTRIB + kind, update(contrib, bcopt.microbatch_mean),
             contrib.init(params), grads, params, curv,
             prepare=lambda s, c=count: harness.with_count(s, c))
  for tag, lib in libs.items():
    cell.add(B + tag, update(adam, lib.microbatch_mean), adam.init(params),
             grads)
    tx = lib.scale_by_adam_bc()
    cell.add(ADAM_LOO + tag, update(tx), tx.init(params), grads)
    for name, (cf, ic) in SOPHIA.items():
      tx = lib.scale_by_sophia_bc(cross_fit=cf, inverse_correction=ic)
      cell.add(name + REFRESH + tag, update(tx), tx.init(params), grads, None,
               curv)
      cell.add(name + CACHED + tag, update(tx), tx.init(params), grads)
  n = sum(x.size for x in jax.tree.leaves(params))
  cell = {"size": size, "M": m, **cell.measure({"a": A, "b": B}, n)}
  v = cell["variants"]
  k = REFRESH_EVERY
  cell[f"amortized_every_{k}"] = {
      name: {f"{stat}_vs_{base}": round(
          (v[name + REFRESH][stat] + (k - 1) * v[name + CACHED][stat])
          / k / v[baseline][stat], 4)
             for stat in ("median_ms", "cpu_median_ms")
             for base, baseline in (("a", A), ("b", B))}
      for name in (*SOPHIA, CONTRIB) if {name + REFRESH, name + CACHED} <= set(v)}
  return cell


def matrix_cell(d: int, m: int, args):
  """One ``d x d`` parameter, ``M`` microbatch gradients and a cell holding
  the matrix families' baselines: ``optax.adam`` on the mean and one
  projection ``Q^T X Q`` (the unit of their cost models)."""
  params = {"w": jnp.zeros((d, d), jnp.float32)}
  grads = {"w": jax.random.normal(jax.random.key(0), (m, d, d)) + 0.3}
  q = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (1, d, d)))[0]
  adam = optax.adam(1e-3)
  cell = Cell(args)
  cell.add(ADAM_MEAN, update(adam, bcopt.microbatch_mean), adam.init(params),
           grads)
  cell.add(PROJECTION, stateless(shampoo_src._project),  # pylint: disable=protected-access
           jnp.zeros(()), q, grads["w"][:1], q, donate=False)
  return cell, params, grads


def stateless(f):
  return lambda s, *a: (f(*a), s)


def add_step_kinds(cell: Cell, name: str, tag: str, tx, kinds: dict, params,
                   grads):
  """``tx``'s update as one program, timed per step kind (``{kind: count
  before the call}``) as ``"{name}, {kind}{tag}"``."""
  program = update(tx)
  for kind, count in kinds.items():
    cell.add(f"{name}, {kind}{tag}", program, tx.init(params), grads, params,
             prepare=lambda s, c=count: harness.with_count(s, c))
    program = getattr(cell.runners.get(f"{name}, {kind}{tag}"), "compiled",
                      program)  # one program for all kinds


def shampoo_cell(d: int, m: int, libs: dict, args) -> dict:
  cell, params, grads = matrix_cell(d, m, args)
  factor = grads["w"][0] @ grads["w"][0].T / d + 1e-3 * jnp.eye(d)
  cell.add(EIGH, stateless(jnp.linalg.eigh), jnp.zeros(()), factor,
           donate=False)
  step_memory = {}
  for tag, lib in libs.items():
    for name in filter(lambda name: chosen(args, name), SHAMPOO):
      cf, ic, k = SHAMPOO[name]
      tx = lib.scale_by_shampoo_bc(cross_fit=cf, inverse_correction=ic,
                                   variance_groups=k)
      add_step_kinds(cell, name, tag, tx, STEPS, params, grads)
      for kind in STEPS:
        if not tag and f"{name}, {kind}" in cell.runners:  # its own program
          fixed = lambda s, g, p, tx=tx, root=kind == "root": tx.update(
              g, s, p, root_step=root)
          step_memory[f"{name}, {kind}"] = harness.memory(jax.jit(
              fixed, donate_argnums=0).lower(tx.init(params), grads,
                                             params).compile())
      if not tag and f"{name}, root" in cell.runners:
        step_memory[f"{name}, both (lax.cond)"] = harness.memory(
            cell.runners[f"{name}, root"].compiled)
  cell = {"d": d, "M": m, "gradients_bytes": m * d * d * 4,
          **cell.measure({"adam": ADAM_MEAN}, d * d),
          "memory_step_only": step_memory}
  cell["summary"] = shampoo_summary(cell["variants"], m)
  return cell


def shampoo_summary(v: dict, m: int) -> dict:
  """Correction overheads, the cost model (projections: K' per group of n
  > K', else n + 1) and the step costs in Adams (of the variants timed):
  {key: (numerator, denominator, factor, offset)}."""
  terms = {"eigh_in_projections": (EIGH, PROJECTION, 1, 0),
           **{f"predicted_overhead twofold {tag}": (
               PROJECTION, "twofold, root", sum(  # projections per group
                   n + 1 if k is None or k >= n else k
                   for n in (m, m - m // 2)), 0)
              for tag, k in (("exact", None), ("K=4", 4))}}
  terms |= {f"correction_overhead {name}": (f"{name}, root", f"{base}, root",
                                            1, -1) for name in SHAMPOO
            if (base := name.split(" + ")[0]) != name}
  for kind in STEPS:
    terms[f"{DEFAULT}, {kind} step / optax.adam"] = (
        f"{DEFAULT}, {kind}", ADAM_MEAN, 1, 0)
  return {stat: {k: round(f * v[a][stat] / v[b][stat] + c, 4)
                 for k, (a, b, f, c) in terms.items() if a in v and b in v}
          for stat in ("median_ms", "cpu_median_ms")}


def soap_cell(d: int, m: int, libs: dict, args) -> dict:
  cell, params, grads = matrix_cell(d, m, args)
  for tag, lib in libs.items():
    for name in filter(lambda name: chosen(args, name), SOAP):
      cf, ic, k, _ = SOAP[name]
      tx = lib.scale_by_soap_bc(cross_fit=cf, inverse_correction=ic,
                                variance_groups=k)
      add_step_kinds(cell, name, tag, tx, SOAP_STEPS, params, grads)
  cell = {"d": d, "M": m, **cell.measure({"adam": ADAM_MEAN}, d * d)}
  v, base = cell["variants"], "SOAP, no refresh"
  cell["summary"] = {stat: {
      **{f"{name}, {kind} / SOAP": round(
          v[f"{name}, {kind}"][stat] / v[f"SOAP, {kind}"][stat], 4)
         for name in SOAP for kind in SOAP_STEPS
         if {f"{name}, {kind}", f"SOAP, {kind}"} <= set(v)},
      **{f"{name}: predicted / SOAP": round(1 + SOAP[name][3](m) * v[
          PROJECTION][stat] / v[base][stat], 4)
         for name in SOAP if PROJECTION in v and base in v},
      "SOAP, no refresh / optax.adam": round(
          v[base][stat] / v[ADAM_MEAN][stat], 4) if base in v else None}
                     for stat in ("median_ms", "cpu_median_ms")}
  return cell


CELLS = {"adam": adam_cell, "sophia": sophia_cell, "shampoo": shampoo_cell,
         "soap": soap_cell}


# Report ---------------------------------------------------------------------

def label(cell: dict) -> str:
  where = f"{cell['size']}" if "size" in cell else f"d={cell['d']}"
  return f"{where}, M={cell['M']}"


def slash(d: dict, a: str, b: str, spec: str) -> str:
  return f"{d[a]:{spec}} / {d[b]:{spec}}"


def grid(cells: list, fmt, extra_rows=()) -> str:
  """Variants (rows, twins @ref left out) by cells (columns)."""
  names = dict.fromkeys(n for c in cells for n in (*c["variants"],
                                                   *c["skipped"])
                        if not n.endswith(REF))
  rows = [[n, *(fmt(c["variants"][n]) if n in c["variants"] else "n/a"
                for c in cells)] for n in names]
  return harness.table(["variant", *map(label, cells)], [*rows, *extra_rows])


def soap_report(cells: list) -> str:
  ms = ("median_ms", "cpu_median_ms")
  return "\n".join([
      "\n### SOAP-BC, one d x d parameter: median wall / CPU ms\n",
      grid(cells, lambda v: slash(v, *ms, ".4g")),
      "\n### SOAP-BC against SOAP (wall / CPU), and the rotation cost"
      " model\n", harness.table(["", *map(label, cells)], [
          [k, *(slash({s: c["summary"][s][k] for s in ms}, *ms, ".3g")
                for c in cells)]
          for k in cells[0]["summary"]["median_ms"]]),
      "\n### XLA's temp / peak MiB of each variant's program (both step"
      " kinds, lax.cond)\n",
      grid(cells, lambda v: slash({k: x / 2**20 for k, x in v[
          "memory"].items()}, "temp", "peak_bound", ".4g"))])


def report(families: dict, ref) -> str:
  out, x_b = [], lambda v: slash(v["vs"]["b"], "wall", "cpu", ".2f")
  if "adam" in families:
    cells = families["adam"]
    state = [[f"state bytes of {name} / of (b)", *(
        f"{c['variants'][name]['state_bytes'] / c['variants'][B]['state_bytes']:.2f}"
        for c in cells)] for name in cells[0]["variants"] if name == ADAM_LOO]
    b_ms = [["(b), median ms",
             *(f"{c['variants'][B]['median_ms']:.4g}" for c in cells)]]
    b_ms += [[f"{name}{MONITOR} / without (per round)", *(slash(
        c["diagnostics_vs_plain"][name], "wall_paired", "cpu_paired", ".3f")
        if name in c.get("diagnostics_vs_plain", {}) else "n/a"
        for c in cells)] for name in MONITORED]
    out += ["### Adam-BC: median wall / CPU time as a multiple of (b)\n",
            grid(cells, x_b, b_ms + state)]
  if "sophia" in families:
    cells, k = families["sophia"], REFRESH_EVERY
    amortized = [[f"{name}, refresh every {k} (amortized)", *(slash(
        c[f"amortized_every_{k}"][name], "median_ms_vs_b",
        "cpu_median_ms_vs_b", ".2f") for c in cells)]
                 for name in cells[0][f"amortized_every_{k}"]]
    out += ["\n### Sophia-BC: median wall / CPU time as a multiple of (b)\n",
            grid(cells, x_b, amortized)]
  if "shampoo" in families:
    cells, ms = families["shampoo"], ("median_ms", "cpu_median_ms")
    out += ["\n### Shampoo-BC, one d x d parameter: median wall / CPU ms\n",
            grid(cells, lambda v: slash(v, *ms, ".4g"))]
    rows = [[k, *(slash({s: c["summary"][s][k] for s in ms}, *ms, ".3g")
                  for c in cells)] for k in cells[0]["summary"]["median_ms"]]
    rows += [[f"{name}: temp / peak MiB", *(slash(
        {k: v / 2**20 for k, v in c["memory_step_only"][name].items()},
        "temp", "peak_bound", ".4g") for c in cells)]
             for name in cells[0]["memory_step_only"]]
    rows.append(["gradients MiB",
                 *(f"{c['gradients_bytes'] / 2**20:.4g}" for c in cells)])
    out += ["\n### Shampoo-BC: correction, cost model (wall / CPU), memory\n",
            harness.table(["", *map(label, cells)], rows)]
  if "soap" in families:
    out.append(soap_report(families["soap"]))
  if ref:
    out += [f"\n### Working tree against bcopt at {ref['commit'][:12]}"
            f" (`--ref {ref['requested']}`)\n", harness.table(
                ["family", "cell", "variant", "ms", "@ref ms",
                 "x @ref (per-round wall / CPU)", "bitwise equal"],
                [[f, label(c), n, f"{v['median_ms']:.4g}",
                  f"{c['variants'][n + REF]['median_ms']:.4g}",
                  slash(v["vs"]["ref"], "wall_paired", "cpu_paired", ".3f"),
                  "yes" if v["bitwise_equal_ref"] else "**no**"]
                 for f, cells in families.items() for c in cells
                 for n, v in c["variants"].items() if "ref" in v["vs"]])]
  return "\n".join(out)


# Driver ---------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  p = harness.parser(MODULE, __doc__)
  add = p.add_argument
  add("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
  add("--ref", metavar="COMMIT", help="also time bcopt at COMMIT")
  add("--quick", action="store_true", help="a smoke run (2M, M=8; d=128, "
      "M=4; 3 rounds of <= 10 s); no RESULTS.md section")
  add("--sizes", nargs="+", choices=SIZES, help="adam/sophia trees (2M 16M)")
  add("--dims", nargs="+", type=int, help=f"the matrix families' d ({DIMS})")
  add("--microbatches", nargs="+", type=int, help=f"M ({MICROBATCHES})")
  add("--variants", nargs="+", metavar="TEXT", help="only the variants "
      "whose names contain one of these (and the baselines)")
  add("--reps", type=int, help="rounds per cell (default 15)")
  add("--max-seconds", type=float, help="per cell, after 3 rounds (60)")
  add("--warmup", type=int, default=2, help="untimed calls after the first")
  add("--out", help="JSON (default results/update_cost[_quick|_ref].json)")
  args = p.parse_args(argv)
  q = args.quick
  args.sizes = args.sizes or (["2M"] if q else ["2M", "16M"])
  args.dims = {f: args.dims or ([128] if q else DIMS[f]) for f in DIMS}
  args.microbatches = {f: args.microbatches or (
      ([4] if f in ("shampoo", "soap") else [8]) if q else MICROBATCHES[f])
                       for f in args.family}
  args.reps = args.reps or (3 if q else 15)
  args.max_seconds = args.max_seconds or (10.0 if q else 60.0)
  suffix = "_quick" if q else "_ref" if args.ref else ""
  args.out = args.out or str(harness.RESULTS_DIR / f"update_cost{suffix}.json")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  env = harness.environment()
  print(f"# update cost: jax {env['jax']}, {env['devices']}, "
        f"{env['cpus_usable']} CPUs, load {env['loadavg_start'][0]:.2f}",
        flush=True)
  families, ref = {}, None
  with tempfile.TemporaryDirectory() as tmp:
    libs = {"": bcopt}
    if args.ref:
      libs[REF], commit = load_ref(args.ref, tmp)
      ref = {"requested": args.ref, "commit": commit}
    for family in args.family:
      families[family] = []
      for x in args.dims.get(family, args.sizes):
        for m in args.microbatches[family]:
          cell = CELLS[family](x, m, libs, args)
          families[family].append(cell)
          print(f"{family} {label(cell)}: {cell['rounds']} rounds, load "
                f"{cell['loadavg_start'][0]:.2f}", flush=True)
  markdown = report(families, ref)
  print(markdown)
  result = {"command": harness.command(MODULE, argv),
            "environment": harness.finish(env), "config": vars(args),
            "ref": ref, "families": families, "markdown": markdown}
  harness.write_json(args.out, result)
  if not args.quick and not args.ref:
    section = "update_cost" + "".join(  # one section per family subset
        f"_{f}" for f in args.family if set(args.family) != set(FAMILIES))
    harness.write_section(section, f"## Cost of one update "
                          f"(`{result['command']}`)\n\n{markdown}")
    if "soap" in families:  # and into its page
      cells = families["soap"]
      harness.write_section("soap_cost", (
          f"{soap_report(cells)}\n\n`{result['command']}` (load "
          f"{cells[0]['loadavg_start'][0]:.1f} at the start; "
          f"{os.path.relpath(args.out, harness.ROOT)})"),
                            harness.ROOT / "docs" / "soap_bc.md")
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
