"""A Qwen2-style decoder-only transformer in Flax NNX.

RMSNorm pre-norm, rotary position embeddings (RoPE, "rotate half" layout as in
Qwen2/Llama), grouped-query attention with bias on the q/k/v projections and
none on the output projection, a SwiGLU MLP and tied input/output embeddings.
``Config`` holds the shapes; ``PRESETS`` names a few of them;
``make_loss_fns`` gives the logits and the next-token loss as pure functions
of a parameter dict (for ``jax.vmap``/``jax.grad`` over microbatches). With
``PRESETS["qwen2.5-0.5b"]`` and ``vocab_size=151936`` the parameter count is
Qwen2.5-0.5B's, 494,032,768.

Sharding: every matrix carries a Flax partitioning annotation that splits
its model-width dimension (D; the vocabulary of the embedding) over the mesh
axis ``FSDP``; vectors (biases, norm scales) are replicated.
``partition_specs(cfg)`` reads them back as ``jax.P`` per parameter. The
annotations are metadata only (no eager sharding), so the model is built
anywhere and placed by ``jit``'s shardings.

Shape suffixes: B batch, T sequence, D model width, H query heads, K key/value
heads, E head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx


FSDP = "fsdp"   # mesh axis of the parameters (and optimizer state) shards


def sharded(std: float, spec: Sequence[str | None]):
  """A normal(std) initializer annotated with the partitioning ``spec``."""
  return nnx.with_partitioning(nnx.initializers.normal(std), tuple(spec),
                               eager_sharding=False)


@dataclasses.dataclass(frozen=True)
class Config:
  """Model shapes and constants."""

  vocab_size: int = 256          # V: 256 for the byte tokenizer of data.py
  d_model: int = 128             # D: residual stream width
  num_layers: int = 4            # number of transformer blocks
  num_heads: int = 4             # H: query heads
  num_kv_heads: int = 2          # K: key/value heads (H % K == 0; K == H is plain MHA)
  head_dim: int | None = None    # E: per-head width (None: d_model // num_heads)
  d_ff: int = 384                # F: hidden width of the SwiGLU MLP
  rope_theta: float = 10_000.0   # RoPE base (Qwen2.5 uses 1e6)
  norm_eps: float = 1e-6         # RMSNorm epsilon
  init_std: float = 0.02         # std of the normal initializer of every matrix

  @property
  def head_width(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def validate(self) -> None:
    """Raises ValueError for inconsistent shapes."""
    for name in ("vocab_size", "d_model", "num_layers", "num_heads",
                 "num_kv_heads", "d_ff"):
      if getattr(self, name) < 1:
        raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.head_width % 2:
      raise ValueError(f"RoPE needs an even head width, got {self.head_width}")


PRESETS: dict[str, Config] = {
    # CPU default: ~0.8M parameters with the byte vocabulary.
    "tiny": Config(),
    # A bigger CPU/GPU setting: ~11M parameters with the byte vocabulary.
    "small": Config(d_model=384, num_layers=6, num_heads=6, num_kv_heads=2,
                    d_ff=1024),
    # Qwen2.5-0.5B's shapes (use --vocab-size 151936 for its exact count).
    "qwen2.5-0.5b": Config(d_model=896, num_layers=24, num_heads=14,
                           num_kv_heads=2, d_ff=4864, rope_theta=1e6),
}


def rope(x_BxTxNxE: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (i, i + E/2) of every head by position * theta^(-2i/E)."""
  _, t, _, e = x_BxTxNxE.shape
  inv_freq = theta ** (-jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  angle_TxE2 = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angle_TxE2)[None, :, None, :]
  sin = jnp.sin(angle_TxE2)[None, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxE.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    init = sharded(cfg.init_std, (FSDP, None))       # (D, out): D sharded
    init_out = sharded(cfg.init_std, (None, FSDP))   # (in, D)
    e = cfg.head_width
    self.num_heads, self.num_kv_heads, self.head_dim = (
        cfg.num_heads, cfg.num_kv_heads, e)
    self.rope_theta = cfg.rope_theta
    self.q_proj = nnx.Linear(cfg.d_model, cfg.num_heads * e, kernel_init=init,
                             rngs=rngs)
    self.k_proj = nnx.Linear(cfg.d_model, cfg.num_kv_heads * e,
                             kernel_init=init, rngs=rngs)
    self.v_proj = nnx.Linear(cfg.d_model, cfg.num_kv_heads * e,
                             kernel_init=init, rngs=rngs)
    self.o_proj = nnx.Linear(cfg.num_heads * e, cfg.d_model, use_bias=False,
                             kernel_init=init_out, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    b, t, _ = x_BxTxD.shape
    q_BxTxHxE = self.q_proj(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim)
    k_BxTxKxE = self.k_proj(x_BxTxD).reshape(b, t, self.num_kv_heads,
                                             self.head_dim)
    v_BxTxKxE = self.v_proj(x_BxTxD).reshape(b, t, self.num_kv_heads,
                                             self.head_dim)
    q_BxTxHxE = rope(q_BxTxHxE, self.rope_theta)
    k_BxTxKxE = rope(k_BxTxKxE, self.rope_theta)
    # Each group of H / K query heads shares one key/value head.
    out_BxTxHxE = jax.nn.dot_product_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE,
                                               is_causal=True)
    return self.o_proj(out_BxTxHxE.reshape(b, t, -1))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    init = sharded(cfg.init_std, (FSDP, None))
    self.gate_proj = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=False,
                                kernel_init=init, rngs=rngs)
    self.up_proj = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=False,
                              kernel_init=init, rngs=rngs)
    self.down_proj = nnx.Linear(cfg.d_ff, cfg.d_model, use_bias=False,
                                kernel_init=sharded(cfg.init_std,
                                                    (None, FSDP)),
                                rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.down_proj(nnx.silu(self.gate_proj(x_BxTxD))
                          * self.up_proj(x_BxTxD))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD))
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))


class Transformer(nnx.Module):
  """Token ids (B, T) -> next-token logits (B, T, V) in float32."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    cfg.validate()
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                           embedding_init=sharded(cfg.init_std, (FSDP, None)),
                           rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    x_BxTxD = self.embed(tokens_BxT)
    for layer in self.layers:
      x_BxTxD = layer(x_BxTxD)
    logits_BxTxV = self.embed.attend(self.norm(x_BxTxD))   # tied embeddings
    return logits_BxTxV.astype(jnp.float32)


def count_params(params) -> int:
  """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def abstract_params(cfg: Config):
  """The parameter tree as ShapeDtypeStructs, without allocating it."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def partition_specs(cfg: Config) -> dict:
  """The parameter dict's ``jax.P`` per leaf, from the model's annotations."""
  return nnx.to_pure_dict(nnx.get_partition_spec(abstract_params(cfg)))


def make_loss_fns(cfg: Config):
  """``(logits_fn, loss_fn)`` of the model, pure in a parameter dict.

  The parameter dict is ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
  ``logits_fn(params, tokens_BxT) -> logits_BxTxV``; ``loss_fn(params,
  windows_BxT1)`` is the mean next-token cross-entropy of windows of
  ``T + 1`` tokens (inputs ``[:, :-1]``, targets ``[:, 1:]``).
  """
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

  def logits_fn(params, tokens_BxT: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(tokens_BxT)

  def loss_fn(params, windows_BxT1: jax.Array) -> jax.Array:
    logits_BxTxV = logits_fn(params, windows_BxT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV, windows_BxT1[:, 1:]).mean()

  return logits_fn, loss_fn
