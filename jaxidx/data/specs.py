"""One string names every data set: `load(spec)` for configs and entry points."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Union

from jaxidx.data import text
from jaxidx.data.ann import load_glove, read_ann_hdf5
from jaxidx.data.synthetic import glove_copies, synthetic_ann, synthetic_xmc
from jaxidx.data.types import ANNData, XMCData
from jaxidx.data.xmc import read_xmc

XMC_SHORT_NAMES = ("bibtex", "delicious", "debian-depends")

SPEC_FORMS = (
    "glove-6b-50d[:base=N,queries=N]",
    "glove-copies[:base=N,queries=N,noise=,seed=] (GloVe grown by noisy copies, for scaling studies)",
    "ann-hdf5:PATH",
    "xmc:DIR (holding train.txt and test.txt) | xmc:TRAIN_PATH,TEST_PATH",
    " | ".join(XMC_SHORT_NAMES) + " (in $JAXIDX_SHARED_DATA, default <repo>/../shared/data/xmc)",
    "synthetic-ann[:n=,q=,d=,clusters=,metric=,seed=,scale=,offset=,zipf=]",
    "glove-6b-50d-raw[:base=N,queries=N] (unnormalised, euclidean)",
    "xmc-dense:NAME | xmc-svd:NAME[,dim=256] (an XMC set's feature rows as euclidean ANN points)",
    "synthetic-xmc[:n=,test=,features=,labels=,per_example=,per_label=,zipf=,seed=]",
)

TEXT_MIN_COUNT, TEXT_MAX_LEN = 2, 32  # vocabulary: training tokens seen twice; tokens kept per row

# key -> (keyword argument, type) for the parameterised forms
_GLOVE_KEYS = {"base": ("n_base", int), "queries": ("n_queries", int)}
_GLOVE_COPIES_KEYS = dict(_GLOVE_KEYS, noise=("noise", float), seed=("seed", int))
_SYNTHETIC_ANN_KEYS = {"n": ("n_base", int), "q": ("n_queries", int), "d": ("dim", int),
                       "clusters": ("n_clusters", int), "metric": ("metric", str), "seed": ("seed", int),
                       "scale": ("scale", float), "offset": ("offset", float), "zipf": ("zipf", float)}
_SYNTHETIC_XMC_KEYS = {"n": ("n_train", int), "test": ("n_test", int), "features": ("n_features", int),
                       "labels": ("n_labels", int), "per_example": ("labels_per_example", float),
                       "per_label": ("features_per_label", int), "zipf": ("zipf", float), "seed": ("seed", int)}


def repo_root() -> Path:
    """The checkout holding the `jaxidx` package."""
    return Path(__file__).resolve().parents[2]


def xmc_data_dir() -> Path:
    """Directory holding the shared real XMC sets (`<name>/train.txt`, `<name>/test.txt`):
    `$JAXIDX_SHARED_DATA`, default `<repo>/../shared/data/xmc`."""
    env = os.environ.get("JAXIDX_SHARED_DATA")
    return Path(env) if env else repo_root().parent / "shared" / "data" / "xmc"


def resolve_path(path: Union[str, Path]) -> Path:
    """A relative path is tried against the current directory, then the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_repo = repo_root() / p
    return in_repo if in_repo.exists() else p


def absolute_spec(spec: str) -> str:
    """The spec with its file paths absolute (`ann-hdf5:PATH`, `xmc:DIR`, `xmc:TRAIN,TEST`), resolved as
    `load` resolves them, so a config stored in a checkpoint loads from any directory."""
    kind, sep, body = spec.partition(":")
    if kind == "ann-hdf5" and body:
        return f"ann-hdf5:{resolve_path(body).absolute()}"
    if kind == "xmc" and body:
        return "xmc:" + ",".join(str(resolve_path(p).absolute()) for p in body.split(","))
    return spec


def load_xmc(train_path, test_path, name: str) -> XMCData:
    """Read a train/test pair of XMC repository files; their dimensions must agree."""
    X_train, Y_train = read_xmc(train_path)
    X_test, Y_test = read_xmc(test_path)
    if X_train.shape[1] != X_test.shape[1] or Y_train.shape[1] != Y_test.shape[1]:
        raise ValueError(f"{name}: train has {X_train.shape[1]} features / {Y_train.shape[1]} labels, "
                         f"test has {X_test.shape[1]} / {Y_test.shape[1]}")
    return XMCData(name=name, X_train=X_train, Y_train=Y_train, X_test=X_test, Y_test=Y_test)


def load(spec: str) -> Union[XMCData, ANNData]:
    """Load the data set named by `spec`; see SPEC_FORMS."""
    kind, sep, body = spec.partition(":")
    if kind == "glove-6b-50d":
        return load_glove(**_params(spec, body, _GLOVE_KEYS))
    if kind == "glove-6b-50d-raw":
        from jaxidx.data.suite import glove_raw
        return glove_raw(**_params(spec, body, _GLOVE_KEYS))
    if kind in ("xmc-dense", "xmc-svd") and body:
        from jaxidx.data.suite import xmc_rows
        source, _, rest = body.partition(",")
        dim = _params(spec, rest, {"dim": ("dim", int)}).get("dim", 256) if kind == "xmc-svd" else 0
        return xmc_rows(load(source), spec, dim)
    if kind == "glove-copies":
        return glove_copies(**_params(spec, body, _GLOVE_COPIES_KEYS))
    if kind == "synthetic-ann":
        return synthetic_ann(**_params(spec, body, _SYNTHETIC_ANN_KEYS))
    if kind == "synthetic-xmc":
        return synthetic_xmc(**_params(spec, body, _SYNTHETIC_XMC_KEYS))
    if kind == "ann-hdf5" and body:
        return read_ann_hdf5(resolve_path(body))
    if kind == "xmc" and body:
        return _load_xmc_spec(body)
    if kind in XMC_SHORT_NAMES and not sep:
        return _load_xmc_dir(xmc_data_dir() / kind, kind)
    if kind.startswith("arrays-") and not sep:
        raise ValueError(f"data {spec!r}: arrays given to jaxidx.fit, which no spec can load again; name a data "
                         "spec holding the same data (--config.data=SPEC) to evaluate from the command line")
    raise ValueError(f"unknown data spec {spec!r}; valid forms:\n  " + "\n  ".join(SPEC_FORMS))


def _load_xmc_spec(body: str) -> XMCData:
    paths = body.split(",")
    if len(paths) == 1:
        d = resolve_path(paths[0])
        return _load_xmc_dir(d, d.name)
    if len(paths) == 2:
        train, test = (resolve_path(p) for p in paths)
        return load_xmc(train, test, train.parent.name)
    raise ValueError(f"xmc:{body}: expected xmc:DIR or xmc:TRAIN_PATH,TEST_PATH")


def _load_xmc_dir(d: Path, name: str) -> XMCData:
    """train.txt and test.txt, and the rows' text when `d` has it (see `jaxidx.data.text`)."""
    if not (d / "train.txt").is_file() or not (d / "test.txt").is_file():
        hint = (f"; point $JAXIDX_SHARED_DATA at the folder holding {name}/ (default <repo>/../shared/data/xmc)"
                if name in XMC_SHORT_NAMES else "")
        raise ValueError(f"{name}: no train.txt and test.txt in {d}{hint}")
    data = load_xmc(d / "train.txt", d / "test.txt", name)
    texts = {split: text.read_package_texts(d, split) for split in ("train", "test")}
    if texts["train"] is None or texts["test"] is None:
        return data
    for split, X in (("train", data.X_train), ("test", data.X_test)):
        if len(texts[split]) != X.shape[0]:
            raise ValueError(f"{d / f'{split}_packages.txt'}: {len(texts[split])} rows, "
                             f"{split}.txt has {X.shape[0]}")
    vocab = text.build_vocab(texts["train"], TEXT_MIN_COUNT)
    return dataclasses.replace(data, tokens_train=text.encode(texts["train"], vocab, TEXT_MAX_LEN),
                               tokens_test=text.encode(texts["test"], vocab, TEXT_MAX_LEN),
                               vocab_size=len(vocab) + 2)


def _params(spec: str, body: str, keys: Dict[str, tuple]) -> dict:
    """Parse `k=v,k=v` into keyword arguments; unknown keys and bad values are errors."""
    out = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if key not in keys or not eq:
            raise ValueError(f"{spec}: unknown or malformed parameter {item!r}; valid keys: {', '.join(keys)}")
        arg, cast = keys[key]
        try:
            out[arg] = cast(value)
        except ValueError:
            raise ValueError(f"{spec}: parameter {key}={value!r} is not a valid {cast.__name__}") from None
    return out
