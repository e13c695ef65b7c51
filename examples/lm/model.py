"""A small decoder-only transformer in Flax NNX with Megatron-style tensor parallelism.

Tensor parallelism (Shoeybi et al. 2019, arXiv 1909.08053) is declared on the parameters with
`nnx.with_partitioning` over a ('data', 'model') mesh: q, k, v and the MLP's input layer are
split on their output dimension ("column parallel"), the attention output and the MLP's output
layer on their input dimension ("row parallel"), so each device holds whole heads and a slice of
the MLP. These device-local slices are exactly MuonBP's blocks. Embeddings, the output head and
the norms are replicated (they are small here, and go to AdamW by the default routing: key paths
containing 'embed' or ending in 'head'). Build the model under `jax.set_mesh(mesh)` with such a
mesh (flax places annotated parameters on the context mesh as it creates them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

DATA, MODEL = "data", "model"  # mesh axes
COLUMN = (None, MODEL)  # kernel (in, out) split on `out`
ROW = (MODEL, None)  # kernel (in, out) split on `in`
REPLICATED = (None, None)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    seq: int = 128
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4

    def parameter_count(self) -> tuple[int, int]:
        """(all parameters, those in the blocks' matrices, which the Muon family trains)."""
        d, hidden = self.d_model, self.mlp_ratio * self.d_model
        matrices = self.layers * (4 * d * d + 2 * d * hidden)
        others = 2 * self.vocab * d + self.seq * d + (2 * self.layers + 1) * d
        return matrices + others, matrices

    def check(self, tp: int) -> None:
        """Raises ValueError when the shapes cannot be split `tp` ways as Megatron does."""
        if self.d_model % self.heads:
            raise ValueError(f"--d-model {self.d_model} is not divisible by --heads {self.heads}")
        if self.heads % tp:
            raise ValueError(
                f"--heads {self.heads} is not divisible by the {tp} tensor-parallel blocks; "
                "each block must hold whole heads"
            )


def _linear(d_in: int, d_out: int, spec: tuple, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), spec)
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.heads = cfg.heads
        self.q = _linear(d, d, COLUMN, rngs)
        self.k = _linear(d, d, COLUMN, rngs)
        self.v = _linear(d, d, COLUMN, rngs)
        self.out = _linear(d, d, ROW, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        y = jax.nn.dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.out(y.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        hidden = cfg.mlp_ratio * cfg.d_model
        self.up = _linear(cfg.d_model, hidden, COLUMN, rngs)
        self.down = _linear(hidden, cfg.d_model, ROW, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nnx.Module):
    """Pre-norm decoder, learned positions: tokens (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(
            cfg.vocab,
            cfg.d_model,
            embedding_init=nnx.with_partitioning(normal, REPLICATED),
            rngs=rngs,
        )
        self.pos_embed = nnx.Param(
            nnx.with_partitioning(normal, REPLICATED)(rngs.params(), (cfg.seq, cfg.d_model))
        )
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.head = _linear(cfg.d_model, cfg.vocab, REPLICATED, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.pos_embed[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).astype(jnp.float32)


def block_grids(specs: dict, tp_blocks: int, mesh_tp: int) -> dict:
    """The `block_grid` tree that makes each device-local block hold `tp_blocks`-way tensor-
    parallel blocks when the mesh's model axis has only `mesh_tp` devices: a column-parallel
    kernel is split (1, g) and a row-parallel one (g, 1), g = tp_blocks / mesh_tp. On one GPU
    (mesh_tp = 1) this emulates the blocks of a `tp_blocks`-way run."""
    if tp_blocks % mesh_tp:
        raise ValueError(
            f"--tp-blocks {tp_blocks} is not a multiple of the mesh's model axis ({mesh_tp})"
        )
    g = tp_blocks // mesh_tp

    def grid(spec) -> tuple[int, int]:
        spec = tuple(spec)
        return {COLUMN: (1, g), ROW: (g, 1)}.get(spec, (1, 1))

    return jax.tree.map(grid, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
