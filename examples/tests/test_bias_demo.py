"""The bias meter (examples/bias_demo.py): its numbers and its result.

The meter's estimates of the standard and uncorrected cross-fit updates are
checked against Gauss-Hermite quadrature of the SPEC section 3 formulas (the
expectations are one-dimensional integrals per coordinate), and the
bias-meter result is asserted with margins of several Monte Carlo errors:
cross-fitting removes the coupling bias, the jackknife removes most of the
inversion bias, and LOO + jackknife has a smaller total bias than standard
Adam. At other b2 (and steps) the Adam state and the target are checked
against a numpy run of Adam's moment recursions and a Monte Carlo of the
expected preconditioner, and the meter against quadrature again.
"""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

DEMO = pathlib.Path(__file__).resolve().parents[2] / "examples" / "bias_demo.py"
M = 32
DRAWS = 16384


def _load_demo():
  spec = importlib.util.spec_from_file_location("bias_demo", DEMO)
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault("bias_demo", module)
  spec.loader.exec_module(module)
  return module


bias_demo = _load_demo()


@pytest.fixture(scope="module")
def meter():
  results = bias_demo.measure(
      bias_demo.Problem(), microbatches=(M,), schemes=(None, "twofold", "loo"),
      corrections=(None, "jackknife"), draws=DRAWS, seed=0, progress=False)
  return {(r["scheme"], r["correction"]): r for r in results}


def _quadrature(problem, mean, sigma, mu_state, nu_state, inflation):
  """E[u], E[f], f(E[P]) and u* of one fold by Gauss-Hermite quadrature.

  The fold's preconditioner statistic is ``y^2`` with ``y ~ N(mean,
  inflation sigma^2)`` (inflation 1 for the full batch, M / n for a group of
  n). Returns per-coordinate arrays in float64.
  """
  t, b1, b2, eps = problem.step, problem.b1, problem.b2, problem.eps
  bc1, bc2 = 1 - b1**t, 1 - b2**t
  nodes, weights = np.polynomial.hermite_e.hermegauss(120)
  weights = weights / weights.sum()
  y = mean[:, None] + np.sqrt(inflation) * sigma[:, None] * nodes[None, :]
  numerator = lambda a: (b1 * mu_state[..., None] * np.ones_like(a)
                         + (1 - b1) * a) / bc1
  inverse = lambda s: 1 / (np.sqrt((b2 * nu_state[..., None] + (1 - b2) * s)
                                   / bc2) + eps)
  expected_u = (numerator(y) * inverse(y**2)) @ weights  # coupled (one batch)
  expected_f = inverse(y**2) @ weights
  mean_p_inverse = inverse(((mean**2 + inflation * sigma**2))[:, None])[:, 0]
  target = numerator(mean[:, None])[:, 0] * inverse(
      (mean**2 + sigma**2)[:, None])[:, 0]
  n_mean = numerator(mean[:, None])[:, 0]
  return expected_u, expected_f, mean_p_inverse, target, n_mean


def _reference(problem, m):
  """Quadrature of the uncorrected bias and its parts, by scheme, at M = m."""
  pop = bias_demo.population(problem)
  mu_state = np.asarray(pop.state.mu, np.float64)
  nu_state = np.asarray(pop.state.nu, np.float64)
  out = {}
  for scheme, inflation in ((None, 1.0), ("loo", m / (m - 1)),
                            ("twofold", 2.0)):
    expected_u, expected_f, f_group, target, n_mean = _quadrature(
        problem, pop.mean, pop.sigma, mu_state, nu_state, inflation)
    f_full = _quadrature(problem, pop.mean, pop.sigma, mu_state, nu_state,
                         1.0)[2]
    if scheme is not None:  # independent numerator and preconditioner
      expected_u = n_mean * expected_f
    norm = np.linalg.norm(target)
    out[scheme] = {
        "target": target,
        "total": np.linalg.norm(expected_u - target) / norm,
        "coupling": np.linalg.norm(expected_u - n_mean * expected_f) / norm,
        "inversion": np.linalg.norm(n_mean * (expected_f - f_group)) / norm,
        "group_size": np.linalg.norm(n_mean * (f_group - f_full)) / norm,
    }
  return out


@pytest.fixture(scope="module")
def reference():
  return _reference(bias_demo.Problem(), M)


def test_target_is_the_closed_form(reference):
  pop = bias_demo.population(bias_demo.Problem())
  np.testing.assert_allclose(pop.target, reference[None]["target"], rtol=1e-6)


def _assert_matches_quadrature(measured, exact):
  for part in ("total", "coupling", "inversion"):
    error = abs(measured[part] - exact[part])
    assert error < 3 * measured[part + "_se"] + 1e-4, (
        part, measured[part], exact[part], measured[part + "_se"])
  np.testing.assert_allclose(measured["group_size"], exact["group_size"],
                             rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scheme", [None, "loo", "twofold"])
def test_uncorrected_bias_matches_quadrature(meter, reference, scheme):
  _assert_matches_quadrature(meter[(scheme, None)], reference[scheme])


def _adam_moments(problem, mean, second):
  """Adam's moments after steps 1 .. t - 1 of its recursions, from zero.

  The momentum sees gradients of mean ``mean``; the second moment sees
  ``kappa`` times today's expected square ``second``.
  """
  mu, nu = np.zeros_like(mean), np.zeros_like(second)
  for _ in range(problem.step - 1):
    mu = problem.b1 * mu + (1 - problem.b1) * mean
    nu = problem.b2 * nu + (1 - problem.b2) * problem.kappa * second
  return mu, nu


@pytest.mark.parametrize("b2,step", [(0.9, 3), (0.99, 3), (0.999, 3),
                                     (0.9, 200), (0.999, 200)])
def test_state_and_target_at_other_b2(b2, step):
  problem = bias_demo.Problem(b2=b2, step=step)
  pop = bias_demo.population(problem)
  b1, eps = problem.b1, problem.eps
  second = pop.mean**2 + pop.sigma**2  # E[gbar^2] of N(mu, sigma^2)
  mu_state, nu_state = _adam_moments(problem, pop.mean, second)
  assert int(pop.state.count) == step - 1
  np.testing.assert_allclose(pop.state.mu, mu_state, rtol=1e-6)
  np.testing.assert_allclose(pop.state.nu, nu_state, rtol=1e-6)
  # Step t on today's expected batch: the moments' recursion once more.
  expected_p = (b2 * nu_state + (1 - b2) * second) / (1 - b2**step)
  numerator = (b1 * mu_state + (1 - b1) * pop.mean) / (1 - b1**step)
  np.testing.assert_allclose(pop.expected_p, expected_p, rtol=1e-10)
  np.testing.assert_allclose(
      pop.target, numerator / (np.sqrt(expected_p) + eps), rtol=1e-10)
  np.testing.assert_allclose(numerator, pop.mean, rtol=1e-10)
  # E[P(s)] by Monte Carlo of the full-batch mean of M = 8 microbatches.
  atoms = np.random.default_rng(1).standard_normal((20000, 8, problem.dim))
  gbar = bias_demo.microbatch_gradients(pop, atoms, 8).mean(
      axis=1, dtype=np.float64)
  p = (b2 * nu_state + (1 - b2) * gbar**2) / (1 - b2**step)
  z = (p.mean(axis=0) - pop.expected_p) / (
      p.std(axis=0, ddof=1) / np.sqrt(len(p)))
  assert np.max(np.abs(z)) < 4.5, z


@pytest.mark.parametrize("b2,step,kappa", [(0.99, 3, 2.0), (0.9, 20, 1.0)])
def test_meter_matches_quadrature_at_other_b2(b2, step, kappa):
  problem = bias_demo.Problem(b2=b2, step=step, kappa=kappa)
  m = 8
  measured = bias_demo.measure(
      problem, microbatches=(m,), schemes=(None, "loo"), corrections=(None,),
      draws=8192, seed=0, progress=False)
  exact = _reference(problem, m)
  for record in measured:
    assert record["b2"] == b2
    assert record["w2"] == problem.fresh_weights[1]
    _assert_matches_quadrature(record, exact[record["scheme"]])


def test_standard_adam_has_both_biases(meter, reference):
  standard = meter[(None, None)]
  assert standard["coupling"] > 10 * standard["coupling_se"]
  assert standard["inversion"] > 10 * standard["inversion_se"]
  # They pull in opposite directions: the total is less than the coupling.
  assert reference[None]["total"] < reference[None]["coupling"]
  assert standard["shrink"] < 0


def _apart(big, small, key, sigmas):
  """Whether ``big[key] - small[key]`` exceeds ``sigmas`` combined errors."""
  margin = sigmas * np.hypot(big[key + "_se"], small[key + "_se"])
  return big[key] - small[key] > margin


@pytest.mark.parametrize("scheme", ["twofold", "loo"])
def test_cross_fitting_removes_the_coupling(meter, scheme):
  standard, crossfit = meter[(None, None)], meter[(scheme, None)]
  assert crossfit["coupling"] < 3 * crossfit["coupling_se"]
  assert _apart(standard, crossfit, "coupling", 8)


@pytest.mark.parametrize("scheme", [None, "loo"])
def test_jackknife_removes_most_of_the_inversion_bias(meter, scheme):
  plain, corrected = meter[(scheme, None)], meter[(scheme, "jackknife")]
  assert corrected["inversion"] < 0.4 * plain["inversion"]
  assert _apart(plain, corrected, "inversion", 8)


def test_loo_jackknife_reduces_the_total_bias(meter):
  standard, bc = meter[(None, None)], meter[("loo", "jackknife")]
  assert _apart(standard, bc, "total", 3)
  assert _apart(meter[("loo", None)], bc, "total", 3)
  assert _apart(meter[(None, "jackknife")], bc, "total", 3)


def test_rejected_combinations_are_skipped():
  (record,) = bias_demo.measure(
      microbatches=(2,), schemes=("twofold",), corrections=("jackknife",),
      draws=8, progress=False)
  assert "M >= 4" in record["skipped"]


def test_main_writes_png_and_json(tmp_path, capsys):
  bias_demo.main(["--microbatches", "4", "--draws", "64", "--no-progress",
                  "--out", str(tmp_path)])
  assert (tmp_path / "bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "bias.json").read_text())
  assert saved["draws"] == 64
  assert len(saved["results"]) == 12
  assert all(np.isfinite(r["total"]) for r in saved["results"])
  assert {r["b2"] for r in saved["results"]} == {0.95}
  assert saved["problem"]["b2"] == 0.95
  printed = capsys.readouterr().out
  assert "Relative bias" in printed and "loo" in printed
  assert "b2=0.95" in printed and "w2 " not in printed


def test_main_adds_a_b2_axis(tmp_path, capsys):
  b2s = [0.9, 0.999]
  bias_demo.main(["--microbatches", "2", "4", "--draws", "64",
                  "--no-progress", "--b2", *map(str, b2s),
                  "--out", str(tmp_path)])
  assert (tmp_path / "bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "bias.json").read_text())
  assert saved["problem"]["b2"] == b2s
  results = saved["results"]
  keys = {(r["b2"], r["scheme"], r["correction"], r["M"]) for r in results}
  assert len(results) == len(keys) == 2 * 4 * 3 * 2
  assert {k[0] for k in keys} == set(b2s) and {k[3] for k in keys} == {2, 4}
  for r in results:
    assert r["w2"] == bias_demo.Problem(b2=r["b2"]).fresh_weights[1]
  # Each b2 has its own target, so its own (finite) numbers.
  totals = {r["b2"]: r["total"] for r in results
            if r["scheme"] is None and r["correction"] is None and r["M"] == 4}
  assert all(np.isfinite(list(totals.values())))
  assert len(set(totals.values())) == len(b2s)
  printed = capsys.readouterr().out.splitlines()
  rows = [line for line in printed if line[:1].isdigit()]
  # bias_demo.B2_ROWS x b2 in each of the two tables.
  assert len(rows) == 2 * len(bias_demo.B2_ROWS) * len(b2s)
  assert [line.split()[0] for line in rows[:len(bias_demo.B2_ROWS)]] == (
      ["0.9"] * len(bias_demo.B2_ROWS))


def test_parse_args_checks_the_flags_and_runs_nothing(tmp_path, capsys):
  args = bias_demo.parse_args(["--quick", "--out", str(tmp_path / "x")])
  assert args.quick and args.draws == 8192 and args.step == 3
  assert args.microbatches == [4, 8, 16, 32]
  assert not (tmp_path / "x").exists()
  assert args.b2 == [0.95]
  assert bias_demo.parse_args(["--b2", "0.9", "0.999"]).b2 == [0.9, 0.999]
  for bad in (["--step", "1"], ["--microbatches", "4", "6"], ["--draws", "1"]):
    with pytest.raises(SystemExit):
      bias_demo.parse_args(bad)
    assert "must" in capsys.readouterr().err
  for bad in (["1"], ["0"], ["0.9", "1.5"], ["-0.1"]):
    with pytest.raises(SystemExit):
      bias_demo.parse_args(["--b2", *bad])
    assert "--b2 must lie in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("b2", [0.0, 1.0, 1.5, -0.5])
def test_problem_rejects_b2_outside_the_unit_interval(b2):
  with pytest.raises(ValueError, match=r"b2 must lie in \(0, 1\), got"):
    bias_demo.Problem(b2=b2)
