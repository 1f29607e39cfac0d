"""The bias meter (examples/bias_demo.py): its numbers and its result.

The meter's estimates of the standard and uncorrected cross-fit updates are
checked against Gauss-Hermite quadrature of the SPEC section 3 formulas (the
expectations are one-dimensional integrals per coordinate), and the
bias-meter result is asserted with margins of several Monte Carlo errors:
cross-fitting removes the coupling bias, the jackknife removes most of the
inversion bias, and LOO + jackknife has a smaller total bias than standard
Adam.
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


@pytest.fixture(scope="module")
def reference():
  problem = bias_demo.Problem()
  pop = bias_demo.population(problem)
  mu_state = np.asarray(pop.state.mu, np.float64)
  nu_state = np.asarray(pop.state.nu, np.float64)
  out = {}
  for scheme, inflation in ((None, 1.0), ("loo", M / (M - 1)),
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


def test_target_is_the_closed_form(reference):
  pop = bias_demo.population(bias_demo.Problem())
  np.testing.assert_allclose(pop.target, reference[None]["target"], rtol=1e-6)


@pytest.mark.parametrize("scheme", [None, "loo", "twofold"])
def test_uncorrected_bias_matches_quadrature(meter, reference, scheme):
  measured, exact = meter[(scheme, None)], reference[scheme]
  for part in ("total", "coupling", "inversion"):
    error = abs(measured[part] - exact[part])
    assert error < 3 * measured[part + "_se"] + 1e-4, (
        part, measured[part], exact[part], measured[part + "_se"])
  np.testing.assert_allclose(measured["group_size"], exact["group_size"],
                             rtol=1e-6, atol=1e-9)


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
  printed = capsys.readouterr().out
  assert "Relative bias" in printed and "loo" in printed


def test_parse_args_checks_the_flags_and_runs_nothing(tmp_path, capsys):
  args = bias_demo.parse_args(["--quick", "--out", str(tmp_path / "x")])
  assert args.quick and args.draws == 8192 and args.step == 3
  assert args.microbatches == [4, 8, 16, 32]
  assert not (tmp_path / "x").exists()
  for bad in (["--step", "1"], ["--microbatches", "4", "6"], ["--draws", "1"]):
    with pytest.raises(SystemExit):
      bias_demo.parse_args(bad)
    assert "must" in capsys.readouterr().err
