"""Input encoders phi(x) -> [b, d] for ELIAS-style label classifiers.

The original ELIAS fine-tunes a transformer; on tf-idf / bag-of-words input
an MLP does the same job cheaply: a sparse embedding-bag first layer (or a
dense one for dense features), ReLU hidden layers, then dropout on the
embedding (0.5 in the original). For data sets with raw text, a small
transformer trained from scratch over token ids is the other option.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxidx.models.router import Input, hidden_layers


class MLPEncoder(nn.Module):
    """x -> relu(layer_i(...)) for each hidden width -> dropout. Output width is hidden[-1].

    `n_features` > 0: x is padded sparse rows {'idx', 'val'} (embedding bag);
    0: x is a dense [b, d] array.
    """

    hidden: Sequence[int]
    n_features: int = 0
    dropout: float = 0.5
    init_std: float = 0.0  # 0 = lecun normal

    @nn.compact
    def __call__(self, x: Input, deterministic: bool = True) -> jax.Array:
        if not self.hidden:
            raise ValueError("model.hidden: the encoder needs at least one layer")
        h = hidden_layers(x, self.hidden, self.n_features, self.init_std)
        return nn.Dropout(self.dropout, deterministic=deterministic)(h)


class TransformerEncoder(nn.Module):
    """Token ids [b, T] (0 = padding) -> pre-LN transformer -> masked mean pool -> ReLU layers -> dropout.

    Learned token and position embeddings of width `dim`; each block is
    self-attention over the non-padding tokens and a GELU MLP of width
    `mlp_ratio * dim`, both residual. Output width is hidden[-1].
    """

    vocab_size: int
    hidden: Sequence[int]
    max_len: int
    dim: int = 128
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.5
    init_std: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        if not self.hidden:
            raise ValueError("model.hidden: the encoder needs at least one layer")
        mask = tokens > 0
        pos = nn.Embed(self.max_len, self.dim, name="position")(jnp.arange(tokens.shape[1]))
        h = nn.Embed(self.vocab_size, self.dim, name="token")(tokens) + pos
        attend = nn.make_attention_mask(mask, mask)
        for i in range(self.layers):
            y = nn.LayerNorm(name=f"block{i}_ln1")(h)
            h = h + nn.MultiHeadDotProductAttention(self.heads, name=f"block{i}_attention")(y, y, mask=attend)
            y = nn.LayerNorm(name=f"block{i}_ln2")(h)
            y = nn.Dense(self.mlp_ratio * self.dim, name=f"block{i}_mlp_in")(y)
            h = h + nn.Dense(self.dim, name=f"block{i}_mlp_out")(nn.gelu(y))
        h = nn.LayerNorm(name="final_ln")(h)
        w = mask[..., None].astype(h.dtype)
        pooled = jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        out = hidden_layers(pooled, self.hidden, 0, self.init_std)
        return nn.Dropout(self.dropout, deterministic=deterministic)(out)
