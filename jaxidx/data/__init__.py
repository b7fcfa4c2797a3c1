"""Data sets for jaxidx: readers, the GloVe split, synthetic generators, exact ground truth.

`load(spec)` turns one spec string into an in-memory `XMCData` or `ANNData`.
The tensorflow-datasets builders live in `jaxidx.data.tfds_builders` (imported
on demand, as tensorflow-datasets is slow to import).
"""
from jaxidx.data.ann import cache_dir, glove_split, load_glove, normalize_rows, read_ann_hdf5
from jaxidx.data.groundtruth import exact_knn, knn_chunk_sizes, knn_labels
from jaxidx.data.specs import SPEC_FORMS, load, load_xmc, repo_root, resolve_path, xmc_data_dir
from jaxidx.data.synthetic import synthetic_ann, synthetic_xmc
from jaxidx.data.types import ANN_METRICS, KERNEL_METRIC, ANNData, XMCData, benchmark_distance
from jaxidx.data.xmc import read_xmc, write_xmc

__all__ = [
    "ANN_METRICS", "KERNEL_METRIC", "ANNData", "XMCData", "benchmark_distance",
    "read_xmc", "write_xmc", "load_xmc", "read_ann_hdf5", "load_glove", "glove_split", "normalize_rows",
    "cache_dir", "exact_knn", "knn_chunk_sizes", "knn_labels", "synthetic_ann", "synthetic_xmc",
    "load", "SPEC_FORMS", "repo_root", "resolve_path", "xmc_data_dir",
]
