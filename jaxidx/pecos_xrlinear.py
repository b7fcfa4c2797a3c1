"""PECOS XR-Linear peer, run inside its own virtualenv (libpecos pins numpy < 2).

Called by `jaxidx.bench.run_pecos` as: VENV/bin/python jaxidx/pecos_xrlinear.py DIR K (in the PECOS
virtualenv, which has no jaxidx: this file imports only numpy, scipy and pecos)
where DIR holds X_train.npz, Y_train.npz, X_test.npz (scipy CSR). Writes
DIR/pred.npy (top-K label ids, -1 padded) and DIR/timing.json. PECOS defaults:
PIFA label features, hierarchical k-means (leaf 100), beam 10, on L2-normalised
feature rows (XR-Linear's usual input; the shared data's reference figures
match this).
"""
import json
import sys
import time

import numpy as np
import scipy.sparse as sp
from pecos.xmc import Indexer, LabelEmbeddingFactory
from pecos.xmc.xlinear.model import XLinearModel


def l2_rows(X: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    out = sp.diags(1.0 / np.maximum(norms, 1e-12)).dot(X).tocsr().astype(np.float32)
    out.sort_indices()  # PECOS requires sorted column indices
    return out


def main(d: str, k: int) -> None:
    X = l2_rows(sp.load_npz(f"{d}/X_train.npz").tocsr())
    Y = sp.load_npz(f"{d}/Y_train.npz").tocsr().astype(np.float32)
    Xt = l2_rows(sp.load_npz(f"{d}/X_test.npz").tocsr())
    t0 = time.perf_counter()
    feat = LabelEmbeddingFactory.create(Y, X, method="pifa")
    chain = Indexer.gen(feat, indexer_type="hierarchicalkmeans", max_leaf_size=100)
    model = XLinearModel.train(X, Y, C=chain)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    P = model.predict(Xt, beam_size=10, only_topk=k).tocsr()
    pred_s = time.perf_counter() - t0
    pred = np.full((Xt.shape[0], k), -1, np.int64)
    for i in range(Xt.shape[0]):
        row = slice(P.indptr[i], P.indptr[i + 1])
        ids = P.indices[row][np.argsort(-P.data[row], kind="stable")][:k]
        pred[i, :len(ids)] = ids
    np.save(f"{d}/pred.npy", pred)
    with open(f"{d}/timing.json", "w") as f:
        json.dump({"train_seconds": train_s, "predict_seconds": pred_s}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
