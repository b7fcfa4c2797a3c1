"""XMC and ANN metrics: hand-computed cases and per-row loop references on random data."""
import math

import numpy as np
import pytest
import scipy.sparse as sp

from jaxidx.metrics import (candidates_per_query, hits_at_k, knn_recall, knn_recall_distance, ndcg_at_k,
                            precision_at_k, precision_at_k_legacy, propensity, psndcg_at_k, psp_at_k,
                            recall_at_k, xmc_report)


def _Y(rows, n_labels):
    return sp.csr_matrix([[1.0 if j in r else 0.0 for j in range(n_labels)] for r in rows])


# Three rows, 6 labels: row 0 has 3 labels, row 1 has 1 label, row 2 has none.
Y3 = _Y([{0, 2, 4}, {5}, set()], 6)
P3 = np.array([[2, 1, 4, -1],   # hits at ranks 1 and 3
               [0, 5, 5, 1],    # hit at rank 2, then a repeat of 5 (counts once)
               [1, 2, 3, 4]])   # no labels: contributes 0


def test_hand_computed_precision_recall():
    assert precision_at_k(P3, Y3, 1) == pytest.approx((1 + 0 + 0) / 3)
    assert precision_at_k(P3, Y3, 3) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert precision_at_k_legacy(P3, Y3, 3) == pytest.approx((2 / 3 + 1 / 1 + 0) / 3)
    assert recall_at_k(P3, Y3, 1) == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert recall_at_k(P3, Y3, 4) == pytest.approx((2 / 3 + 1 + 0) / 3)
    # k wider than pred: missing ranks are misses, P@k still divides by k
    assert precision_at_k(P3, Y3, 6) == pytest.approx((2 / 6 + 1 / 6 + 0) / 3)
    assert recall_at_k(P3, Y3, 100) == recall_at_k(P3, Y3, 4)


def test_hand_computed_ndcg():
    log2 = math.log2
    row0 = (1 / log2(2) + 1 / log2(4)) / (1 / log2(2) + 1 / log2(3) + 1 / log2(4))
    row1 = (1 / log2(3)) / (1 / log2(2))  # IDCG over min(k, |y|) = 1 position
    assert ndcg_at_k(P3, Y3, 3) == pytest.approx((row0 + row1 + 0) / 3)
    assert ndcg_at_k(P3, Y3, 1) == pytest.approx(1 / 3)


def test_hand_computed_propensity_and_psp():
    train = _Y([{0}, {0}, {0, 1}, {2}, set()], 3)  # label frequencies 3, 1, 1 over N = 5 rows
    A, B = 0.55, 1.5
    C = (math.log(5) - 1) * (B + 1) ** A
    expect = [1 / (1 + C * math.exp(-A * math.log(f + B))) for f in (3, 1, 1)]
    np.testing.assert_allclose(propensity(train, A, B), expect)

    inv = 1 / np.array(expect)
    Y = _Y([{0, 1}, {2}, set()], 3)
    pred = np.array([[0, 2], [1, 2], [0, 1]])
    # PSP@1: earned weights [inv0, 0, 0], best [max(inv0, inv1), inv2, 0]; ratio of totals
    assert psp_at_k(pred, Y, 1, train_Y=train) == pytest.approx(inv[0] / (max(inv[0], inv[1]) + inv[2]))
    assert psp_at_k(pred, Y, 2, train_Y=train) == pytest.approx((inv[0] + inv[2]) / (inv[0] + inv[1] + inv[2]))


def test_ties_ranking_positions_matter():
    Y = _Y([{3}], 5)
    assert ndcg_at_k(np.array([[3, 0]]), Y, 2) == pytest.approx(1.0)
    assert ndcg_at_k(np.array([[0, 3]]), Y, 2) == pytest.approx(1 / math.log2(3))
    assert precision_at_k(np.array([[0, 3]]), Y, 2) == precision_at_k(np.array([[3, 0]]), Y, 2) == 0.5


def test_no_predictions_and_no_labels():
    Y = _Y([set(), set()], 4)
    pred = np.full((2, 5), -1)
    report = xmc_report(pred, Y)
    assert set(report) == {"P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5",
                           "R@10", "R@100"}
    assert all(v == 0.0 for v in report.values())


def test_input_validation():
    with pytest.raises(ValueError, match="outside"):
        precision_at_k(np.array([[0, 6], [0, 1], [0, 1]]), Y3, 2)
    with pytest.raises(ValueError, match="outside"):
        precision_at_k(np.array([[0, -2], [0, 1], [0, 1]]), Y3, 2)
    with pytest.raises(ValueError, match="integer array"):
        precision_at_k(np.zeros((3, 2)), Y3, 2)
    with pytest.raises(ValueError, match="integer array"):
        precision_at_k(np.zeros((2, 2), int), Y3, 2)
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(P3, Y3, 0)
    with pytest.raises(ValueError, match="labels"):
        psp_at_k(P3, Y3, 1, train_Y=_Y([{0}], 4))


# ---- per-row loop references -------------------------------------------------------------------------------

def _loop_metrics(pred, Y, k, inv_p):
    """Straightforward per-row definitions (pyxclib conventions for the propensity-scored ones)."""
    rows = [set(Y.indices[Y.indptr[i]:Y.indptr[i + 1]].tolist()) for i in range(Y.shape[0])]
    p, legacy, nd, rec, ps_num, ps_den, psn_num, psn_den = ([] for _ in range(8))
    for ranked, truth in zip(pred.tolist(), rows):
        seen, gains = set(), []
        for label in ranked[:k] + [-1] * (k - len(ranked[:k])):
            gains.append(1.0 if label >= 0 and label in truth and label not in seen else 0.0)
            seen.add(label)
        hits = sum(gains)
        disc = [1 / math.log2(r + 2) for r in range(k)]
        idcg = sum(disc[:min(k, len(truth))])
        dcg = sum(g * d for g, d in zip(gains, disc))
        p.append(hits / k)
        legacy.append(hits / min(len(truth), k) if truth else 0.0)
        nd.append(dcg / idcg if truth else 0.0)
        rec.append(hits / len(truth) if truth else 0.0)
        w = [g * inv_p[label] for g, label in zip(gains, ranked[:k] + [0] * k)]
        best = sorted((inv_p[label] for label in truth), reverse=True)[:k]
        ps_num.append(sum(w))
        ps_den.append(sum(best))
        psn_num.append(sum(x * d for x, d in zip(w, disc)) / idcg if truth else 0.0)
        psn_den.append(sum(x * d for x, d in zip(best, disc)) / idcg if truth else 0.0)
    return {"P": np.mean(p), "legacy": np.mean(legacy), "nDCG": np.mean(nd), "R": np.mean(rec),
            "PSP": sum(ps_num) / sum(ps_den), "PSnDCG": sum(psn_num) / sum(psn_den)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_per_row_loop(seed):
    rng = np.random.default_rng(seed)
    n, n_labels = 300, 40
    Y = sp.csr_matrix(rng.random((n, n_labels)) < rng.uniform(0.0, 0.15, size=(n, 1)), dtype=np.float32)
    train = sp.csr_matrix(rng.random((500, n_labels)) < 0.05, dtype=np.float32)
    # predictions: some true labels, random labels, repeats and -1 padding
    pred = rng.integers(-1, n_labels, size=(n, 12))
    lucky = rng.random(n) < 0.5
    for i in np.flatnonzero(lucky & (np.diff(Y.indptr) > 0)):
        pred[i, rng.integers(0, 12)] = rng.choice(Y.indices[Y.indptr[i]:Y.indptr[i + 1]])
    inv_p = 1 / propensity(train)
    for k in (1, 3, 5, 12, 20):
        ref = _loop_metrics(pred, Y, k, inv_p)
        assert precision_at_k(pred, Y, k) == pytest.approx(ref["P"])
        assert precision_at_k_legacy(pred, Y, k) == pytest.approx(ref["legacy"])
        assert ndcg_at_k(pred, Y, k) == pytest.approx(ref["nDCG"])
        assert recall_at_k(pred, Y, k) == pytest.approx(ref["R"])
        assert psp_at_k(pred, Y, k, train_Y=train) == pytest.approx(ref["PSP"])
        assert psndcg_at_k(pred, Y, k, train_Y=train) == pytest.approx(ref["PSnDCG"])
    report = xmc_report(pred, Y, train_Y=train)
    for k in (1, 3, 5):
        assert report[f"P@{k}"] == pytest.approx(precision_at_k(pred, Y, k))
        assert report[f"nDCG@{k}"] == pytest.approx(ndcg_at_k(pred, Y, k))
        assert report[f"PSP@{k}"] == pytest.approx(psp_at_k(pred, Y, k, train_Y=train))
    assert report["R@10"] == pytest.approx(recall_at_k(pred, Y, 10))
    assert report["R@100"] == pytest.approx(recall_at_k(pred, Y, 100))
    assert all(0.0 <= v <= 1.0 for v in report.values())


def test_perfect_predictions_score_one():
    rng = np.random.default_rng(4)
    Y = sp.csr_matrix(rng.random((50, 30)) < 0.1, dtype=np.float32)
    Y = Y[np.diff(Y.indptr) > 0]
    inv_p = 1 / propensity(Y)
    # true labels first, in decreasing 1/p order, then padding
    pred = np.full((Y.shape[0], 10), -1)
    for i in range(Y.shape[0]):
        labels = Y.indices[Y.indptr[i]:Y.indptr[i + 1]]
        labels = labels[np.argsort(-inv_p[labels], kind="stable")]
        pred[i, :len(labels[:10])] = labels[:10]
    assert ndcg_at_k(pred, Y, 5) == pytest.approx(1.0)
    assert psp_at_k(pred, Y, 5) == pytest.approx(1.0)
    assert psndcg_at_k(pred, Y, 5) == pytest.approx(1.0)
    assert precision_at_k_legacy(pred, Y, 5) == pytest.approx(1.0)
    assert recall_at_k(pred, Y, 10) == pytest.approx(1.0)


def test_hits_at_k_does_not_modify_inputs():
    Y = sp.csr_matrix(np.array([[0, 1, 1], [1, 0, 0]], np.float32))
    Y.data[0] = 0.0  # an explicit zero is not a label
    before = Y.data.copy()
    np.testing.assert_array_equal(hits_at_k(np.array([[1, 2], [0, 0]]), Y, 2), [[False, True], [True, False]])
    np.testing.assert_array_equal(Y.data, before)


# ---- ANN -----------------------------------------------------------------------------------------------

def test_knn_recall_by_id():
    gt = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    pred = np.array([[2, 0, 9, 9], [7, -1, 4, 5]])
    assert knn_recall(pred, gt, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)  # 7 is outside gt's top 3, 5 beyond k
    assert knn_recall(pred[:, :1], gt, 2) == pytest.approx((0 + 0) / 2)
    assert knn_recall(gt, gt, 4) == 1.0
    assert knn_recall(np.array([[1, 1, 1], [4, 4, 5]]), gt, 3) == pytest.approx((1 / 3 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="gt must be"):
        knn_recall(pred, gt, 5)


def test_knn_recall_by_distance_like_ann_benchmarks():
    gt = np.array([[0.1, 0.2, 0.3, 0.4]])
    assert knn_recall_distance(np.array([[0.1, 0.2, 0.3]]), gt, 3) == 1.0
    # a different item at the same distance as the true 3rd counts; one beyond 0.3 + eps does not
    assert knn_recall_distance(np.array([[0.1, 0.3, 0.3005]]), gt, 3) == 1.0
    assert knn_recall_distance(np.array([[0.1, 0.2, 0.302]]), gt, 3) == pytest.approx(2 / 3)
    assert knn_recall_distance(np.array([[0.1, np.inf, np.nan]]), gt, 3) == pytest.approx(1 / 3)
    assert knn_recall_distance(np.array([[0.1, 0.2, 0.302]]), gt, 3, eps=0.01) == 1.0


def test_candidates_per_query():
    assert candidates_per_query([10, 20, 30]) == 20.0
