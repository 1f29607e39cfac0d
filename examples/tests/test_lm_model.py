"""Tests of examples/lm/model.py against independent numpy restatements."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.lm import model as model_lib

SMALL = model_lib.Config(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, d_ff=48, rope_theta=500.0)


@pytest.fixture(scope="module")
def model():
  """One SMALL model for the module, initialised in one compiled call."""
  return nnx.jit(lambda: model_lib.Transformer(SMALL, rngs=nnx.Rngs(0)))()


forward = nnx.jit(lambda module, x: module(x))   # jitted call of any module


def qwen2_param_count(v, d, layers, h, k, e, f):
  """Qwen2 parameters from its architecture (tied embeddings)."""
  attention = d * h * e + h * e + 2 * (d * k * e + k * e) + h * e * d
  mlp = 3 * d * f
  norms = 2 * d
  return v * d + layers * (attention + mlp + norms) + d


def test_qwen25_05b_parameter_count():
  cfg = dataclasses.replace(model_lib.PRESETS["qwen2.5-0.5b"],
                            vocab_size=151936)
  n = model_lib.count_params(model_lib.abstract_params(cfg))
  assert n == 494_032_768
  assert n == qwen2_param_count(151936, 896, 24, 14, 2, 64, 4864)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_preset_counts_match_formula(preset):
  cfg = model_lib.PRESETS[preset]
  n = model_lib.count_params(model_lib.abstract_params(cfg))
  assert n == qwen2_param_count(cfg.vocab_size, cfg.d_model, cfg.num_layers,
                                cfg.num_heads, cfg.num_kv_heads,
                                cfg.head_width, cfg.d_ff)
  if preset == "tiny":
    assert 2e5 <= n <= 2e6


def test_shapes_and_tied_embeddings(model):
  tokens = jnp.zeros((3, 7), jnp.int32)
  logits = forward(model, tokens)
  assert logits.shape == (3, 7, 64) and logits.dtype == jnp.float32
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert set(params) == {"embed", "layers", "norm"}   # no separate lm head
  attn = params["layers"][0]["attn"]
  assert "bias" in attn["q_proj"] and "bias" in attn["k_proj"]
  assert "bias" in attn["v_proj"] and "bias" not in attn["o_proj"]
  assert attn["k_proj"]["kernel"].shape == (32, 2 * 8)


def test_causal(model):
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 64)
  a, b = forward(model, tokens), forward(model, changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_rms_norm_matches_numpy(model):
  norm = nnx.clone(model.layers[0].attn_norm)
  scale = np.random.default_rng(0).normal(size=32).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  x = np.random.default_rng(1).normal(size=(2, 5, 32)).astype(np.float32) * 3
  np.testing.assert_allclose(forward(norm, jnp.asarray(x)),
                             np_rms_norm(x, scale, SMALL.norm_eps),
                             rtol=1e-5, atol=1e-5)


def np_rope(x, theta):
  """Pairs (i, i + E/2) as complex numbers, rotated by pos * theta^(-2i/E)."""
  _, t, _, e = x.shape
  z = x[..., : e // 2] + 1j * x[..., e // 2:]
  freq = theta ** (-2.0 * np.arange(e // 2) / e)
  z = z * np.exp(1j * np.arange(t)[None, :, None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_complex_rotation_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 3, 16))
  np.testing.assert_allclose(model_lib.rope(jnp.asarray(x, jnp.float32), 1e4),
                             np_rope(x, 1e4), rtol=1e-4, atol=1e-5)
  # <rope(q)_m, rope(k)_n> depends on m - n only.
  q, k = rng.normal(size=16), rng.normal(size=16)
  seq = lambda v: np.broadcast_to(v, (1, 9, 1, 16)).astype(np.float32)
  rq = np.asarray(model_lib.rope(jnp.asarray(seq(q)), 100.0))[0, :, 0]
  rk = np.asarray(model_lib.rope(jnp.asarray(seq(k)), 100.0))[0, :, 0]
  np.testing.assert_allclose(rq[5] @ rk[2], rq[3] @ rk[0], rtol=1e-4)
  np.testing.assert_allclose(rq[8] @ rk[8], q @ k, rtol=1e-4)


def np_attention(x, p, cfg):
  """Multi-head attention with each key/value head repeated H/K times."""
  b, t, _ = x.shape
  h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_width
  lin = lambda name, y: y @ p[name]["kernel"] + p[name].get("bias", 0.0)
  q = np_rope(lin("q_proj", x).reshape(b, t, h, e), cfg.rope_theta)
  kk = np_rope(lin("k_proj", x).reshape(b, t, k, e), cfg.rope_theta)
  v = lin("v_proj", x).reshape(b, t, k, e)
  kk, v = np.repeat(kk, h // k, axis=2), np.repeat(v, h // k, axis=2)
  scores = np.einsum("bqhe,bkhe->bhqk", q, kk) / np.sqrt(e)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhe->bqhe", w, v).reshape(b, t, h * e)
  return out @ p["o_proj"]["kernel"]


def test_gqa_attention_equals_repeated_kv_heads(model):
  attn = nnx.clone(model.layers[0].attn)
  # Non-zero biases so they are exercised.
  for name in ("q_proj", "k_proj", "v_proj"):
    layer = getattr(attn, name)
    layer.bias[...] = 0.1 * jax.random.normal(jax.random.key(3),
                                              layer.bias.shape)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64),
                   nnx.to_pure_dict(nnx.state(attn, nnx.Param)))
  x = np.random.default_rng(4).normal(size=(2, 6, 32))
  np.testing.assert_allclose(forward(attn, jnp.asarray(x, jnp.float32)),
                             np_attention(x, p, SMALL), rtol=1e-4, atol=1e-5)


def test_swiglu_matches_numpy(model):
  mlp = model.layers[1].mlp
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(mlp, nnx.Param)))
  x = np.random.default_rng(6).normal(size=(3, 32)).astype(np.float32)
  g = x @ p["gate_proj"]["kernel"]
  expected = (g / (1 + np.exp(-g)) * (x @ p["up_proj"]["kernel"])
              ) @ p["down_proj"]["kernel"]
  np.testing.assert_allclose(forward(mlp, jnp.asarray(x)), expected, rtol=1e-4,
                             atol=1e-6)


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    model_lib.Transformer(dataclasses.replace(SMALL, num_kv_heads=3),
                          rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="even head width"):
    dataclasses.replace(SMALL, head_dim=7).validate()
