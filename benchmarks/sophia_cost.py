r"""Cost of Sophia-G-BC: its update, and the GNB curvature estimator.

Part 1, the update (issue 3: Sophia refresh and non-refresh steps against
the same optax Adam baselines as ``benchmarks/optimizer_overhead.py``): the
jitted ``bcopt.scale_by_sophia_bc(...).update`` on LM-shaped trees of
microbatched gradients, on a refresh step (``curvature=`` microbatched
estimates given: cross-fit, corrected inverse, new cached inverse) and on a
non-refresh step (cached inverse), for LOO + jackknife and for the standard
variant (``cross_fit=None, inverse_correction=None``), against

* (a) ``optax.scale_by_adam(jnp.mean(g, 0))`` and
  (b) ``optax.scale_by_adam`` on the fused mean of ``g`` (see
  ``optimizer_overhead.py`` for why both),
* ``bcopt.scale_by_adam_bc`` (LOO + jackknife), and
* ``optax.contrib.scale_by_sophia`` on the mean gradient, with its Hessian
  estimator replaced by one that returns the mean of the same curvature
  estimates (so only the update is timed), on a step where its
  ``lax.cond`` refreshes the Hessian EMA and on one where it does not.

The amortized cost per step with a refresh every ``k`` steps is
``(refresh + (k - 1) non-refresh) / k``.

Part 2, the estimator (issue 3: one ``gnb_diag`` pass relative to one
ordinary gradient pass): a small decoder-only transformer written here in
pure JAX (token embedding tied with the output, pre-norm causal attention and
GELU MLP blocks). Timed on the same M microbatches: the microbatched
gradients ``vmap(grad(loss))``, ``vmap(bcopt.gnb_diag)``,
``vmap(bcopt.hutchinson_diag)``, and whole jitted train steps (gradients,
optional curvature, update, ``apply_updates``; state donated) for
``optax.adamw`` on the mean gradient, ``bcopt.adamw_bc``, ``bcopt.sophia_bc``
(refresh and non-refresh steps, compiled separately as its docstring shows)
and ``optax.contrib.sophia`` (Hutchinson on the full-batch loss inside
``update``; refresh and non-refresh steps).

Timing method as in ``optimizer_overhead.py``: one process, interleaved
rounds, medians, ``block_until_ready``, compilation and warm-up excluded.

Usage::

  python benchmarks/sophia_cost.py --quick     # < 1 minute
  python benchmarks/sophia_cost.py      # 2M and 16M params, M = 8
"""

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
# scale_by_sophia (the bare transform) is not re-exported by optax.contrib.
from optax.contrib import _sophia as contrib_sophia

import bcopt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optimizer_overhead as oo  # pylint: disable=g-import-not-at-top

REFRESH_INTERVAL = 10


# --------------------------------------------------------------------------
# Part 1: update cost.
# --------------------------------------------------------------------------


def given_curvature() -> optax.GradientTransformationExtraArgs:
  """A Hessian "estimator" for optax.contrib returning ``curvature``."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, curvature=None, **extra):
    del updates, params, extra
    return curvature, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_count(state, count: int):
  """``state`` with the step count of its optax Sophia state set."""
  return jax.tree.map(
      lambda s: s._replace(count=jnp.full_like(s.count, count))
      if isinstance(s, contrib_sophia.SophiaState) else s,
      state, is_leaf=lambda s: isinstance(s, contrib_sophia.SophiaState))


def update_cell(size: str, m: int, reps: int, max_seconds: float,
                warmup: int) -> dict[str, Any]:
  shapes = oo.lm_param_shapes(size)
  grads = oo.microbatched_gradients(shapes, m, seed=0)
  # GNB estimates are squares: non-negative, heavy-tailed.
  curv = jax.tree.map(jnp.square, oo.microbatched_gradients(shapes, m, 1))
  curv = jax.tree.map(lambda r: 1e3 * r, curv)
  params = jax.tree.map(lambda x: x[0], grads)
  n = sum(int(np.prod(s)) for s in shapes.values())
  adam = optax.scale_by_adam()
  runners = {
      oo.BASELINE_A: oo.Runner(
          lambda s, g: adam.update(oo.jnp_mean(g), s), adam.init(params),
          (grads,)),
      oo.BASELINE_B: oo.Runner(
          lambda s, g: adam.update(oo.fused_mean(g), s),
          adam.init(params), (grads,)),
  }
  adam_bc = bcopt.scale_by_adam_bc()
  runners["Adam-BC loo + jackknife"] = oo.Runner(
      lambda s, g: adam_bc.update(g, s), adam_bc.init(params), (grads,))
  for label, cf, ic in (("loo + jackknife", "loo", "jackknife"),
                        ("standard, no correction", None, None)):
    tx = bcopt.scale_by_sophia_bc(cross_fit=cf, inverse_correction=ic)
    runners[f"Sophia-BC {label}, refresh"] = oo.Runner(
        lambda s, g, r, tx=tx: tx.update(g, s, curvature=r),
        tx.init(params), (grads, curv))
    runners[f"Sophia-BC {label}, cached inverse"] = oo.Runner(
        lambda s, g, tx=tx: tx.update(g, s), tx.init(params), (grads,))
  contrib = contrib_sophia.scale_by_sophia(
      update_interval=REFRESH_INTERVAL,
      hessian_diagonal_fn=given_curvature())
  for label, count in (("refresh", 0), ("no refresh", 1)):
    runners[f"optax.contrib.scale_by_sophia (mean), {label}"] = oo.Runner(
        lambda s, g, r, p, count=count: contrib.update(
            bcopt.microbatch_mean(g), _with_count(s, count), p,
            curvature=bcopt.microbatch_mean(r)),
        contrib.init(params), (grads, curv, params))
  samples = oo.time_interleaved(runners, reps, max_seconds, warmup=warmup)
  base = {k: float(np.median(samples[k]))
          for k in (oo.BASELINE_A, oo.BASELINE_B)}
  stats = {k: oo.summarize(s, runners[k].cpu_samples)
           for k, s in samples.items()}
  variants = {}
  for name in samples:
    variants[name] = {
        **stats[name],
        **oo.ratios(stats[name], stats[oo.BASELINE_A], "a"),
        **oo.ratios(stats[name], stats[oo.BASELINE_B], "b"),
        "state_bytes": oo.tree_nbytes(runners[name].state),
        "xla_cost_per_param": oo.xla_cost_per_param(runners[name].compiled,
                                                    n),
    }
  amortized = {}
  for prefix in ("Sophia-BC loo + jackknife", "Sophia-BC standard, no"
                 " correction", "optax.contrib.scale_by_sophia (mean)"):
    fresh = [k for k in variants if k.startswith(prefix) and
             k.endswith(", refresh")][0]
    cached = [k for k in variants if k.startswith(prefix) and k != fresh][0]
    ms = (variants[fresh]["median_ms"]
          + (REFRESH_INTERVAL - 1) * variants[cached]["median_ms"]
          ) / REFRESH_INTERVAL
    amortized[prefix] = {
        "ms": round(ms, 3),
        "ratio_vs_a": round(ms / (1e3 * base[oo.BASELINE_A]), 3),
        "ratio_vs_b": round(ms / (1e3 * base[oo.BASELINE_B]), 3)}
  del runners, grads, curv
  gc.collect()
  return {"size": size, "n_params": n, "M": m, "variants": variants,
          f"amortized_every_{REFRESH_INTERVAL}": amortized}


# --------------------------------------------------------------------------
# Part 2: a small transformer LM in pure JAX, and the estimator cost.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab: int = 512       # vocabulary size (output logits per position)
  d_model: int = 128     # residual width
  layers: int = 2        # transformer blocks
  heads: int = 4         # attention heads (d_model % heads == 0)
  seq: int = 128         # tokens per sequence
  batch: int = 4         # sequences per microbatch
  microbatches: int = 8  # M


def init_model(cfg: ModelConfig, key: jax.Array) -> dict[str, jax.Array]:
  d = cfg.d_model
  keys = iter(jax.random.split(key, 4 * cfg.layers + 1))
  dense = lambda k, i, o: jax.random.normal(k, (i, o)) / math.sqrt(i)
  params = {"embed": 0.02 * jax.random.normal(next(keys), (cfg.vocab, d))}
  for i in range(cfg.layers):
    params |= {
        f"layer{i}/attn_norm": jnp.ones(d),
        f"layer{i}/qkv": dense(next(keys), d, 3 * d),
        f"layer{i}/attn_out": dense(next(keys), d, d),
        f"layer{i}/mlp_norm": jnp.ones(d),
        f"layer{i}/mlp_in": dense(next(keys), d, 4 * d),
        f"layer{i}/mlp_out": dense(next(keys), 4 * d, d),
    }
  params["final_norm"] = jnp.ones(d)
  return params


def _rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def logits_fn(cfg: ModelConfig, params, tokens_BxT):
  """Causal LM logits, shape (B, T, vocab)."""
  b, t = tokens_BxT.shape
  h, dh = cfg.heads, cfg.d_model // cfg.heads
  x_BxTxD = params["embed"][tokens_BxT]
  mask_TxT = jnp.tril(jnp.ones((t, t), bool))
  for i in range(cfg.layers):
    y = _rms_norm(x_BxTxD, params[f"layer{i}/attn_norm"])
    q, k, v = jnp.split(y @ params[f"layer{i}/qkv"], 3, axis=-1)
    q, k, v = (z.reshape(b, t, h, dh) for z in (q, k, v))
    s_BxHxTxT = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    s_BxHxTxT = jnp.where(mask_TxT, s_BxHxTxT, -1e9)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s_BxHxTxT, -1), v)
    x_BxTxD = x_BxTxD + a.reshape(b, t, -1) @ params[f"layer{i}/attn_out"]
    y = _rms_norm(x_BxTxD, params[f"layer{i}/mlp_norm"])
    x_BxTxD = x_BxTxD + jax.nn.gelu(y @ params[f"layer{i}/mlp_in"]) @ params[
        f"layer{i}/mlp_out"]
  x_BxTxD = _rms_norm(x_BxTxD, params["final_norm"])
  return x_BxTxD @ params["embed"].T


def loss_fn(cfg: ModelConfig, params, batch):
  inputs_BxT, targets_BxT = batch
  logits = logits_fn(cfg, params, inputs_BxT)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, targets_BxT).mean()


class Step(NamedTuple):
  params: Any
  opt_state: Any


def model_cell(cfg: ModelConfig, reps: int, max_seconds: float,
               warmup: int, core_only: bool = False) -> dict[str, Any]:
  """Times the estimators and train steps (``core_only``: the GNB ones)."""
  key_p, key_d = jax.random.split(jax.random.key(0))
  params = init_model(cfg, key_p)
  n = sum(x.size for x in jax.tree.leaves(params))
  tokens = jax.random.randint(
      key_d, (cfg.microbatches, cfg.batch, cfg.seq + 1), 0, cfg.vocab)
  batch = (tokens[..., :-1], tokens[..., 1:])  # leaves (M, B, T)
  keys = jax.random.split(jax.random.key(1), cfg.microbatches)
  lf = lambda p, b: loss_fn(cfg, p, b)
  lg = lambda p, x: logits_fn(cfg, p, x)
  grads_fn = jax.vmap(jax.grad(lf), in_axes=(None, 0))
  gnb_fn = jax.vmap(bcopt.gnb_diag, in_axes=(None, None, 0, 0))
  hutch_fn = jax.vmap(bcopt.hutchinson_diag, in_axes=(None, None, 0, 0))

  def no_state(fn):
    return lambda s, *a: (fn(*a), s)

  runners = {
      "gradients: vmap(grad(loss))": oo.Runner(
          no_state(lambda p, b: grads_fn(p, b)), jnp.zeros(()),
          (params, batch), donate=False),
      "bcopt.gnb_diag (vmapped)": oo.Runner(
          no_state(lambda p, x, k: gnb_fn(lg, p, x, k)), jnp.zeros(()),
          (params, batch[0], keys), donate=False),
  }
  if not core_only:
    runners["bcopt.hutchinson_diag (vmapped)"] = oo.Runner(
        no_state(lambda p, b, k: hutch_fn(lf, p, b, k)), jnp.zeros(()),
        (params, batch, keys), donate=False)
    runners["gradients + gnb_diag (one jit)"] = oo.Runner(
        no_state(lambda p, b, k: (grads_fn(p, b), gnb_fn(lg, p, b[0], k))),
        jnp.zeros(()), (params, batch, keys), donate=False)

  def train_step(tx, *, mean=False, refresh=False):
    def step(state, b, k):
      g = grads_fn(state.params, b)
      extra = {}
      if refresh:
        extra["curvature"] = gnb_fn(lg, state.params, b[0],
                                    jax.random.split(k, cfg.microbatches))
      if mean:
        g = bcopt.microbatch_mean(g)
      u, o = tx.update(g, state.opt_state, state.params, **extra)
      return None, Step(optax.apply_updates(state.params, u), o)
    own = jax.tree.map(jnp.copy, params)  # donated: one copy per runner
    return oo.Runner(step, Step(own, tx.init(own)), (batch, keys[0]))

  runners["step: optax.adamw on microbatch_mean"] = train_step(
      optax.adamw(1e-3), mean=True)
  sophia = bcopt.sophia_bc(1e-3)
  runners["step: bcopt.sophia_bc, cached inverse"] = train_step(sophia)
  runners["step: bcopt.sophia_bc, refresh (+ gnb_diag)"] = train_step(
      sophia, refresh=True)
  if not core_only:
    runners["step: bcopt.adamw_bc (loo + jackknife)"] = train_step(
        bcopt.adamw_bc(1e-3))
  contrib = optax.contrib.sophia(1e-3, update_interval=REFRESH_INTERVAL)
  for label, count in (() if core_only else (
      ("refresh (Hutchinson inside)", 0), ("no refresh", 1))):
    def contrib_step(state, b, k, count=count):
      del k
      g = bcopt.microbatch_mean(grads_fn(state.params, b))
      obj = lambda p: jnp.mean(jax.vmap(lf, in_axes=(None, 0))(p, b))
      u, o = contrib.update(g, _with_count(state.opt_state, count),
                            state.params, obj_fn=obj)
      return None, Step(optax.apply_updates(state.params, u), o)
    own = jax.tree.map(jnp.copy, params)
    runners[f"step: optax.contrib.sophia, {label}"] = oo.Runner(
        contrib_step, Step(own, contrib.init(own)), (batch, keys[0]))

  samples = oo.time_interleaved(runners, reps, max_seconds, warmup=warmup)
  med = {k: float(np.median(v)) for k, v in samples.items()}
  grad_ms = med["gradients: vmap(grad(loss))"]
  results = {k: {**oo.summarize(v, runners[k].cpu_samples),
                 "ratio_vs_gradients": round(med[k] / grad_ms, 3)}
             for k, v in samples.items()}
  grad_cpu = results["gradients: vmap(grad(loss))"].get("cpu_median_ms")
  if grad_cpu:
    for r in results.values():
      r["cpu_ratio_vs_gradients"] = round(r["cpu_median_ms"] / grad_cpu, 3)
  fresh = med["step: bcopt.sophia_bc, refresh (+ gnb_diag)"]
  cached = med["step: bcopt.sophia_bc, cached inverse"]
  adamw = med["step: optax.adamw on microbatch_mean"]
  k = REFRESH_INTERVAL
  summary = {
      "gnb_over_gradients": round(
          med["bcopt.gnb_diag (vmapped)"] / grad_ms, 3),
      "gnb_over_gradients_cpu": results["bcopt.gnb_diag (vmapped)"].get(
          "cpu_ratio_vs_gradients"),
      "sophia_bc_refresh_over_cached_step": round(fresh / cached, 3),
      f"sophia_bc_amortized_every_{k}_over_optax_adamw_step": round(
          (fresh + (k - 1) * cached) / k / adamw, 3),
  }
  if not core_only:
    c_fresh = med["step: optax.contrib.sophia, refresh (Hutchinson inside)"]
    c_cached = med["step: optax.contrib.sophia, no refresh"]
    summary |= {
        "hutchinson_over_gradients": round(
            med["bcopt.hutchinson_diag (vmapped)"] / grad_ms, 3),
        f"optax_contrib_sophia_amortized_every_{k}_over_optax_adamw_step":
            round((c_fresh + (k - 1) * c_cached) / k / adamw, 3),
    }
  del runners
  gc.collect()
  return {"config": dataclasses.asdict(cfg), "n_params": int(n),
          "tokens_per_step": cfg.microbatches * cfg.batch * cfg.seq,
          "timings": results, "summary": summary}


# --------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  csv = lambda t: lambda s: [t(x) for x in s.split(",") if x]
  p.add_argument("--sizes", type=csv(str), default=None,
                 help=f"update part: comma list from {list(oo.SIZES)}"
                 " (default 2M,16M)")
  p.add_argument("--microbatches", type=csv(int), default=None,
                 help="update part: comma list of M (default 8)")
  p.add_argument("--reps", type=int, default=None,
                 help="timed rounds per cell (default 15)")
  p.add_argument("--max-seconds", type=float, default=None,
                 help="stop a cell's rounds after this long, keeping at least"
                 " 3 (default 60)")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed calls per variant (default 1)")
  for f in dataclasses.fields(ModelConfig):
    p.add_argument(f"--model-{f.name.replace('_', '-')}", type=int,
                   default=None, help=f"model part (default {f.default})")
  p.add_argument("--skip-model", action="store_true",
                 help="only the update part")
  p.add_argument("--quick", action="store_true",
                 help="a < 1 minute subset: 2M params, M = 8, 3 rounds; a"
                 " 1-layer model, GNB and Sophia-BC steps only")
  p.add_argument("--out", default=None, help="JSON path (default"
                 " benchmarks/results/sophia_cost[_quick].json)")
  args = p.parse_args(argv)
  q = args.quick
  args.sizes = args.sizes or (["2M"] if q else ["2M", "16M"])
  for s in args.sizes:
    if s not in oo.SIZES:
      p.error(f"--sizes: unknown size {s!r}; choose from {list(oo.SIZES)}")
  args.microbatches = args.microbatches or [8]
  args.reps = args.reps or (3 if q else 15)
  args.max_seconds = args.max_seconds or (8.0 if q else 60.0)
  args.warmup = 1 if args.warmup is None else args.warmup
  model = {f.name: getattr(args, f"model_{f.name}") for f in
           dataclasses.fields(ModelConfig)}
  if q:
    model = {"layers": 1, "seq": 64, "batch": 2,
             **{k: v for k, v in model.items() if v is not None}}
  args.model = ModelConfig(**{k: v for k, v in model.items() if v is not None})
  args.out = args.out or os.path.join(
      oo.RESULTS_DIR, "sophia_cost_quick.json" if q else "sophia_cost.json")
  return args


def report(cells, model) -> str:
  out = []
  for c in cells:
    rows = [[oo.short(name), f"{v['median_ms']:.1f}",
             f"{v['ratio_vs_a']:.2f}x", f"{v['ratio_vs_b']:.2f}x",
             f"{v.get('ratio_cpu_vs_b', float('nan')):.2f}x"]
            for name, v in c["variants"].items()]
    for name, v in c[f"amortized_every_{REFRESH_INTERVAL}"].items():
      rows.append([f"{name}, amortized (refresh every {REFRESH_INTERVAL})",
                   f"{v['ms']:.1f}", f"{v['ratio_vs_a']:.2f}x",
                   f"{v['ratio_vs_b']:.2f}x", ""])
    out.append(f"\n### Update cost, {c['size']} parameters"
               f" ({c['n_params']:,}), M={c['M']}\n")
    out.append(oo.markdown_table(
        ["update", "median ms", "x optax (a)", "x optax (b)",
         "CPU x optax (b)"], rows))
  if model:
    cfg = model["config"]
    out.append(
        f"\n### Estimator and step cost: {model['n_params']:,}-parameter"
        f" transformer ({cfg['layers']} layers, d={cfg['d_model']},"
        f" vocab {cfg['vocab']}), M={cfg['microbatches']} microbatches of"
        f" {cfg['batch']}x{cfg['seq']} tokens\n")
    rows = [[name, f"{v['median_ms']:.1f}", f"{v['ratio_vs_gradients']:.2f}x",
             f"{v.get('cpu_ratio_vs_gradients', float('nan')):.2f}x"]
            for name, v in model["timings"].items()]
    out.append(oo.markdown_table(["computation", "median ms",
                                  "x gradient pass", "CPU x gradient pass"],
                                 rows))
    out.append("\n" + "\n".join(f"* {k}: {v}"
                                for k, v in model["summary"].items()))
  return "\n".join(out)


def main(argv=None):
  args = parse_args(argv)
  env = oo.environment()
  print(f"# Sophia-BC cost: jax {env['jax']}, optax {env['optax']},"
        f" {env['device']}, {env['cpus_usable']} CPUs, {env['date_utc']}")
  t_start = time.perf_counter()
  cells = []
  for size in args.sizes:
    for m in args.microbatches:
      print(f"  update: {size} params, M={m} ...", flush=True)
      cells.append(update_cell(size, m, args.reps, args.max_seconds,
                               args.warmup))
      print(f"    done at {time.perf_counter() - t_start:.0f} s", flush=True)
  model = None
  if not args.skip_model:
    print(f"  model: {args.model} ...", flush=True)
    model = model_cell(args.model, args.reps, args.max_seconds, args.warmup,
                       core_only=args.quick)
    print(f"    done at {time.perf_counter() - t_start:.0f} s", flush=True)
  env["loadavg_end"] = list(os.getloadavg())
  env["wall_seconds"] = round(time.perf_counter() - t_start, 1)
  table = report(cells, model)
  print(table)
  oo.write_json(args.out, {
      "command": oo.command_line(),
      "environment": env,
      "config": {"sizes": args.sizes, "microbatches": args.microbatches,
                 "reps": args.reps, "max_seconds": args.max_seconds,
                 "warmup": args.warmup, "quick": args.quick,
                 "refresh_interval": REFRESH_INTERVAL},
      "baselines": {"a": oo.BASELINE_A, "b": oo.BASELINE_B},
      "update_cells": cells,
      "model": model,
      "markdown": table,
  })


if __name__ == "__main__":
  main()
