"""ELIAS maths against hand-computed cases: scores, beam with teacher forcing, best paths,
shortlist, both losses, approximate adjacency, stage-2 edge weights, schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from jaxidx.methods.elias import (NEG, approximate_adjacency, best_paths, cluster_beam, dense_best_paths,
                                  elias_loss, expand_paths, home_clusters, is_positive, label_logits,
                                  log_cluster_scores, log_edge_weights, lookup, multi_hot, shortlist,
                                  reserved_edges, soft_partition, top_k_mask, warmup_linear)


def _jit(f, static=()):
    """Whole functions compile once; op-by-op eager dispatch is far slower on a busy CPU."""
    return jax.jit(f, static_argnums=static)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_cluster_scores_are_clipped_scaled_softmax():
    z = np.array([[3.0, 0.0, -1.0, 0.5]], np.float32)
    want = np.minimum(1.0, 10.0 * _softmax(z))
    log_p = jax.nn.log_softmax(jnp.asarray(z))
    np.testing.assert_allclose(np.exp(_jit(log_cluster_scores, (1,))(log_p, 10.0)), want, rtol=1e-6)
    assert want[0, 0] == 1.0  # saturated


def test_stage2_edge_weights_row_softmax_over_valid_edges():
    logits = jnp.array([[1.0, 2.0, 7.0], [0.0, 0.0, 0.0]])
    members = jnp.array([[4, 9, -1], [1, 2, 3]])
    w = np.exp(np.asarray(_jit(log_edge_weights, (2,))(logits, members, 1.5)))
    row0 = _softmax(np.array([1.0, 2.0]))  # the padded edge takes no share
    np.testing.assert_allclose(w[0, :2], np.minimum(1.0, 1.5 * row0), rtol=1e-6)
    assert w[0, 2] == 0.0
    np.testing.assert_allclose(w[1], 0.5, rtol=1e-6)
    # Stage 1 (no logits): weight 1 on every edge of the clustering.
    np.testing.assert_array_equal(np.exp(np.asarray(_jit(lambda m: log_edge_weights(None, m, 1.5))(members))),
                                  [[1, 1, 0], [1, 1, 1]])
    # Gradients stay finite with padded rows.
    g = _jit(jax.grad(lambda a: log_edge_weights(a, members, 150.0).clip(NEG / 2).sum()))(logits)
    assert np.isfinite(np.asarray(g)).all()


def test_beam_with_teacher_forcing():
    logits = jax.nn.log_softmax(jnp.array([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]]))
    log_s = _jit(log_cluster_scores, (1,))(logits, 10.0)
    beam = _jit(cluster_beam, (2,))
    ids, ls = beam(logits, log_s, 2)
    np.testing.assert_array_equal(ids, [[0, 1], [4, 3]])
    np.testing.assert_array_equal(ls, np.take_along_axis(np.asarray(log_s), np.asarray(ids), 1))
    # Forced clusters (-1 = none, repeats allowed) come first, then the best of the rest.
    forced = jnp.array([[4, 4, -1], [-1, -1, -1]])
    ids, _ = beam(logits, log_s, 3, forced)
    np.testing.assert_array_equal(ids, [[4, 0, 1], [4, 3, 2]])
    # More forced clusters than the beam: the best-scored forced ones.
    ids, _ = beam(logits, log_s, 2, jnp.array([[1, 2, 3], [0, 1, 2]]))
    np.testing.assert_array_equal(ids, [[1, 2], [2, 1]])


def test_paths_best_path_per_label_and_shortlist():
    members = jnp.array([[0, 1, -1], [1, 2, 3], [3, 4, -1]])
    log_a = jnp.log(jnp.array([[1.0, 0.5, 1.0], [1.0, 0.2, 0.1], [0.9, 1.0, 1.0]]))
    log_a = jnp.where(members >= 0, log_a, NEG)
    beam = jnp.array([[0, 1, 2]])
    s = jnp.array([[0.5, 0.8, 0.1]])
    labels, lp = _jit(expand_paths)(beam, jnp.log(s), members, log_a)
    assert labels.shape == (1, 9)
    sorted_labels, best = _jit(best_paths)(labels, lp)
    # label: best path over the clusters holding it
    want = {0: 0.5 * 1.0, 1: max(0.5 * 0.5, 0.8 * 1.0), 2: 0.8 * 0.2, 3: max(0.8 * 0.1, 0.1 * 0.9), 4: 0.1 * 1.0}
    got = {int(l): float(np.exp(b)) for l, b in zip(sorted_labels[0], best[0]) if b > NEG / 2}
    assert got.keys() == want.keys()
    for l in want:
        np.testing.assert_allclose(got[l], want[l], rtol=1e-6)
    ids, lpath = _jit(shortlist, (2,))(sorted_labels, best, 3)
    np.testing.assert_array_equal(ids, [[1, 0, 2]])
    np.testing.assert_allclose(np.exp(lpath), [[0.8, 0.5, 0.16]], rtol=1e-6)
    dense = np.asarray(_jit(dense_best_paths, (2,))(labels, lp, 6))
    np.testing.assert_allclose(np.exp(dense[0, :5]), [want[l] for l in range(5)], rtol=1e-6)
    assert dense[0, 5] == NEG
    np.testing.assert_array_equal(_jit(top_k_mask, (1,))(jnp.asarray(dense), 3), [[True, True, True, False, False, False]])
    ids, _ = _jit(shortlist, (2,))(sorted_labels, best, 7)  # fewer labels than K: padded with -1
    np.testing.assert_array_equal(ids[0, 5:], [-1, -1])
    vals, found = _jit(lookup)(sorted_labels, best, jnp.array([[3, 7, -1]]))
    np.testing.assert_array_equal(found, [[True, False, False]])
    np.testing.assert_allclose(np.exp(vals[0, 0]), 0.09, rtol=1e-6)
    np.testing.assert_array_equal(_jit(is_positive)(jnp.array([[1, 0, 2, -1]]), jnp.array([[0, 2, -1]])),
                                  [[False, True, True, False]])
    np.testing.assert_array_equal(_jit(multi_hot, (1,))(jnp.array([[0, 2, -1]]), 4), [[True, False, True, False]])


def test_top_k_mask_is_exact():
    x = jax.random.normal(jax.random.key(0), (6, 300))
    x = x.at[0, :5].set(NEG).at[1].multiply(1e-30).at[2].set(-0.0)
    mask = _jit(top_k_mask, (1,))
    for k in (7, 300):
        want = np.asarray(x) >= np.sort(np.asarray(x), axis=1)[:, -k][:, None]
        np.testing.assert_array_equal(mask(x, k), want)


def test_paths_are_differentiable():
    members = jnp.array([[0, 1], [1, 2]])
    edges = jnp.array([[0.3, -0.2], [0.1, 0.4]])

    def f(z, a):
        log_p = jax.nn.log_softmax(z)
        ids, ls = cluster_beam(log_p, log_cluster_scores(log_p, 1.0), 2)
        sl, best = best_paths(*expand_paths(ids, ls, members, log_edge_weights(a, members, 1.0)))
        _, lp = shortlist(sl, best, 3)
        return jnp.exp(lp).sum()

    gz, ga = _jit(jax.grad(f, argnums=(0, 1)))(jnp.array([[0.2, -0.1]]), edges)
    assert np.isfinite(gz).all() and np.isfinite(ga).all() and np.abs(ga).sum() > 0


def test_losses_hand_case():
    path = np.array([[0.8, 0.5, 0.2]], np.float32)
    u = np.array([[1.0, -1.0, 0.0]], np.float32)
    target = np.array([[True, False, False]])
    valid = np.array([[True, True, False]])
    pos_path = np.array([[0.8, 0.3, 1.0]], np.float32)
    pos_found = np.array([[True, True, False]])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p0, p1 = 0.8 * sig(1.0), 0.5 * sig(-1.0)
    cls = (-np.log(p0) - np.log(1 - p1)) / 3  # invalid entry counts as zero; mean over K = 3
    short = (-np.log(0.8) - np.log(0.3)) / 2  # BCE(path, 1) over the positives that have a path
    loss_fn = _jit(elias_loss, (7, 8))
    loss, m = loss_fn(jnp.log(path), jnp.asarray(u), jnp.asarray(valid), jnp.asarray(target),
                         jnp.log(pos_path), jnp.asarray(pos_found), jnp.ones(1), 0.05, 3)
    np.testing.assert_allclose(float(m["loss_classification"]), cls, rtol=1e-5)
    np.testing.assert_allclose(float(m["loss_shortlist"]), short, rtol=1e-5)
    np.testing.assert_allclose(float(loss), cls + 0.05 * short, rtol=1e-5)
    # A filler row (weight 0) changes nothing; a saturated negative has a finite loss.
    loss2, _ = loss_fn(jnp.log(jnp.concatenate([path, jnp.ones((1, 3))])),
                          jnp.concatenate([u, jnp.full((1, 3), 40.0)]), jnp.ones((2, 3), bool) & jnp.asarray(
                              np.concatenate([valid, [[True] * 3]])), jnp.asarray(np.concatenate([target, [[False] * 3]])),
                          jnp.log(jnp.concatenate([pos_path, jnp.ones((1, 3))])),
                          jnp.asarray(np.concatenate([pos_found, [[True] * 3]])), jnp.array([1.0, 0.0]), 0.05, 3)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


def test_dense_and_gathered_label_logits_agree():
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.normal(size=(10, 4)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=10), jnp.float32)}
    phi = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    ids = jnp.array([[0, 9, 3], [2, 2, -1], [5, 6, 7]])
    a = _jit(label_logits, (3,))(params, phi, ids, True)
    b = _jit(label_logits, (3,))(params, phi, ids, False)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    want = np.asarray(phi)[2] @ np.asarray(params["kernel"])[[5, 6, 7]].T + np.asarray(params["bias"])[[5, 6, 7]]
    np.testing.assert_allclose(a[2], want, rtol=1e-5)


def test_approximate_adjacency_hand_case():
    # 3 points, 4 labels, 2 clusters, beam 2.
    Y = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]], np.float32))
    beam_ids = np.array([[0, 1], [1, 0], [1, 0]])
    beam_sc = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]], np.float32)
    members, values = approximate_adjacency(Y, beam_ids, beam_sc, 2, kappa=2)
    # (Y^T M)^T: cluster 0 -> labels [0.9, 1.3, 0.3, 0.4]; cluster 1 -> [0.1, 0.7, 0.7, 0.6]
    np.testing.assert_array_equal(members, [[1, 0], [1, 2]])  # tie 0.7/0.7 -> smaller label first
    np.testing.assert_allclose(values, [[1.3, 0.9], [0.7, 0.7]], rtol=1e-6)
    members, _ = approximate_adjacency(Y, beam_ids, beam_sc, 2, kappa=5)
    np.testing.assert_array_equal(members[0], [1, 0, 3, 2, -1])  # fewer than kappa labels: padded
    # keep_best: labels 2 and 3 (best rows 1 and 1) go first in row 1; label 1 (best row 0) first in row 0.
    members, values = approximate_adjacency(Y, beam_ids, beam_sc, 2, kappa=2, keep_best=True)
    np.testing.assert_array_equal(members, [[1, 0], [2, 3]])
    np.testing.assert_allclose(values, [[1.3, 0.9], [0.7, 0.6]], rtol=1e-6)
    # kappa 1: rows keep their strongest proposer (labels 1 and 2); 0 and 3 find every row full.
    members, _ = approximate_adjacency(Y, beam_ids, beam_sc, 2, kappa=1, keep_best=True)
    np.testing.assert_array_equal(members, [[1], [2]])


def test_reserved_edges_fall_back_to_the_next_best_row_with_room():
    # Labels 0, 1, 2 all prefer row 0 (capacity 1): 0 wins it, 1 falls back to row 1, 2 has nowhere else.
    rows = np.array([0, 1, 0, 1, 0])
    labels = np.array([0, 0, 1, 1, 2])
    values = np.array([0.9, 0.2, 0.8, 0.5, 0.7])
    np.testing.assert_array_equal(reserved_edges(rows, labels, values, 2, 1), [1, 0, 0, 1, 0])
    # Random graphs: one edge per label, rows within capacity, and a label is left out only when all its rows are full.
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_rows, cap = rng.integers(1, 6), rng.integers(1, 4)
        pairs = np.unique(rng.integers(0, [n_rows, 12], (30, 2)), axis=0)
        rows, labels = pairs[:, 0], pairs[:, 1]
        keep = reserved_edges(rows, labels, rng.random(len(rows)), n_rows, cap)
        assert np.bincount(labels[keep], minlength=12).max(initial=0) <= 1
        load = np.bincount(rows[keep], minlength=n_rows)
        assert load.max() <= cap
        for lab in set(labels) - set(labels[keep]):
            assert (load[rows[labels == lab]] == cap).all()


def test_home_clusters_and_soft_partition():
    members = np.array([[0, 2, -1], [2, 1, 0]], np.int32)
    weights = np.array([[0.5, 0.3, 0.0], [0.9, 0.2, 0.5]], np.float32)
    np.testing.assert_array_equal(home_clusters(members, weights, 4), [0, 1, 1, -1])  # tie on label 0 -> cluster 0
    part = soft_partition(members, weights)
    np.testing.assert_array_equal(part.offsets, [[0, 2, 5]])
    np.testing.assert_array_equal(part.members, [[0, 2, 2, 1, 0]])
    np.testing.assert_allclose(part.weights, [[0.5, 0.3, 0.9, 0.2, 0.5]])


def test_warmup_then_linear_decay():
    f = warmup_linear(1.0, 100, 0.1)
    np.testing.assert_allclose([float(f(s)) for s in (0, 5, 10, 55, 100)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
