"""Input encoders phi(x) -> [b, d] for ELIAS-style label classifiers.

The original ELIAS fine-tunes a transformer; on tf-idf / bag-of-words input
an MLP does the same job cheaply: a sparse embedding-bag first layer (or a
dense one for dense features), ReLU hidden layers, then dropout on the
embedding (0.5 in the original).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

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
