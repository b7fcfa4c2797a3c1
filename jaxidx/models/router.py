"""MLP routers: x -> bucket logits. R independent networks share one module with
stacked parameters (`nn.vmap`), so one jitted step trains all of them.

Inputs are dense `[b, d]` arrays or sparse rows `{'idx': [b, F] int32,
'val': [b, F] float32}` (padding has value 0); a sparse first layer is an
embedding bag, sum_f val_f * W[idx_f], i.e. X @ W without densifying X.
"""
from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Input = Union[jax.Array, dict]


def _init(std: float):
    return nn.initializers.truncated_normal(std) if std > 0 else nn.initializers.lecun_normal()


class SparseDense(nn.Module):
    """Dense layer on padded sparse rows (embedding bag weighted by the values)."""

    n_features: int
    features: int
    init_std: float = 0.05

    @nn.compact
    def __call__(self, x: dict) -> jax.Array:
        w = self.param("kernel", _init(self.init_std), (self.n_features, self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.einsum("bf,bfh->bh", x["val"], jnp.take(w, x["idx"], axis=0)) + b


class MLP(nn.Module):
    """d -> hidden... (ReLU) -> out. Returns (last hidden activation, logits)."""

    hidden: Sequence[int]
    out: int
    n_features: int = 0  # > 0: sparse input with this many features
    init_std: float = 0.05

    @nn.compact
    def __call__(self, x: Input) -> tuple[jax.Array, jax.Array]:
        if not self.hidden and self.n_features:
            raise ValueError("model.hidden: a sparse-input router needs at least one hidden layer")
        h = hidden_layers(x, self.hidden, self.n_features, self.init_std)
        return h, nn.Dense(self.out, kernel_init=_init(self.init_std), name="head")(h)


def hidden_layers(x: Input, hidden: Sequence[int], n_features: int, init_std: float) -> jax.Array:
    """ReLU layers named layer0, layer1, ... (layer0 an embedding bag when n_features > 0).

    Call it from a module's compact `__call__`: the layers become that module's
    submodules (flax parents them to the module being called).
    """
    h = x
    for i, width in enumerate(hidden):
        if i == 0 and n_features:
            h = SparseDense(n_features, width, init_std, name="layer0")(h)
        else:
            h = nn.Dense(width, kernel_init=_init(init_std), name=f"layer{i}")(h)
        h = nn.relu(h)
    return h


class RepeatedMLP(nn.Module):
    """R independent MLPs with stacked params: x -> (hidden [b, R, H], logits [b, R, B])."""

    n_reps: int
    hidden: Sequence[int]
    out: int
    n_features: int = 0
    init_std: float = 0.05

    @nn.compact
    def __call__(self, x: Input) -> tuple[jax.Array, jax.Array]:
        stacked = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=None, out_axes=1, axis_size=self.n_reps)
        return stacked(self.hidden, self.out, self.n_features, self.init_std, name="nets")(x)


def affine_head(params: dict, h_sum: jax.Array, counts: jax.Array) -> jax.Array:
    """Head of a RepeatedMLP applied to *sums* of hidden activations.

    Since the head is affine, the sum of logits over a label's n examples is
    h_sum @ W + n * b. `h_sum` [R, n, H], `counts` [n] -> [R, n, B].
    """
    head = params["params"]["nets"]["head"]
    return jnp.einsum("rnh,rhb->rnb", h_sum, head["kernel"]) + counts[None, :, None] * head["bias"][:, None, :]
