"""4-bit PQ fast scan: codes and layout (jaxidx.pq4), the C++ kernel against its NumPy reference (SIMD and
portable paths), validation, and LMI's quantized search (reorder) against its float search."""
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxidx
from jaxidx import pq4
from jaxidx.search import host, reference

BACKENDS = {"host": host, "reference": reference}


def quantized_case(rng, metric="l2", residual=True, d=13, dsub=2, leaves=7, q=20, probes=4, max_rows=80):
    """A random leaf layout with PQ codes and probes: the kwargs of pq4_search (k and reorder left out)."""
    sizes = rng.integers(0, max_rows, leaves)
    sizes[2] = 0
    sizes[3] = 32  # exactly one block
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    base = rng.standard_normal((offsets[-1], d)).astype(np.float32)
    codebooks = pq4.train_codebooks(base, dsub, n_iter=5)
    centres = pq4.leaf_means(base, offsets) if residual else None
    r = base - np.repeat(centres, sizes, 0) if residual else base
    packed = pq4.pack_rows(pq4.encode(r, codebooks))
    codes, block_offsets = pq4.block_layout(packed, offsets)
    probed = np.stack([rng.permutation(leaves)[:probes] for _ in range(q)]).astype(np.int32)
    probed[0, 1] = -1
    lens = np.where(probed >= 0, sizes[np.maximum(probed, 0)], 0).astype(np.int32)
    lens[1, 0] //= 2  # a budget that stops inside a leaf
    return dict(queries=rng.standard_normal((q, d)).astype(np.float32), base=base, codes=codes, codebooks=codebooks,
                centres=centres, row_offsets=offsets, block_offsets=block_offsets, leaves=probed, lens=lens,
                metric=metric,
                row_terms=pq4.row_terms(packed, codebooks, centres, offsets) if residual and metric == "l2" else None)


def repeated_case(rng, metric="l2", d=12, dsub=2, n=150, reps=3, buckets=5, q=16, probes=2):
    """IRLI's layout: `reps` partitions of the same n rows into `buckets`, one leaf per (repetition,
    bucket), slots row_ids listing each leaf's rows, every copy with the row's own codes."""
    base = rng.standard_normal((n, d)).astype(np.float32)
    codebooks = pq4.train_codebooks(base, dsub, n_iter=5)
    packed = pq4.pack_rows(pq4.encode(base, codebooks))
    assign = rng.integers(0, buckets, (reps, n))
    assign[0, :40] = 0  # one bucket over a block
    order = np.argsort(assign, axis=1, kind="stable")
    row_ids = order.ravel().astype(np.int32)
    sizes = np.stack([np.bincount(a, minlength=buckets) for a in assign]).ravel()
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    codes, block_offsets = pq4.block_layout(packed[row_ids], offsets)
    probed = np.stack([np.concatenate([r * buckets + rng.permutation(buckets)[:probes] for r in range(reps)])
                       for _ in range(q)]).astype(np.int32)
    lens = sizes[probed].astype(np.int32)
    return dict(queries=rng.standard_normal((q, d)).astype(np.float32), base=base, codes=codes, codebooks=codebooks,
                centres=None, row_offsets=offsets, block_offsets=block_offsets, leaves=probed, lens=lens,
                metric=metric, row_ids=row_ids)


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


# --- codes and layout ------------------------------------------------------------------------------
def test_pack_unpack_and_block_layout():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (70, 5)).astype(np.uint8)
    packed = pq4.pack_rows(codes)
    assert packed.shape == (70, 3) and (packed[:, 2] >> 4 == 0).all()  # the 6th sub-space is padding
    np.testing.assert_array_equal(pq4.unpack_rows(packed, 5), codes)
    offsets = np.array([0, 33, 33, 70], np.int32)  # leaves of 33, 0 and 37 rows
    blocks, block_offsets = pq4.block_layout(packed, offsets)
    np.testing.assert_array_equal(block_offsets, [0, 2, 2, 4])
    assert blocks.shape == (4, 3, 32)
    np.testing.assert_array_equal(blocks[0, :, 5], packed[5])          # leaf 0, row 5
    np.testing.assert_array_equal(blocks[1, :, 0], packed[32])         # leaf 0's 33rd row opens block 1
    assert (blocks[1, :, 1:] == 0).all()                               # ... the rest is padding
    np.testing.assert_array_equal(blocks[3, :, 4], packed[33 + 36])    # leaf 2, row 36


def test_codebooks_recover_exact_centroids_and_encode_nearest():
    rng = np.random.default_rng(1)
    cents = rng.standard_normal((3, 16, 2)).astype(np.float32) * 10  # 3 sub-spaces of 2 dims (d = 5: one pad)
    codes = np.concatenate([np.tile(np.arange(16), 20)[:, None]] * 3, 1)
    codes = np.stack([rng.permutation(c) for c in codes.T], 1).astype(np.uint8)
    x = np.concatenate([cents[m][codes[:, m]] for m in range(3)], 1)[:, :5]
    cents[2, :, 1] = 0.0  # the padded dimension
    x_codes = pq4.encode(x, cents)
    np.testing.assert_array_equal(x_codes, codes)
    learned = pq4.train_codebooks(x, 2, n_iter=30, seed=3)
    assert learned.shape == (3, 16, 2)
    recon = np.concatenate([learned[m][pq4.encode(x, learned)[:, m]] for m in range(3)], 1)[:, :5]
    assert np.mean((recon - x) ** 2) < 0.1 * np.var(x)  # Lloyd from 16 sample rows: near the true centroids
    with pytest.raises(ValueError, match="do not match"):
        pq4.encode(x[:, :3], cents)


def test_row_terms_complete_the_l2_distance():
    """||q - c_b - r_i||^2 = ||q - c_b||^2 - 2 q . r_i + row_terms[i] for every row's decoded residual r_i."""
    rng = np.random.default_rng(4)
    offsets = np.array([0, 40, 40, 100], np.int32)
    x = (rng.standard_normal((100, 7)) * 3 + 5).astype(np.float32)
    centres = pq4.leaf_means(x, offsets)
    leaf = np.repeat(np.arange(3), np.diff(offsets))
    codebooks = pq4.train_codebooks(x - centres[leaf], 2, n_iter=5)
    packed = pq4.pack_rows(pq4.encode(x - centres[leaf], codebooks))
    r = codebooks[np.arange(4), pq4.unpack_rows(packed, 4)].reshape(100, 8)[:, :7]  # decoded residuals
    q = rng.standard_normal(7).astype(np.float32)
    want = ((q - centres[leaf] - r) ** 2).sum(1)
    got = ((q - centres[leaf]) ** 2).sum(1) - 2 * r @ q + pq4.row_terms(packed, codebooks, centres, offsets)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def _leaf_layout(x, n_leaves, rng):
    """Rows grouped by nearest of n_leaves seeded rows: (rows in leaf layout, row_offsets)."""
    c = x[rng.choice(len(x), n_leaves, replace=False)]
    label = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), 1)
    order = np.argsort(label, kind="stable")
    return x[order], np.concatenate([[0], np.cumsum(np.bincount(label, minlength=n_leaves))]).astype(np.int32)


def test_choose_dims_follows_the_data():
    """Isotropic noise in 64 dims: distances concentrate and only 1 dim per sub-space keeps the order cheaply;
    sparse binary rows (6 of a topic's 24 words out of 256): coarse codes keep it, so fewer sub-spaces win."""
    rng = np.random.default_rng(0)
    gauss = (rng.standard_normal((16, 64)) * 2)[rng.integers(0, 16, 4000)] + rng.standard_normal((4000, 64))
    assert pq4.choose_dims(*_leaf_layout(gauss.astype(np.float32), 32, rng), "l2") == 1
    words = rng.integers(0, 256, (16, 24))
    rows = np.zeros((4000, 256), np.float32)
    for i, topic in enumerate(rng.integers(0, 16, 4000)):
        rows[i, rng.choice(words[topic], 6, replace=False)] = 1
    assert pq4.choose_dims(*_leaf_layout(rows, 32, rng), "l2") >= 4


def test_rows_per_pass_bounds_the_working_memory():
    """Training and encoding hold [M, rows, 16 + 4 dsub] floats at once: the rows follow M and dsub."""
    assert pq4.rows_per_pass(50, 2, 65536) == 65536  # GloVe: the whole default sample
    n = pq4.rows_per_pass(768, 1, 65536)
    assert 1024 <= n < 65536 and n % 1024 == 0 and 4 * 768 * (16 + 4) * n <= pq4.PASS_BYTES
    assert pq4.rows_per_pass(768, 1, 500) == 500  # never above the limit asked
    assert pq4.rows_per_pass(100_000, 1, 65536) == 1024  # the floor


def test_anisotropic_codes_trade_parallel_error_for_inner_products():
    """ScaNN's score-aware loss: eta 1 is plain PQ; eta > 1 codes (coordinate descent) and codebooks (the
    per-centroid solve) each lower the anisotropic loss, the parallel error most, and rank the top inner
    products better from the codes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert pq4.anisotropic_eta(24, 0.2) == 1.0 and pq4.anisotropic_eta(64, 0.0) == 1.0  # no weight below 1
    eta = pq4.anisotropic_eta(64, 0.2)
    assert eta == pytest.approx(63 * 0.04 / 0.96)

    def losses(cb, codes):
        e = x - cb[np.arange(cb.shape[0]), codes].reshape(len(codes), -1)
        par = (e * x).sum(1)
        return (e * e).sum(1).mean(), (par ** 2).mean(), ((e * e).sum(1) + (eta - 1) * par ** 2).mean()

    cb0 = pq4.train_codebooks(x, 2)
    c0 = pq4.encode(x, cb0)
    np.testing.assert_array_equal(pq4.encode(x, cb0, directions=x, eta=1.0), c0)
    np.testing.assert_array_equal(pq4.train_codebooks(x, 2, directions=x, eta=1.0), cb0)
    plain, codes_only = losses(cb0, c0), losses(cb0, pq4.encode(x, cb0, directions=x, eta=eta))
    cb1 = pq4.train_codebooks(x, 2, directions=x, eta=eta)
    both = losses(cb1, pq4.encode(x, cb1, directions=x, eta=eta))
    assert both[2] < codes_only[2] < plain[2] and both[1] < plain[1] / 3 and plain[0] < both[0]
    q = rng.standard_normal((200, 64)).astype(np.float32)
    top = np.argsort(-(q @ x.T), 1)[:, :10]
    overlap = {}
    for name, cb in (("plain", cb0), ("aniso", cb1)):
        dec = cb[np.arange(32), pq4.encode(x, cb, directions=x, eta=1.0 if name == "plain" else eta)].reshape(4000, -1)
        overlap[name] = np.mean([len(set(a) & set(b)) for a, b in zip(top, np.argsort(-(q @ dec.T), 1)[:, :40])])
    assert overlap["aniso"] > overlap["plain"]
    with pytest.raises(ValueError, match="metric is euclidean"):
        pq4.eta_of("l2", 64, 0.2)


def test_leaf_means_of_layout():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    means = pq4.leaf_means(x, np.array([0, 2, 2, 6], np.int32))
    np.testing.assert_array_equal(means, [[1, 2], [0, 0], [7, 8]])


# --- kernel against reference ------------------------------------------------------------------------
@pytest.mark.parametrize("metric,residual,d,dsub", [("l2", True, 13, 2), ("l2", False, 16, 2), ("ip", True, 9, 3),
                                                    ("ip", False, 8, 1), ("cosine", False, 7, 2),
                                                    ("l2", True, 50, 2), ("l2", True, 40, 1)])
@pytest.mark.parametrize("reorder", [5, 40, 1000])
def test_pq4_search_matches_reference(metric, residual, d, dsub, reorder):
    case = quantized_case(np.random.default_rng(d * 7 + reorder), metric, residual, d, dsub)
    want = reference.pq4_search(**case, reorder=reorder, k=5)
    assert_same(host.pq4_search(**case, reorder=reorder, k=5, n_threads=3), want)
    np.testing.assert_array_equal(want[2], case["lens"].sum(1))


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("reorder", [4, 30, 1000])
def test_pq4_search_rows_in_several_leaves(metric, reorder):
    """row_ids (IRLI's repetitions): kernel and reference agree; a row probed in several leaves is scored
    once (re-ranking every candidate is the exact search over the distinct rows); slots are counted."""
    case = repeated_case(np.random.default_rng(reorder), metric)
    got = host.pq4_search(**case, reorder=reorder, k=4, n_threads=2)
    assert_same(got, reference.pq4_search(**case, reorder=reorder, k=4))
    np.testing.assert_array_equal(got[2], case["lens"].sum(1))
    if reorder == 1000:
        rows = [np.unique(np.concatenate([case["row_ids"][case["row_offsets"][b]:case["row_offsets"][b + 1]]
                                          for b in leaves])) for leaves in case["leaves"]]
        lens = np.array([len(r) for r in rows])
        runs = (np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), np.concatenate(rows).astype(np.int32),
                np.ones(lens.sum(), np.int32))
        assert_same(got[:2], host.rerank_topk(case["queries"], case["base"], runs, 4, metric)[:2])
        assert (got[0] >= 0).all() and all(len(set(r)) == 4 for r in got[0])


@pytest.mark.parametrize("force, path", [({}, None), ({"JAXIDX_NO_AVX512": "1"}, "avx2"),
                                         ({"JAXIDX_NO_AVX2": "1"}, "portable")])
def test_pq4_search_simd_paths_match_reference(force, path):
    """Every scan path the CPU offers (AVX-512, AVX2 forced with JAXIDX_NO_AVX512, portable with
    JAXIDX_NO_AVX2) gives the reference's bits: odd and even sub-space pair counts (a single pair too), leaves
    of more blocks than one group of sums, IRLI's repeated rows."""
    code = f"""
import numpy as np
from test_pq4 import quantized_case, repeated_case, assert_same
from jaxidx import _kernels
from jaxidx.search import host, reference
path = _kernels.simd_paths()["pq4_scan"]
want = {path!r}
assert want is None or path in (want, "portable"), path  # the forced path, unless the CPU lacks it
print(path)
cases = [(i, metric, residual, d, dsub, rows) for i, (metric, residual, d, dsub, rows) in enumerate([
    ("l2", True, 11, 2, 80), ("ip", True, 11, 2, 80), ("l2", False, 11, 2, 80), ("ip", False, 3, 2, 600),
    ("l2", True, 13, 2, 600), ("ip", True, 50, 1, 400), ("l2", False, 50, 2, 400)])]
for i, metric, residual, d, dsub, rows in cases:
    case = quantized_case(np.random.default_rng(i), metric, residual, d=d, dsub=dsub, q=8, max_rows=rows)
    for reorder in (4, 12, 300):
        assert_same(host.pq4_search(**case, reorder=reorder, k=4, n_threads=1),
                    reference.pq4_search(**case, reorder=reorder, k=4))
case = repeated_case(np.random.default_rng(9), "ip", d=11)
assert_same(host.pq4_search(**case, reorder=12, k=4, n_threads=1), reference.pq4_search(**case, reorder=12, k=4))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXIDX_NO_")}
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code], check=True, env={**env, **force}, cwd=here,
                         capture_output=True, text=True)
    assert out.stdout.strip() in ("avx512bw", "avx2", "portable")


def test_pq4_scan_context_switches_the_kernel_path():
    """bench.pq4_scan('avx2') turns AVX-512 off for the searches inside it (bench_ann --pq4_scan) and
    restores the path after; an unknown path is an error naming the flag."""
    from jaxidx import bench
    before = host.simd_paths()
    if before["pq4_scan"] == "portable":
        pytest.skip("this CPU has no AVX2 path")
    with bench.pq4_scan("avx2"):
        assert host.simd_paths()["pq4_scan"] == "avx2"
    assert host.simd_paths() == before
    with pytest.raises(ValueError, match="--pq4_scan"):
        with bench.pq4_scan("avx512"):
            pass


def test_reorder_of_every_candidate_is_the_exact_search():
    """Re-ranking every candidate gives rerank_topk's result over the same rows: the codes only order them."""
    case = quantized_case(np.random.default_rng(5), "l2", True, d=20, dsub=2)
    got = host.pq4_search(**case, reorder=10_000, k=8)
    starts = np.where(case["leaves"] >= 0, case["row_offsets"][np.maximum(case["leaves"], 0)], 0).astype(np.int32)
    runs = (np.arange(0, starts.size + 1, starts.shape[1], dtype=np.int64), starts.ravel(), case["lens"].ravel())
    want = host.rerank_topk(case["queries"], case["base"], runs, 8, "l2")
    assert_same(got, want)


def test_quantized_sums_are_exact_on_representable_inputs():
    """Integer tables with ranges under 255 (scale 1 would do, the kernel's scale keeps the order): the
    approximate order is the exact order, so reorder = k already finds the true neighbours of lossless codes."""
    rng = np.random.default_rng(2)
    cb = np.zeros((4, 16, 1), np.float32)
    cb[:, :, 0] = np.arange(16)  # 1-d sub-spaces with centroids 0..15
    codes = rng.integers(0, 16, (64, 4)).astype(np.uint8)
    base = codes.astype(np.float32)  # lossless codes
    offsets = np.array([0, 64], np.int32)
    blocks, block_offsets = pq4.block_layout(pq4.pack_rows(codes), offsets)
    queries = rng.integers(0, 16, (10, 4)).astype(np.float32)
    leaves, lens = np.zeros((10, 1), np.int32), np.full((10, 1), 64, np.int32)
    got = host.pq4_search(queries, base, blocks, cb, None, offsets, block_offsets, leaves, lens, 3, 3, "l2", 1)
    exact = ((queries[:, None] - base[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(got[1], np.sort(exact, 1)[:, :3])


def _bad_cases():
    """(base case, [(the argument the error must name, the arguments changed)])."""
    case = quantized_case(np.random.default_rng(3), "l2", True)
    dup, dup_lens = case["leaves"].copy(), case["lens"].copy()
    dup[2, 1], dup_lens[2, 1] = dup[2, 0], dup_lens[2, 0]
    return case, [
        ("codes", {"codes": case["codes"].astype(np.int8)}), ("codes", {"codes": case["codes"][:, :1]}),
        ("codebooks", {"codebooks": case["codebooks"][:, :8]}), ("codebooks", {"codebooks": case["codebooks"][:3]}),
        ("block_offsets", {"block_offsets": case["block_offsets"] + 1}),
        ("row_offsets", {"row_offsets": case["row_offsets"][::-1].copy()}),
        ("leaves", {"leaves": case["leaves"] + 10}), ("leaves", {"leaves": dup, "lens": dup_lens}),
        ("lens", {"lens": case["lens"] + 100}), ("reorder", {"reorder": 2}), ("metric", {"metric": "hamming"}),
        ("row_terms", {"row_terms": np.zeros(len(case["base"]) - 1, np.float32)}),
        ("row_terms", {"row_terms": np.zeros(len(case["base"]), np.float32), "metric": "ip"}),
        ("row_terms", {"row_terms": np.zeros(len(case["base"]), np.float32), "centres": None}),
        ("row_terms", {"row_terms": None}),
        ("row_ids", {"row_ids": np.arange(len(case["base"]), dtype=np.int32)}),  # with centres
        ("row_ids", {"row_ids": np.arange(len(case["base"])), "centres": None, "row_terms": None}),  # int64
    ]


@pytest.mark.parametrize("backend", ["host", "reference"])
def test_pq4_search_validation(backend):
    case, bad = _bad_cases()
    for name, change in bad:
        if backend == "reference" and name in ("block_offsets", "row_offsets", "leaves", "lens"):
            continue  # the reference checks dtypes, shapes and options; the kernel also checks the layout
        with pytest.raises(ValueError, match=name):
            BACKENDS[backend].pq4_search(**{**case, "reorder": 10, "k": 4, **change})


@pytest.mark.parametrize("backend", ["host", "reference"])
def test_pq4_search_row_ids_validation(backend):
    case = repeated_case(np.random.default_rng(4))
    bad_ids = case["row_ids"].copy()
    bad_ids[case["row_offsets"][case["leaves"][0, 0]]] = len(case["base"])  # a slot of a probed leaf
    bad = [("row_ids", {"row_ids": bad_ids}), ("row_offsets", {"row_ids": case["row_ids"][:-1]})]
    if backend == "reference":  # the reference alone checks that copies carry the same codes
        codes = case["codes"].copy()
        codes[case["block_offsets"][-2]] ^= 1  # the last leaf's first block
        bad = [("codes", {"codes": codes})]
    for name, change in bad:
        with pytest.raises(ValueError, match=name):
            BACKENDS[backend].pq4_search(**{**case, "reorder": 10, "k": 4, **change})


# --- LMI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lmi_run(tmp_path_factory):
    from helpers import load_config
    from jaxidx.runner import train_and_evaluate
    wd = str(tmp_path_factory.mktemp("lmi_pq4"))
    config = load_config("configs/lmi.py:tiny", **{"index.pq4_dims": 2})
    train_and_evaluate(config, wd, progress=False)
    return wd, config


@pytest.fixture(scope="module")
def lmi_index(lmi_run):
    return jaxidx.load(lmi_run[0]), jaxidx.data.load(lmi_run[1].data)


def test_lmi_quantized_search_close_to_float_search(lmi_index, tmp_path):
    index, data = lmi_index
    assert index.quantized and index.arrays["pq4_codes"].shape == (data.n_items, 4)  # 16 dims: 8 sub-spaces
    exact_ids, exact_d = index.search(data.queries, 10, n_probe=4)
    ids, d = index.search(data.queries, 10, n_probe=4, reorder=10_000)  # every candidate re-ranked
    np.testing.assert_array_equal(ids, exact_ids)
    overlap = {}
    for reorder in (20, 80):  # of about 750 candidates; the tiny set's isotropic clusters are hard for PQ
        ids, _ = index.search(data.queries, 10, n_probe=4, reorder=reorder)
        overlap[reorder] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert overlap[80] > 0.9 and overlap[20] < overlap[80]
    again = jaxidx.load(index.save(str(tmp_path / "saved")))
    np.testing.assert_array_equal(again.search(data.queries, 10, n_probe=4, reorder=80)[0], ids)


def test_lmi_quantized_add_remove_and_errors(lmi_index, tmp_path):
    index, data = lmi_index
    index = jaxidx.load(index.save(str(tmp_path / "a")))  # a copy: the module's index stays as trained
    new = data.base[:5] + 0.01
    new_ids = index.add(new)
    ids, _ = index.search(new, 1, n_probe=1, reorder=10_000)
    np.testing.assert_array_equal(ids[:, 0], new_ids)
    # Every row's code, added ones included, is its residual's code under the stored codebooks and centres.
    x, a = index.arrays["vectors"], index.arrays
    want = pq4.pack_rows(pq4.encode(x - np.repeat(a["pq4_centres"], index.sizes(), 0), a["pq4_codebooks"]))
    np.testing.assert_array_equal(a["pq4_codes"], want)
    index.remove(new_ids)
    ids, _ = index.search(new, 3, n_probe=1, reorder=20)
    assert not np.isin(ids, new_ids).any()
    assert index.arrays["pq4_codes"].shape[0] == len(index)
    with pytest.raises(ValueError, match="reorder=5 must be at least k=10"):
        index.search(data.queries, 10, n_probe=1, reorder=5)
    with pytest.raises(ValueError, match="backend='host' only"):
        index.search(data.queries, 10, n_probe=1, reorder=20, backend="device")
    plain = jaxidx.load(index.save(str(tmp_path / "b")))
    plain.arrays = {k: v for k, v in plain.arrays.items() if not k.startswith("pq4_")}
    with pytest.raises(ValueError, match="call index.quantize"):
        plain.search(data.queries, 10, n_probe=1, reorder=20)
    ids, _ = plain.quantize(dims=4, residual=False).search(data.queries, 10, n_probe=2, reorder=10_000)
    np.testing.assert_array_equal(ids, plain.search(data.queries, 10, n_probe=2)[0])


def test_bench_ann_quantized_lmi_beside_pq4_peers(lmi_run, tmp_path):
    """launch/bench_ann.py: one run searched with float rows and, quantized again at 4 dims per sub-space, with
    reorder, beside faiss IVF-PQ4fs (and ScaNN where installed; skipped with a message otherwise)."""
    import json
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wd, out = lmi_run[0], tmp_path / "bench.json"
    res = subprocess.run([sys.executable, os.path.join(repo, "launch", "bench_ann.py"), f"--workdir={wd}",
                          f"--workdir={wd}", "--quantize=0,4", '--settings=[{"n_probe": 4}]',
                          '--settings=[{"n_probe": 4, "reorder": 1000}]', "--nohnsw", "--pqfs", "--scann",
                          "--nprobe=2,4,8", "--k_factor=5,20", "--reorder=50,200", f"--out={out}"],
                         cwd=repo, env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.load(open(out))
    methods = {r["method"] for r in got["rows"]}
    assert any(m.startswith("lmi (B 16, pq4 4 dims/sub-space") for m in methods)
    assert any(m.startswith("faiss-ivf-pq4fs (nlist 16, PQ8x4fs") for m in methods)
    assert any(m.startswith("scann") for m in methods) or "ScaNN skipped" in res.stdout
    summary = {r["method"].split(" (")[0] + (" pq4" if "pq4 4" in r["method"] else ""): r for r in got["summary"]}
    assert summary["faiss-ivf-flat"]["qps_vs_ivf@0.90"] == 1.0
    lmi = {("reorder" in r["setting"]): r for r in got["rows"] if r["method"].startswith("lmi")}
    # Every candidate re-ranked (1000 > the ~750 of 4 leaves): the float search's results, from the codes' path.
    assert lmi[True]["recall@10"] == lmi[False]["recall@10"] > 0.8
    assert lmi[True]["candidates_per_query"] == lmi[False]["candidates_per_query"]


@pytest.mark.parametrize("metric,dsub", [("l2", 2), ("l2", 3), ("ip", 2), ("cosine", 1)])
def test_jax_twin_tables_and_values_match_reference(metric, dsub):
    """device.pq4_table / pq4_values (jit, lookup-table gather) give the reference's tables, scales, biases
    and quantized scores (the integer sums) bit for bit on exactly representable inputs (quarters: no sum
    rounds), and to rounding on random floats (XLA may fuse a multiply-add); values to rounding."""
    from jaxidx.search import device
    rng = np.random.default_rng(11)
    d, m = 13, -(-13 // dsub)
    codes = rng.integers(0, 16, (40, m)).astype(np.uint8)
    for exact in (True, False):
        draw = ((lambda *s: rng.integers(-8, 9, s).astype(np.float32) / 4) if exact
                else (lambda *s: rng.standard_normal(s).astype(np.float32)))
        queries, codebooks = draw(6, d), draw(m, 16, dsub)
        table, scale, bias = device.pq4_table(queries, codebooks, metric)
        sums, values = map(np.asarray, device.pq4_values(table, scale, bias, codes))
        for i in range(len(queries)):
            t, s, b = reference.pq4_table(queries[i], codebooks, metric)
            want_sums = t[np.arange(m), codes.astype(np.int64)].sum(1)
            want = want_sums.astype(np.float32) * (np.float32(1) / s) + b
            np.testing.assert_allclose(values[i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            if exact:
                np.testing.assert_array_equal(np.asarray(table[i]), t)
                assert np.float32(scale[i]) == s and np.float32(bias[i]) == b
                np.testing.assert_array_equal(sums[i], want_sums)
            else:
                assert np.abs(np.asarray(table[i]) - t).max() <= 1  # a byte may round the other way


# --- IRLI -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def irli_index(tmp_path_factory):
    from helpers import load_config
    from jaxidx.runner import train_and_evaluate
    wd = str(tmp_path_factory.mktemp("irli_pq4"))
    config = load_config("configs/irli.py:tiny", **{"index.pq4_dims": 2})
    train_and_evaluate(config, wd, progress=False)
    return jaxidx.load(wd), jaxidx.data.load(config.data)


def test_irli_quantized_search_close_to_float_search(irli_index, tmp_path):
    """reorder scores the m routed buckets of every repetition from the codes: re-ranking all of them is the
    float search at min_count 1 (the same union of members); a small reorder stays close to it."""
    index, data = irli_index
    assert index.quantized and index.arrays["pq4_codes"].shape == (data.n_items, 4)  # 16 dims: 8 sub-spaces
    exact_ids, _ = index.search(data.queries, 10, m=3, min_count=1)
    ids, _ = index.search(data.queries, 10, m=3, reorder=10_000)  # min_count defaults to 1 with reorder
    np.testing.assert_array_equal(ids, exact_ids)
    res = index.query(index._prepare(data.queries), index.resolve_setting({"m": 3, "reorder": 80}), 10)
    overlap = {}
    for reorder in (10, 80):  # of about 800 distinct candidates; the tiny set's isotropic clusters are hard for PQ
        ids, _ = index.search(data.queries, 10, m=3, reorder=reorder)
        overlap[reorder] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert overlap[80] > 0.9 and overlap[10] < overlap[80]
    # The slots scanned: every member of the R x m routed buckets, a vector counted once per repetition.
    sizes = np.diff(index.arrays["offsets"], axis=1)
    buckets, _ = index.route(index._prepare(data.queries), 3)
    np.testing.assert_array_equal(res.n_candidates, np.take_along_axis(sizes[None], buckets, 2).sum((1, 2)))
    again = jaxidx.load(index.save(str(tmp_path / "saved")))
    np.testing.assert_array_equal(again.search(data.queries, 10, m=3, reorder=80)[0], ids)
    # The first repetition alone: its m buckets' slots, and all of them re-ranked is its float search.
    res = index.query(index._prepare(data.queries), index.resolve_setting({"m": 3, "reorder": 10_000, "reps": 1}), 10)
    np.testing.assert_array_equal(res.n_candidates, np.take_along_axis(sizes[None, :1], buckets[:, :1], 2).sum((1, 2)))
    np.testing.assert_array_equal(res.ids, index.search(data.queries, 10, m=3, reps=1)[0])


def test_irli_quantized_add_remove_and_errors(irli_index, tmp_path):
    index, data = irli_index
    index = jaxidx.load(index.save(str(tmp_path / "a")))  # a copy: the module's index stays as trained
    new_ids = index.add(data.base[:5] + 0.01)
    ids, _ = index.search(data.base[:5] + 0.01, 1, m=2, reorder=1000)
    np.testing.assert_array_equal(ids[:, 0], new_ids)
    a = index.arrays  # every row's code, added ones included, is its vector's code under the stored codebooks
    np.testing.assert_array_equal(a["pq4_codes"], pq4.pack_rows(pq4.encode(a["vectors"], a["pq4_codebooks"])))
    index.remove(new_ids)
    assert not np.isin(index.search(data.base[:5] + 0.01, 3, m=2, reorder=20)[0], new_ids).any()
    assert index.arrays["pq4_codes"].shape[0] == len(index)
    for setting, match in [({"reorder": 5}, "reorder=5 must be at least k=10"),
                           ({"reorder": 20, "min_count": 2}, "min_count must be 1"),
                           ({"reorder": 20, "backend": "device"}, "backend='host' only"),
                           ({"reorder": -1}, "reorder=-1 must be an integer >= 0")]:
        with pytest.raises(ValueError, match=match):
            index.search(data.queries, 10, m=2, **setting)
    plain = jaxidx.load(index.save(str(tmp_path / "b")))
    plain.arrays = {k: v for k, v in plain.arrays.items() if not k.startswith("pq4_")}
    with pytest.raises(ValueError, match="call index.quantize"):
        plain.search(data.queries, 10, m=2, reorder=20)
    ids, _ = plain.quantize(dims="auto").search(data.queries, 10, m=2, reorder=10_000)
    np.testing.assert_array_equal(ids, plain.search(data.queries, 10, m=2, min_count=1)[0])


def test_irli_pq4_config_errors():
    from helpers import load_config
    from jaxidx.methods.irli import validate_config
    config = load_config("configs/irli.py:tiny", **{"search.settings": [{"m": 2, "reorder": 20}]})
    with pytest.raises(ValueError, match="reorder=20 scans PQ codes; set index.pq4_dims"):
        validate_config(config, 3000)
    config = load_config("configs/irli.py:tiny", **{"index.pq4_dims": 2,
                                                    "search.settings": [{"m": 2, "min_count": 2, "reorder": 20}]})
    with pytest.raises(ValueError, match="min_count must be 1"):
        validate_config(config, 3000)


def test_bench_latency_single_queries_beside_peers(lmi_run, irli_index, tmp_path):
    """launch/bench_latency.py: LMI (floats, codes) and quantized IRLI searched one query per call beside
    hnswlib, faiss IVF-Flat and ScaNN (or its skip message); the same results as the batch search."""
    import json
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    irli_dir = irli_index[0].save(str(tmp_path / "irli"))
    out = tmp_path / "latency.json"
    res = subprocess.run([sys.executable, os.path.join(repo, "launch", "bench_latency.py"), f"--workdir={lmi_run[0]}",
                          f"--workdir={irli_dir}", '--settings=[{"n_probe": 4}, {"n_probe": 4, "reorder": 100}]',
                          '--settings=[{"m": 3, "reorder": 80}]', "--queries=30", "--ef=20,80", "--nprobe=4,8",
                          "--leaves=4,8", "--reorder=50", f"--out={out}"],
                         cwd=repo, env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.load(open(out))
    rows = {(r["method"].split(" (")[0], json.dumps(r["setting"])): r for r in got["rows"]}
    assert {m for m, _ in rows} >= {"lmi", "irli", "hnswlib", "faiss-ivf-flat"}
    assert ("scann", '{"leaves": 8, "reorder": 50}') in rows or "ScaNN skipped" in res.stdout
    assert all(0 < r["latency_us_p50"] <= r["latency_us_p99"] for r in got["rows"])
    index, data = irli_index  # one query per call finds what the batch finds
    batch_ids, _ = index.search(data.queries[:30], 10, m=3, reorder=80)
    from jaxidx.metrics import knn_recall
    assert rows[("irli", '{"m": 3, "reorder": 80}')]["recall@10"] == knn_recall(batch_ids, data.gt_ids[:30], 10)
    assert {r["method"].split(" (")[0] for r in got["summary"]} >= {"lmi", "irli", "hnswlib", "faiss-ivf-flat"}


def test_anisotropic_index_codes_persist_and_follow_add(irli_index, lmi_index, tmp_path):
    """quantize(anisotropic=T) stores the weight; `add` encodes new rows with it, `save` / `load` keep it."""
    index, data = irli_index
    index = jaxidx.load(index.save(str(tmp_path / "irli"))).quantize(2, anisotropic=0.5)
    assert index.arrays["pq4_eta"].shape == (1,) and index.arrays["pq4_eta"][0] == pytest.approx(pq4.anisotropic_eta(16, 0.5))
    index.add(data.base[:7] + 0.01)
    a = index.arrays
    np.testing.assert_array_equal(a["pq4_codes"], pq4.codes_of(a, a["vectors"], a["vectors"]))
    assert not np.array_equal(a["pq4_codes"], pq4.pack_rows(pq4.encode(a["vectors"], a["pq4_codebooks"])))
    again = jaxidx.load(index.save(str(tmp_path / "irli2")))
    np.testing.assert_array_equal(again.search(data.queries, 10, m=3, reorder=40)[0],
                                  index.search(data.queries, 10, m=3, reorder=40)[0])
    lmi, queries = jaxidx.load(lmi_index[0].save(str(tmp_path / "lmi"))).quantize(2, anisotropic=0.5), lmi_index[1].queries
    ids, _ = lmi.search(queries, 10, n_probe=4, reorder=10_000)
    np.testing.assert_array_equal(ids, lmi.search(queries, 10, n_probe=4)[0])
    assert "pq4_eta" in lmi.arrays and "pq4_eta" not in lmi.quantize(2).arrays  # plain codes drop it
