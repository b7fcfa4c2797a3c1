"""Property tests: the C++ (host), NumPy (reference) and JAX (device) kernels
agree. On values that are small integers times 1/8 every sum is exact, so
results must match bit for bit while ties are frequent; on general floats ids
and counts must match and values agree to 1e-5 relative.

Shapes are fixed per test (and the static arguments drawn from small sets) so
that JAX compiles a handful of programs; hypothesis is derandomized and runs
a bounded number of examples.
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxidx.search import device, host, reference

f32, i32 = np.float32, np.int32
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# merge_topk shapes: Q queries, R repetitions, m routed buckets, B buckets of at most S members, N items.
Q, R, m, B, S, N = 4, 3, 3, 6, 5, 15
# rerank_topk shapes: C padded candidates of N_BASE vectors of dimension D (not a multiple of 8).
C, N_BASE, D = 9, 20, 11


def values(rng, shape, exact):
    if exact:
        return (rng.integers(-16, 17, shape) / 8).astype(f32)
    return rng.standard_normal(shape, dtype=f32)


def soft_partition(rng, exact, weighted):
    """CSR per repetition; buckets may be empty, items may sit in several buckets of one
    repetition (or twice in one), members past offsets[r, B] are -1 padding."""
    offsets = np.zeros((R, B + 1), i32)
    members = np.full((R, B * S), -1, i32)
    for r in range(R):
        sizes = rng.integers(0, S + 1, B) * (rng.random(B) > 0.2)
        offsets[r, 1:] = np.cumsum(sizes)
        members[r, : sizes.sum()] = rng.integers(0, N, sizes.sum())
    weights = values(rng, (R, B * S), exact) if weighted else None
    return offsets, members, weights


def merge_inputs(seed, exact, weighted):
    rng = np.random.default_rng(seed)
    offsets, members, weights = soft_partition(rng, exact, weighted)
    bucket_ids = rng.integers(-1, B, (Q, R, m)).astype(i32)
    return bucket_ids, values(rng, (Q, R, m), exact), offsets, members, weights


def run_all(fn_name, *args, **kwargs):
    dev_kwargs = {"max_bucket_size": S} if fn_name == "merge_topk" else {}
    outs = [getattr(host, fn_name)(*args, **kwargs), getattr(reference, fn_name)(*args, **kwargs),
            getattr(device, fn_name)(*args, **kwargs, **dev_kwargs)]
    return [tuple(np.asarray(x) for x in out) for out in outs]


def assert_bits_equal(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(i32) if x.dtype == f32 else x, y.view(i32) if y.dtype == f32 else y)


def assert_topk_close(ids_a, vals_a, ids_b, vals_b):
    """Values agree to 1e-5 relative; ids differ only where the values at that rank do."""
    np.testing.assert_allclose(vals_a, vals_b, rtol=1e-5, atol=1e-6)
    differ = ids_a != ids_b
    assert np.isclose(vals_a[differ], vals_b[differ], rtol=1e-5, atol=1e-6).all()


# (k, min_count): plain; threshold often relaxed; k beyond every candidate set (and R*m*S).
merge_options = dict(seed=st.integers(0, 2**32 - 1), k_min_count=st.sampled_from([(3, 1), (3, 3), (50, 3)]),
                     agg=st.sampled_from(["sum", "max"]), weighted=st.booleans())


@SETTINGS
@given(**merge_options)
def test_merge_exact(seed, k_min_count, agg, weighted):
    k, min_count = k_min_count
    args = merge_inputs(seed, exact=True, weighted=weighted)
    outs = run_all("merge_topk", *args, k=k, min_count=min_count, agg=agg)
    for out in outs[1:]:
        assert_bits_equal(outs[0], out)


@SETTINGS
@given(**merge_options)
def test_merge_general_floats(seed, k_min_count, agg, weighted):
    k, min_count = k_min_count
    args = merge_inputs(seed, exact=False, weighted=weighted)
    (ids, scores, counts, n_cand), *others = run_all("merge_topk", *args, k=k, min_count=min_count, agg=agg)
    for o_ids, o_scores, o_counts, o_cand in others:
        np.testing.assert_array_equal(n_cand, o_cand)
        assert_topk_close(ids, scores, o_ids, o_scores)
        same = ids == o_ids
        np.testing.assert_array_equal(counts[same], o_counts[same])


def rerank_inputs(seed, exact):
    rng = np.random.default_rng(seed)
    queries = values(rng, (Q, D), exact)
    queries[0] = 0  # a zero-norm query
    base = values(rng, (N_BASE, D), exact)
    base[rng.integers(0, N_BASE)] = 0
    cands = rng.integers(-1, N_BASE, (Q, C)).astype(i32)  # duplicates and -1 are common
    return queries, base, cands


def to_csr(cands, rng):
    """The same candidate sets as CSR, with the -1 entries dropped or kept at random."""
    rows = [row[(row >= 0) | (rng.random(len(row)) < 0.5)] for row in cands]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(rng.choice([np.int32, np.int64]))
    return offsets, np.concatenate(rows).astype(i32)


rerank_options = dict(seed=st.integers(0, 2**32 - 1), k=st.sampled_from([2, 12]),
                      metric=st.sampled_from(["ip", "cosine", "l2"]))


@SETTINGS
@given(**rerank_options)
def test_rerank_exact(seed, k, metric):
    queries, base, cands = rerank_inputs(seed, exact=True)
    outs = run_all("rerank_topk", queries, base, cands, k=k, metric=metric)
    for out in outs[1:]:
        assert_bits_equal(outs[0], out)
    csr = to_csr(cands, np.random.default_rng(seed))
    assert_bits_equal(outs[0], tuple(np.asarray(x) for x in host.rerank_topk(queries, base, csr, k, metric)))
    assert_bits_equal(outs[0], reference.rerank_topk(queries, base, csr, k, metric))


@SETTINGS
@given(**rerank_options)
def test_rerank_general_floats(seed, k, metric):
    queries, base, cands = rerank_inputs(seed, exact=False)
    (ids, dist, n_unique), *others = run_all("rerank_topk", queries, base, cands, k=k, metric=metric)
    for o_ids, o_dist, o_unique in others:
        np.testing.assert_array_equal(n_unique, o_unique)
        assert_topk_close(ids, dist, o_ids, o_dist)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), k=st.sampled_from([3, 9]), exact=st.booleans())
def test_topk_rows(seed, k, exact):
    rng = np.random.default_rng(seed)
    x = values(rng, (5, 7), exact)
    special = rng.random(x.shape)
    x[special < 0.1] = np.nan
    x[(special >= 0.1) & (special < 0.15)] = -np.inf
    x[(special >= 0.15) & (special < 0.2)] = -0.0
    outs = run_all("topk_rows", x, k=k)
    for out in outs[1:]:
        assert_bits_equal(outs[0], out)
