"""tensorflow-datasets builders for the shared XMC sets and GloVe, stored as ArrayRecord.

No TensorFlow needed: features are plain `tfds.features.Tensor`s with numpy
dtypes (a sparse row is a pair of variable-length id / value tensors), and
data is read back through `as_data_source()` (ArrayRecord random access).
Training code works on in-memory arrays, so `load_tfds` rebuilds the same
`XMCData` / `ANNData` that the text readers give.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
import tensorflow_datasets as tfds
from etils import epath

from jaxidx.data.ann import load_glove
from jaxidx.data.specs import XMC_SHORT_NAMES, xmc_data_dir
from jaxidx.data.types import ANNData, XMCData
from jaxidx.data.xmc import read_xmc


def _ragged(dtype) -> tfds.features.Tensor:
    """A variable-length 1-d feature (one sparse row's ids or values)."""
    return tfds.features.Tensor(shape=(None,), dtype=dtype)



class _ModuleCodePath:
    """Gives tfds this module's path directly: tfds 4.9.10 otherwise computes it
    through `importlib_resources`, which it uses on Python >= 3.9 but declares
    only for < 3.9, so a builder inside a package fails where that is missing."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


class XmcRepository(_ModuleCodePath, tfds.core.GeneratorBasedBuilder):
    """XMC repository text files (train.txt / test.txt), one config per shared data set."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in XMC_SHORT_NAMES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Set manual_dir to the directory holding <config>/train.txt and <config>/test.txt "
        "(e.g. shared/data/xmc), or to the data set's own directory.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Extreme multi-label classification data, XMC repository format.",
            features=tfds.features.FeaturesDict({
                "row": tfds.features.Tensor(shape=(), dtype=np.int64),
                "feature_ids": _ragged(np.int32), "feature_values": _ragged(np.float32), "labels": _ragged(np.int32),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        src = root / self.builder_config.name if (root / self.builder_config.name).is_dir() else root
        splits = {split: read_xmc(src / f"{split}.txt") for split in ("train", "test")}
        self.info.metadata["n_features"] = splits["train"][0].shape[1]
        self.info.metadata["n_labels"] = splits["train"][1].shape[1]
        return {split: self._generate_examples(X, Y) for split, (X, Y) in splits.items()}

    def _generate_examples(self, X: sp.csr_matrix, Y: sp.csr_matrix):
        for i in range(X.shape[0]):
            xs, ys = slice(X.indptr[i], X.indptr[i + 1]), slice(Y.indptr[i], Y.indptr[i + 1])
            yield i, {"row": i, "feature_ids": X.indices[xs], "feature_values": X.data[xs], "labels": Y.indices[ys]}


class Glove6b50d(_ModuleCodePath, tfds.core.GeneratorBasedBuilder):
    """GloVe 6B 50d, canonical jaxidx split, angular (normalised), exact top-100 ground truth."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="GloVe 6B 50d word vectors (PDDL-1.0): base 390000 / queries 10000; "
                        "neighbors/distances are filled for queries only.",
            features=tfds.features.FeaturesDict({
                "row": tfds.features.Tensor(shape=(), dtype=np.int64),
                "embedding": tfds.features.Tensor(shape=(50,), dtype=np.float32),
                "neighbors": _ragged(np.int32), "distances": _ragged(np.float32),
            }),
        )

    def _split_generators(self, dl_manager):
        data = load_glove()
        none_ids, none_dist = np.zeros(0, np.int32), np.zeros(0, np.float32)
        return {
            "base": self._generate_examples(data.base, [none_ids] * data.n_items, [none_dist] * data.n_items),
            "queries": self._generate_examples(data.queries, data.gt_ids, data.gt_dist),
        }

    def _generate_examples(self, vectors, neighbors, distances):
        for i, (v, nb, dist) in enumerate(zip(vectors, neighbors, distances)):
            yield i, {"row": i, "embedding": v, "neighbors": nb, "distances": dist}


# data set name (as in data specs) -> tfds builder name
TFDS_NAMES = {**{name: f"xmc_repository/{name}" for name in XMC_SHORT_NAMES}, "glove-6b-50d": "glove6b50d"}


def load_tfds(name: str, data_dir: Union[str, Path], manual_dir: Optional[Union[str, Path]] = None
              ) -> Union[XMCData, ANNData]:
    """Build the data set `name` (a key of TFDS_NAMES) under `data_dir` if needed and
    return it in memory. `manual_dir` (XMC only) defaults to `xmc_data_dir()`."""
    if name not in TFDS_NAMES:
        raise ValueError(f"load_tfds: unknown data set {name!r}; valid: {', '.join(TFDS_NAMES)}")
    builder = tfds.builder(TFDS_NAMES[name], data_dir=str(data_dir), file_format="array_record")
    manual_dir = manual_dir if manual_dir is not None else xmc_data_dir()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    source = builder.as_data_source()
    if name == "glove-6b-50d":
        base, queries = _records(source["base"]), _records(source["queries"])
        return ANNData(name=name, base=np.stack(base["embedding"]), queries=np.stack(queries["embedding"]),
                       metric="angular", gt_ids=np.stack(queries["neighbors"]),
                       gt_dist=np.stack(queries["distances"]))
    shape = (builder.info.metadata["n_features"], builder.info.metadata["n_labels"])
    (X_train, Y_train), (X_test, Y_test) = (_xmc_split(_records(source[s]), shape) for s in ("train", "test"))
    return XMCData(name=name, X_train=X_train, Y_train=Y_train, X_test=X_test, Y_test=Y_test)


def _records(source) -> dict:
    """All records of an ArrayRecord split as {feature: list in row order}."""
    records = source.__getitems__(range(len(source)))
    records.sort(key=lambda r: int(r["row"]))
    return {key: [r[key] for r in records] for key in records[0]}


def _xmc_split(records: dict, shape) -> tuple:
    def csr(ids, values, width):
        indptr = np.concatenate([[0], np.cumsum([len(i) for i in ids])])
        return sp.csr_matrix((np.concatenate(values).astype(np.float32), np.concatenate(ids), indptr),
                             shape=(len(ids), width))

    labels = records["labels"]
    X = csr(records["feature_ids"], records["feature_values"], shape[0])
    Y = csr(labels, [np.ones(len(y), np.float32) for y in labels], shape[1])
    return X, Y
