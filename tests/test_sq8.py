"""8-bit scalar-quantized rows: the `sq8_search` kernel against its NumPy reference on every SIMD path, its
argument checks, the codes (`jaxidx.sq8`), and LMI's search over them."""
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxidx
from jaxidx import sq8
from jaxidx.search import host, reference

BACKENDS = {"host": host, "reference": reference}


def sq8_case(rng, metric, d=50, n=400, leaves=6, q=12, p=3, scale=50.0, offset=100.0):
    """Base rows in leaf layout with their codes, and probes that skip (-1) and cut leaves short."""
    x = (rng.standard_normal((n, d)) * scale + offset).astype(np.float32)
    sizes = rng.multinomial(n, np.ones(leaves) / leaves)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    lo, sc = sq8.fit(x)
    codes = sq8.encode(x, lo, sc)
    probe = np.stack([rng.permutation(leaves)[:p] for _ in range(q)]).astype(np.int32)
    probe[0, -1] = -1
    lens = np.where(probe >= 0, sizes[np.maximum(probe, 0)], 0).astype(np.int32)
    lens[1, 0] //= 2
    return dict(queries=(rng.standard_normal((q, d)) * scale + offset).astype(np.float32), base=x, codes=codes, lo=lo,
                scale=sc, row_terms=sq8.row_terms(codes, sc) if metric == "l2" else None, row_offsets=offsets,
                leaves=probe, lens=lens, metric=metric)


def assert_same(a, b):
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), (u, v)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("d", [3, 32, 50, 64, 130])
@pytest.mark.parametrize("reorder", [4, 30, 1000])
def test_sq8_search_matches_reference(metric, d, reorder):
    case = sq8_case(np.random.default_rng(d), metric, d=d)
    assert_same(host.sq8_search(**case, reorder=reorder, k=4, n_threads=2),
                reference.sq8_search(**case, reorder=reorder, k=4))


@pytest.mark.parametrize("force, path", [({}, None), ({"JAXIDX_NO_AVX512": "1"}, "avx2"),
                                         ({"JAXIDX_NO_AVX2": "1"}, "portable")])
def test_sq8_search_simd_paths_match_reference(force, path):
    """Every scan the CPU offers (VNNI, AVX2 forced with JAXIDX_NO_AVX512, portable with JAXIDX_NO_AVX2) gives
    the reference's bits: runs of every length mod 8, rows of one and several 32-byte chunks."""
    code = f"""
import numpy as np
from test_sq8 import sq8_case, assert_same
from jaxidx.search import host, reference
path = host.simd_paths()["sq8_scan"]
want = {path!r}
assert want is None or path in (want, "portable"), path  # the forced path, unless the CPU lacks it
for i, (metric, d) in enumerate([("l2", 5), ("ip", 32), ("l2", 64), ("ip", 100), ("l2", 50)]):
    case = sq8_case(np.random.default_rng(i), metric, d=d, n=203, leaves=5)
    for reorder in (4, 17, 300):
        assert_same(host.sq8_search(**case, reorder=reorder, k=4, n_threads=1),
                    reference.sq8_search(**case, reorder=reorder, k=4))
print(path)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXIDX_NO_")}
    out = subprocess.run([sys.executable, "-c", code], check=True, env={**env, **force},
                         cwd=os.path.dirname(__file__), capture_output=True, text=True)
    assert out.stdout.strip() in ("avx512vnni", "avx2", "portable")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_sq8_reorder_of_every_candidate_is_the_exact_search(metric):
    case = sq8_case(np.random.default_rng(7), metric)
    rows, dist, n = host.sq8_search(**case, reorder=10_000, k=5)
    starts = case["row_offsets"][np.maximum(case["leaves"], 0)].astype(np.int32)
    runs = (np.arange(0, case["leaves"].size + 1, case["leaves"].shape[1], dtype=np.int64), starts.ravel(),
            case["lens"].ravel())
    want = host.rerank_topk(case["queries"], case["base"], runs, 5, metric)
    assert_same((rows, dist), want[:2])
    np.testing.assert_array_equal(n, case["lens"].sum(1))


def test_sq8_approximate_top_finds_the_nearest():
    """On clustered rows in the hundreds, the 8-bit scores keep the true 10 nearest within the best 30."""
    case = sq8_case(np.random.default_rng(3), "l2", d=64, n=3000, leaves=1, q=50, p=1)
    case["leaves"][:] = 0
    case["lens"][:] = len(case["base"])
    exact = host.sq8_search(**case, reorder=10_000, k=10)[0]
    approx = host.sq8_search(**case, reorder=30, k=10)[0]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)]) > 0.95


@pytest.mark.parametrize("backend", ["host", "reference"])
def test_sq8_search_validation(backend):
    case = sq8_case(np.random.default_rng(1), "l2", d=20)
    leaves_twice = case["leaves"].copy()
    leaves_twice[2, 1] = leaves_twice[2, 0]
    lens_long = case["lens"].copy()
    lens_long[2, 0] += 10_000
    wide = np.zeros((len(case["base"]), 131104), np.uint8)  # int32 dot products could overflow
    bad = [("codes", {"codes": case["codes"][:, :16]}), ("codes", {"codes": case["codes"][:-1]}),
           ("codes", {"codes": wide}),
           ("lo", {"lo": case["lo"][:-1]}), ("scale", {"scale": case["scale"].astype(np.float64)}),
           ("row_terms", {"row_terms": None}), ("row_terms", {"metric": "ip"}), ("metric", {"metric": "cosine"}),
           ("reorder", {"reorder": 3}), ("queries", {"queries": case["queries"][:, :5]})]
    if backend == "host":  # the kernel checks the probes; the reference reads them as given
        bad += [("leaves", {"leaves": leaves_twice}), ("lens", {"lens": lens_long}),
                ("row_offsets", {"row_offsets": case["row_offsets"][:-1]})]
    for name, change in bad:
        with pytest.raises(ValueError, match=name):
            BACKENDS[backend].sq8_search(**{**case, "reorder": 10, "k": 4, **change})


def test_sq8_codes():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 40)) * np.linspace(0.1, 100, 40) + 5).astype(np.float32)  # unequal ranges
    x[:, 7] = 3.0  # a constant dimension
    lo, scale = sq8.fit(x)
    codes = sq8.encode(x, lo, scale)
    assert codes.shape == (300, 64) and codes.dtype == np.uint8 and not codes[:, 40:].any()
    assert scale[7] == 1 and (codes[:, 7] == 0).all()
    decoded = lo + scale * codes[:, :40]
    assert np.abs(decoded - x).max() <= scale.max() / 2 * (1 + 1e-5)
    np.testing.assert_allclose(sq8.row_terms(codes, scale), ((scale * codes[:, :40]) ** 2).sum(1), rtol=1e-5)
    assert (sq8.encode(x + 1000, lo, scale)[:, :40] <= 255).all()  # outside the range: clipped
    with pytest.raises(ValueError, match="sq8.fit"):
        sq8.fit(x[:0])


def test_sq8_store_insert_keep():
    """An index's 8-bit arrays through add (insert) and remove (keep): codes and l2 row terms stay those of
    the rows under the ranges fitted first."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 10)).astype(np.float32)
    arrays = {}
    sq8.store(arrays, x, "l2")
    new = rng.standard_normal((4, 10)).astype(np.float32) * 3  # partly outside the fitted ranges
    at = np.array([0, 7, 7, 50])
    sq8.insert(arrays, at, new)
    rows = np.insert(x, at, new, axis=0)
    np.testing.assert_array_equal(arrays["sq8_codes"], sq8.encode(rows, arrays["sq8_lo"], arrays["sq8_scale"]))
    np.testing.assert_array_equal(arrays["sq8_terms"], sq8.row_terms(arrays["sq8_codes"], arrays["sq8_scale"]))
    mask = rng.random(len(rows)) < 0.5
    sq8.keep(arrays, mask)
    np.testing.assert_array_equal(arrays["sq8_codes"], sq8.encode(rows[mask], arrays["sq8_lo"], arrays["sq8_scale"]))
    assert arrays["sq8_terms"].shape == (mask.sum(),)
    sq8.store(arrays, x, "ip")
    assert "sq8_terms" not in arrays


# --- LMI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lmi_sq8(tmp_path_factory):
    from helpers import load_config
    from jaxidx.runner import train_and_evaluate
    wd = str(tmp_path_factory.mktemp("lmi_sq8"))
    config = load_config("configs/lmi.py:tiny", **{"index.sq8": True})
    train_and_evaluate(config, wd, progress=False)
    return jaxidx.load(wd), jaxidx.data.load(config.data), wd


def test_lmi_sq8_search_close_to_float_search(lmi_sq8, tmp_path):
    index, data, _ = lmi_sq8
    assert index.arrays["sq8_codes"].shape == (data.n_items, 32)
    exact_ids, exact_d = index.search(data.queries, 10, n_probe=4)
    ids, d = index.search(data.queries, 10, n_probe=4, reorder=10_000, codes="sq8")  # every candidate re-ranked
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_array_equal(d, exact_d)
    ids, _ = index.search(data.queries, 10, n_probe=4, reorder=30, codes="sq8")
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)]) > 0.95
    again = jaxidx.load(index.save(str(tmp_path / "saved")))
    np.testing.assert_array_equal(again.search(data.queries, 10, n_probe=4, reorder=30, codes="sq8")[0], ids)


def test_lmi_sq8_add_remove_and_errors(lmi_sq8, tmp_path):
    index, data, _ = lmi_sq8
    index = jaxidx.load(index.save(str(tmp_path / "a")))  # a copy: the module's index stays as trained
    new = data.base[:5] + 0.01
    new_ids = index.add(new)
    ids, _ = index.search(new, 1, n_probe=1, reorder=10_000, codes="sq8")
    np.testing.assert_array_equal(ids[:, 0], new_ids)
    a = index.arrays  # every row's code, added ones included, under the stored ranges
    np.testing.assert_array_equal(a["sq8_codes"], sq8.encode(a["vectors"], a["sq8_lo"], a["sq8_scale"]))
    assert "sq8_terms" not in a  # angular data: inner products, no row terms (sq8_store_insert_keep: l2)
    index.remove(new_ids)
    ids, _ = index.search(new, 3, n_probe=1, reorder=20, codes="sq8")
    assert not np.isin(ids, new_ids).any()
    assert index.arrays["sq8_codes"].shape[0] == len(index)
    with pytest.raises(ValueError, match="backend='host' only"):
        index.search(data.queries, 10, n_probe=1, reorder=20, codes="sq8", backend="device")
    with pytest.raises(ValueError, match="codes='int4' must be one of pq4, sq8"):
        index.search(data.queries, 10, n_probe=1, reorder=20, codes="int4")
    with pytest.raises(ValueError, match="index.quantize\\(\\)"):  # no PQ codes in this index
        index.search(data.queries, 10, n_probe=1, reorder=20)
    plain = jaxidx.load(index.save(str(tmp_path / "b")))
    plain.arrays = {k: v for k, v in plain.arrays.items() if not k.startswith("sq8_")}
    with pytest.raises(ValueError, match="8-bit codes, which this index does not hold: call index.quantize_sq8"):
        plain.search(data.queries, 10, n_probe=1, reorder=20, codes="sq8")
    ids, _ = plain.quantize_sq8().search(data.queries, 10, n_probe=2, reorder=10_000, codes="sq8")
    np.testing.assert_array_equal(ids, plain.search(data.queries, 10, n_probe=2)[0])


def test_sq8_config_checks():
    from helpers import load_config
    from jaxidx.methods.lmi import validate_config
    config = load_config("configs/lmi.py:tiny")
    with config.unlocked():
        config.search.settings = [{"n_probe": 2, "reorder": 20, "codes": "sq8"}]
    data = jaxidx.data.load(config.data)
    with pytest.raises(ValueError, match="index.sq8=True"):
        validate_config(config, data)
    with config.unlocked():
        config.index.sq8 = True
    validate_config(config, data)  # pq4_dims 0 is fine: the setting scans 8-bit codes
    with config.unlocked():
        config.search.settings = [{"n_probe": 2, "reorder": 20, "codes": "int4"}]
    with pytest.raises(ValueError, match="codes='int4'"):
        validate_config(config, data)


def test_bench_ann_sq8_sweep(lmi_sq8, tmp_path):
    """launch/bench_ann.py --sq8=1: the run's float-row settings searched again on 8-bit codes at each
    --sq8_reorder, beside faiss IVF-Flat; a re-rank of every candidate gives the float search's recall."""
    import json
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, os.path.join(repo, "launch", "bench_ann.py"), f"--workdir={lmi_sq8[2]}",
                          "--sq8=1", "--sq8_reorder=20,1000", '--settings=[{"n_probe": 4}]', "--nohnsw",
                          "--nprobe=2,4", f"--out={out}"],
                         cwd=repo, env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["setting"].get("codes"), r["setting"].get("reorder")): r for r in json.load(open(out))["rows"]
            if r["method"].startswith("lmi (B 16, sq8")}
    assert set(rows) == {(None, None), ("sq8", 20), ("sq8", 1000)}
    assert rows["sq8", 1000]["recall@10"] == rows[None, None]["recall@10"] > 0.8
