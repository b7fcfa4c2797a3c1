"""Fuzz of the C++ kernels' argument checks (`jaxidx.search.host`): random ranks, shapes, dtypes,
memory layouts, out-of-range ids and integer options give the NumPy reference's result or a
ValueError naming an argument; never another exception, a crash or a hang.

Valid arguments are drawn first, then some are broken; values are small multiples of 1/8, so
host and reference must agree bit for bit. Each fuzz runs in a child process with a 4 GiB
address-space limit, so a crash fails its test instead of killing pytest and an oversized
allocation shows up as a MemoryError instead of swapping the machine.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import run_python

f32, i32, i64 = np.float32, np.int32, np.int64
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)
BAD_INTS = [0, -1, -(2**31), 2**31, 2**63 - 1, 2**63, 2**64, 1.5, "3", None]
OTHER_DTYPES = [i32, i64, f32, np.float64, np.uint32, np.int16, np.bool_]
ARGS = {
    "merge_topk": ("bucket_ids", "bucket_scores", "offsets", "members", "weights", "k", "min_count", "agg",
                   "n_items", "n_threads"),
    "merge_candidates": ("bucket_ids", "offsets", "members", "min_count", "min_candidates", "n_items", "n_threads"),
    "rerank_topk": ("queries", "base", "candidates", "cand_offsets", "cand_ids", "k", "metric", "n_threads"),
    "topk_rows": ("x", "k", "n_threads"),
    "balanced_assign": ("candidates", "n_buckets", "order", "capacity", "initial_counts", "n_choices", "n_threads"),
}


def eighths(rng, shape):
    return (rng.integers(-16, 17, shape) / 8).astype(f32)


class Args:
    """Draws one kernel's arguments: each valid, or now and then broken (`broken` lists which)."""

    def __init__(self, draw):
        self.draw, self.broken, self.kw = draw, [], {}

    def _bad(self):
        return self.draw(st.sampled_from([False] * 7 + [True]))  # valid first: what hypothesis tries most

    def array(self, name, a, lo=None, hi=None, optional=False):
        """a, or a variant with another dtype / rank / layout / length, a list, None, or an id outside [lo, hi)."""
        if a is not None and self._bad():
            how = self.draw(st.sampled_from(["dtype", "rank+", "rank-", "strided", "fortran", "list", "none",
                                             "length", "id"]))
            a = self._break(a, how, lo, hi)
            if not (how == "none" and optional):
                self.broken.append(name)
        self.kw[name] = a
        return a

    def _break(self, a, how, lo, hi):
        draw = self.draw
        if how == "dtype":
            return a.astype(draw(st.sampled_from([t for t in OTHER_DTYPES if t != a.dtype])))
        if how == "rank+":
            return a[None]
        if how == "rank-":
            return a.reshape(-1) if a.ndim > 1 else np.asarray(a.ravel()[0] if a.size else 0, a.dtype)
        if how == "strided":
            return np.repeat(a, 2, axis=-1)[..., ::2] if a.ndim else a
        if how == "fortran":
            return np.asfortranarray(a)
        if how == "list":
            return a.tolist()
        if how == "none":
            return None
        if how == "length" and a.ndim:
            axis = draw(st.integers(0, a.ndim - 1))
            if a.shape[axis] and draw(st.booleans()):
                return np.delete(a, -1, axis=axis)
            return np.concatenate([a, np.zeros_like(np.take(a, [0], axis=axis) if a.shape[axis] else a)], axis=axis)
        if how == "id" and a.size and lo is not None:
            a = a.copy()
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([lo - 1, hi, hi + 5, -(2**31), 2**31 - 1]))
        return a

    def integer(self, name, valid, optional=False):
        value = self.draw(valid)
        if self._bad():
            value = self.draw(st.sampled_from([v for v in BAD_INTS if not (v is None and optional)]))
            self.broken.append(name)
        elif self.draw(st.booleans()):
            value = value if value is None else np.int64(value)  # NumPy integers are integers too
        self.kw[name] = value
        return value

    def choice(self, name, valid, bad):
        value = self.draw(st.sampled_from(valid))
        if self._bad():
            value = self.draw(st.sampled_from(bad))
            self.broken.append(name)
        self.kw[name] = value
        return value


def partition(draw, rng, R, B, N):
    """CSR per repetition (offsets int32 [R, B+1], members int32 [R, M], entries past offsets[r, B] = -1)."""
    sizes = rng.integers(0, 4 if N else 1, (R, B))
    offsets = np.zeros((R, B + 1), i32)
    offsets[:, 1:] = np.cumsum(sizes, axis=1)
    M = int(offsets[:, -1].max(initial=0)) + draw(st.integers(0, 2))
    members = np.full((R, M), -1, i32)
    for r in range(R):
        members[r, :offsets[r, -1]] = rng.integers(0, max(N, 1), offsets[r, -1])
    return offsets, members


@st.composite
def merge_args(draw, candidates_only=False):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    Q, R, m, B, N = (draw(st.integers(lo, 4)) for lo in (0, 0, 0, 1, 0))
    a = Args(draw)
    offsets, members = partition(draw, rng, R, B, N)
    a.array("bucket_ids", rng.integers(-1, B, (Q, R, m)).astype(i32), -1, B)
    if not candidates_only:
        a.array("bucket_scores", eighths(rng, (Q, R, m)))
    a.array("offsets", offsets, 0, members.shape[1] + 1)
    a.array("members", members, 0, N)
    if not candidates_only:
        a.array("weights", eighths(rng, members.shape) if draw(st.booleans()) else None, optional=True)
        a.integer("k", st.integers(1, 6))
        a.choice("agg", ["sum", "max"], ["mean", "", None, 3])
    else:
        a.integer("min_candidates", st.integers(1, 6))
    a.integer("min_count", st.integers(1, 3))
    used = members[members >= 0]
    a.integer("n_items", st.one_of(st.none(), st.integers(int(used.max(initial=-1)) + 1, 40)), optional=True)
    a.integer("n_threads", st.integers(0, 3))
    return a


@st.composite
def rerank_args(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    Q, N, d, C = (draw(st.integers(0, 5)) for _ in range(4))
    d = draw(st.sampled_from([d, 9, 17]))  # tails past one and two 8-lane blocks
    a = Args(draw)
    a.array("queries", eighths(rng, (Q, d)))
    a.array("base", eighths(rng, (N, d)))
    cand = rng.integers(-1, N, (Q, C)).astype(i32)
    if draw(st.booleans()):
        a.array("candidates", cand, -1, N)
    else:  # CSR: the same ids, with the -1 entries dropped
        rows = [r[r >= 0] for r in cand]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(draw(st.sampled_from([i32, i64])))
        ids = np.concatenate(rows).astype(i32) if rows else np.zeros(0, i32)
        a.array("cand_offsets", offsets, 0, len(ids) + 1)
        a.array("cand_ids", ids, -1, N)
        a.kw["candidates"] = (a.kw.pop("cand_offsets"), a.kw.pop("cand_ids"))
    a.integer("k", st.integers(1, 7))
    a.choice("metric", ["ip", "cosine", "l2"], ["dot", "L2", None, 0])
    a.integer("n_threads", st.integers(0, 3))
    return a


@st.composite
def topk_args(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = Args(draw)
    a.array("x", eighths(rng, (draw(st.integers(0, 5)), draw(st.integers(0, 6)))))
    a.integer("k", st.integers(1, 8))
    a.integer("n_threads", st.integers(0, 3))
    return a


@st.composite
def assign_args(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    R, N, K, B = (draw(st.integers(lo, 5)) for lo in (0, 0, 0, 1))
    a = Args(draw)
    a.array("candidates", rng.integers(-1, B, (R, N, K)).astype(i32), -1, B)
    a.integer("n_buckets", st.just(B))
    order = np.array([rng.permutation(N) for _ in range(R)], i64).reshape(R, N) if draw(st.booleans()) else None
    a.array("order", None if order is None else order.astype(draw(st.sampled_from([i32, i64]))), 0, N,
            optional=True)
    init = rng.integers(0, 3, (R, B)).astype(i64) if draw(st.booleans()) else None
    a.array("initial_counts", init, 0, 2**40, optional=True)
    total = N + (int(init.sum(axis=1).max(initial=0)) if init is not None else 0)
    a.integer("capacity", st.sampled_from([0, -(-total // B) if total else 1, total + 1]))
    a.integer("n_choices", st.integers(0, 3))
    a.integer("n_threads", st.integers(0, 3))
    return a


def check(name, a):
    """Host equals reference bit for bit, or raises ValueError naming one of the kernel's arguments
    (and does so whenever an argument was broken in a way the reference also refuses)."""
    from jaxidx.search import host, reference
    try:
        got = getattr(host, name)(**a.kw)
    except ValueError as e:
        assert str(e).split(":")[0] in ARGS[name], f"{name}: {e!r} names no argument ({a.broken})"
        assert a.broken, f"{name}: valid arguments refused: {e!r}"
        return
    want = getattr(reference, name)(**a.kw)
    got, want = (got,) if name == "balanced_assign" else got, (want,) if name == "balanced_assign" else want
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x.view(i32) if x.dtype == f32 else x, y.view(i32) if y.dtype == f32 else y)


@FUZZ
@given(a=merge_args())
def fuzz_merge_topk(a):
    check("merge_topk", a)


@FUZZ
@given(a=merge_args(candidates_only=True))
def fuzz_merge_candidates(a):
    check("merge_candidates", a)


@FUZZ
@given(a=rerank_args())
def fuzz_rerank_topk(a):
    check("rerank_topk", a)


@FUZZ
@given(a=topk_args())
def fuzz_topk_rows(a):
    check("topk_rows", a)


@FUZZ
@given(a=assign_args())
def fuzz_balanced_assign(a):
    check("balanced_assign", a)


_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
sys.path.insert(0, 'tests')
import test_fuzz_kernels as t
t.fuzz_{name}()
print('{{}}')
"""


@pytest.mark.parametrize("name", list(ARGS))
def test_fuzz(name):
    run_python(_CHILD.format(name=name), timeout=300)


def test_thread_start_failure_is_survived():
    """More threads than the system can start (here: than a 4 GiB address space holds stacks for):
    the kernel runs on the threads it got instead of aborting the process."""
    out = run_python("""
import json, resource
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import numpy as np
from jaxidx.search import host, reference
x = (np.arange(3 * 5000) % 7).astype(np.float32).reshape(5000, 3)
ok = all((a == b).all() for a, b in zip(host.topk_rows(x, 2, n_threads=5000), reference.topk_rows(x, 2)))
print(json.dumps({'ok': bool(ok)}))
""")
    assert out["ok"]
