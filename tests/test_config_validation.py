"""Every invalid LMI and ELIAS config value (and every shared one) is refused when the method is
built, before any training, with a ValueError naming the field. IRLI's own fields are covered in
test_reliability.py."""
import functools

import pytest

from helpers import load_config
from jaxidx.data import load
from jaxidx.runner import build

LMI, ELIAS = "configs/lmi.py:tiny", "configs/elias.py:tiny"


@functools.cache
def _data(spec):
    return load(spec)


SHARED = [  # validate_common, for every method
    ("train.epochs", -1, "train.epochs"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.learning_rate", 0.0, "train.learning_rate"),
    ("train.log_every", 0, "train.log_every"),
    ("train.checkpoint_every_steps", -1, "train.checkpoint_every_steps"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints"),
    ("search.k", 0, "search.k"),
    ("search.query_batch", 0, "search.query_batch"),
    ("search.n_threads", -1, "search.n_threads"),
    ("search.settings", [], "search.settings"),
    ("model.init_std", -0.1, "model.init_std"),
]
LMI_CASES = [
    ("model.levels", (), "model.levels"),
    ("model.levels", (4, 1), "model.levels"),
    ("model.hidden", ((32,),), "model.hidden"),
    ("model.hidden", ((0,), (16,)), "model.hidden"),
    ("kmeans.kind", "cosine", "kmeans.kind"),
    ("kmeans.init", "farthest", "kmeans.init"),
    ("kmeans.n_iter", -1, "kmeans.n_iter"),
    ("kmeans.max_points_per_centroid", -1, "kmeans.max_points_per_centroid"),
    ("kmeans.init_points_per_centroid", -1, "kmeans.init_points_per_centroid"),
    ("train.target_temperature", -0.5, "train.target_temperature"),
    ("train.node_batch_size", -1, "train.node_batch_size"),
    ("search.settings", [{"n_probe": 17}], "n_probe=17"),  # 4 x 4 = 16 leaves
    ("search.settings", [{"n_probe": 0}], "n_probe=0"),
    ("search.settings", [{"m": 2}], "n_probe=None"),
    ("search.settings", [{"n_probe": 2, "max_candidates": -1}], "max_candidates=-1"),
    ("index.pq4_dims", -2, "index.pq4_dims"),
    ("search.settings", [{"n_probe": 2, "reorder": 50}], "set index.pq4_dims > 0"),  # tiny has no PQ codes
]
ELIAS_CASES = [
    *[(f"model.{name}", 0, f"model.{name}") for name in ("max_leaf", "beam", "kappa", "shortlist", "label_multiple")],
    ("model.max_leaf", 1, "model.max_leaf"),  # 128 clusters for 100 labels
    ("model.teacher_extra", -1, "model.teacher_extra"),
    ("model.alpha", 0.0, "model.alpha"),
    ("model.beta", -1.0, "model.beta"),
    ("model.dropout", 1.0, "model.dropout"),
    ("model.dropout", -0.1, "model.dropout"),
    ("model.input", "tfidf", "model.input"),
    ("model.input", "text", "model.input: 'text' needs a data set with raw text"),
    ("model.layout", "csr", "model.layout"),
    ("train.label_optimizer", "sgd", "train.label_optimizer"),
    ("train.label_optimizer", "lazy", "needs model.layout 'sparse'"),  # tiny's layout is dense
    ("model.hidden", (0,), "model.hidden"),
    ("train.stage2_epochs", -1, "train.stage2_epochs"),
    ("train.encoder_learning_rate", 0.0, "train.encoder_learning_rate"),
    ("train.warmup", 1.0, "train.warmup"),
    ("model.lam", -0.1, "model.lam"),
    ("train.weight_decay", -0.01, "train.weight_decay"),
    ("search.settings", [{"beam": 0, "shortlist": 40}], "beam and shortlist"),
    ("search.settings", [{"beam": 4, "shortlist": 0}], "beam and shortlist"),
    ("search.settings", [{"beam": 4, "backend": "gpu"}], "backend"),
]


@pytest.mark.parametrize("preset, field, value, needle",
                         [(LMI, *c) for c in SHARED + LMI_CASES] + [(ELIAS, *c) for c in SHARED + ELIAS_CASES])
def test_invalid_value_is_refused_naming_the_field(preset, field, value, needle):
    config = load_config(preset, **{field: value})
    with pytest.raises(ValueError) as err:
        build(config, data=_data(config.data))
    assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("preset", [LMI, ELIAS])
def test_presets_are_valid(preset):
    config = load_config(preset)
    build(config, data=_data(config.data))
