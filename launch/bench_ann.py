"""ANN benchmark: a trained jaxidx index against faiss IVF-Flat (nlist = the index's
bucket count), hnswlib and brute force, and optionally faiss IVF-PQ4 fast scan and ScaNN
(same bucket count), on the same base and queries, in one run.

    python launch/bench_ann.py --workdir=runs/irli-glove [--workdir=runs/lmi-glove] --threads=1
    python launch/bench_ann.py --suite --threads=1 --out=benchmarks/bench_ann_suite.json

--suite trains each method's auto preset on every data set of the robustness suite
(`jaxidx.data.suite`, on all cores) and searches them one core beside the peers, one table.

Queries are searched in one batch on `--threads` cores (the whole process is
pinned). Prints a table and the best figures at recall 0.90, writes
`--out` (JSON) and a PNG of recall@10 vs candidates/query and vs queries/s.
"""

from jaxidx.bench import pin_threads_from_argv

if __name__ == "__main__":  # pin before jax / faiss start their thread pools
    pin_threads_from_argv()

import json  # noqa: E402
import os  # noqa: E402

from absl import flags, logging  # noqa: E402

from jaxidx import bench, cli  # noqa: E402
from jaxidx.evaluate import evaluate, format_results  # noqa: E402
import jaxidx  # noqa: E402
from jaxidx.config import apply_overrides, probe_sweep  # noqa: E402
from jaxidx.data import load  # noqa: E402

flags.DEFINE_multi_string("workdir", None, "Run directories of trained indexes (one or more).")
flags.DEFINE_string("data", None, "Data spec override (default: each checkpoint's own).")
flags.DEFINE_multi_string("settings", [], 'Search settings override per --workdir, in the same order, JSON, '
                          'e.g. \'[{"m": 8, "min_count": 2}]\' (missing: the checkpoint\'s own).')
flags.DEFINE_integer("threads", 1, "Cores for every method's search (the process is pinned).")
flags.DEFINE_list("nprobe", [str(p) for p in probe_sweep(4096)], "faiss IVF-Flat nprobe sweep (those <= nlist).")
flags.DEFINE_list("ef", "10,20,40,80,160,320", "hnswlib ef sweep.")
flags.DEFINE_bool("hnsw", True, "Include hnswlib (its build is the slowest part).")
flags.DEFINE_bool("pqfs", False, "Include faiss IVF{B},PQ{d/2}x4fs,RFlat (4-bit fast scan + exact refine).")
flags.DEFINE_list("k_factor", "2,5,10,20,40", "faiss IVF-PQ4fs refine sweep (candidates re-ranked / 10).")
flags.DEFINE_bool("scann", False, "Include ScaNN (tree of B leaves, AH 2 dims/block, reorder); skipped with a "
                  "message when `scann` is not installed.")
flags.DEFINE_list("reorder", "20,50,100,200,400", "ScaNN reorder sweep.")
flags.DEFINE_list("quantize", [], "Per --workdir, in the same order: > 0 gives an LMI or IRLI index 4-bit PQ codes of "
                  "this many dims per sub-space (`quantize`) before searching, for settings with reorder; 'auto' "
                  "the dims pq4.choose_dims picks; 0 = as trained. The same --workdir may be given twice.")
flags.DEFINE_list("sq8", [], "Per --workdir, in the same order (with --suite: per method of --methods): 1 gives an "
                  "LMI index 8-bit codes (`quantize_sq8`) and adds, for every float-row setting of its sweep, the "
                  "same setting on the codes at each --sq8_reorder.")
flags.DEFINE_list("sq8_reorder", "10,20,30,50", "With --sq8: the reorder sweep of the 8-bit codes.")
flags.DEFINE_list("anisotropic", [], "Per --workdir, in the same order, with --quantize: the score-aware loss's "
                  "threshold T for the codes (angular / dot data; 0 = plain PQ).")
flags.DEFINE_list("pq4_scan", [], "Per --workdir, in the same order: the 4-bit scan's instruction set, 'auto' (the "
                  "best the CPU has) or 'avx2' (AVX-512 off, to measure what it buys in the same run).")
flags.DEFINE_integer("hnsw_build_threads", 0, "Threads for the hnswlib build only (0 = all cores of the machine).")
flags.DEFINE_enum("recall", "recall@10", ["recall@10", "recall@10_distance"], "The summary's recall (not --suite, "
                  "which counts by distance): by id, or by distance as ann-benchmarks (exact ties on binary rows).")
flags.DEFINE_string("out", "out/bench_ann.json", "JSON result path; the plot goes beside it (.png).")
flags.DEFINE_bool("suite", False, "Run every ANN method's auto preset on the robustness suite "
                  "(jaxidx.data.suite.SUITE) beside faiss IVF-Flat (LMI's bucket count) and hnswlib.")
flags.DEFINE_multi_string("suite_data", [], "With --suite: these data specs (repeat the flag) instead of the "
                          "whole suite.")
flags.DEFINE_list("methods", ["lmi", "irli"], "With --suite: the methods trained (auto presets).")
flags.DEFINE_string("suite_dir", "runs/suite", "With --suite: where runs train; a finished run is reused.")
FLAGS = flags.FLAGS


def with_sq8(index, settings: list) -> list:
    """--sq8: the index given 8-bit codes, and the settings plus each float-row one on the codes at every
    --sq8_reorder."""
    index.quantize_sq8()
    floats = [s for s in settings if not s.get("reorder") and "max_candidates" not in s]
    return list(settings) + [dict(s, reorder=int(r), codes="sq8") for s in floats for r in FLAGS.sq8_reorder]


def index_rows(workdirs: list[str], data_spec=None, settings=(), tagged: bool = True):
    """Each trained run opened with `jaxidx.load` and searched at its settings (or `settings[i]`), on the
    run's data (or `data_spec`); returns (rows, {name: build seconds}, data, bucket count of the first).
    Rows are named by method and buckets, and (`tagged`) the run directory's name."""
    rows, builds, data, nlist = [], {}, None, None
    for i, wd in enumerate(workdirs):
        index = jaxidx.load(wd)
        overrides = {"search.n_threads": FLAGS.threads}
        if i < len(settings):
            overrides["search.settings"] = json.loads(settings[i])
        apply_overrides(index.config, overrides)
        dims = FLAGS.quantize[i] if i < len(FLAGS.quantize) else "0"
        dims = dims if dims == "auto" else int(dims)
        if dims and index.task != "ann":
            raise ValueError(f"--quantize: only ANN indexes hold PQ codes; {wd} is an {index.task.upper()} index")
        threshold = float(FLAGS.anisotropic[i]) if i < len(FLAGS.anisotropic) else 0.0
        if dims:
            index.quantize(dims, anisotropic=threshold)
            dims = index.arrays["pq4_codebooks"].shape[2]
        data_i = load(data_spec or index.config.data)
        if data_i.fingerprint() != index.info["data_fingerprint"]:
            raise ValueError(f"--workdir {wd}: trained on other data than {data_spec or index.config.data}")
        data = data_i
        n_buckets = index.stats()["n_buckets"]
        nlist = nlist or n_buckets
        scan = FLAGS.pq4_scan[i] if i < len(FLAGS.pq4_scan) else "auto"
        sq8 = i < len(FLAGS.sq8) and bool(int(FLAGS.sq8[i]))
        name = (f"{index.method} (B {n_buckets}" + (f", pq4 {dims} dims/sub-space" if dims else "")
                + (f", anisotropic T {threshold}" if dims and threshold else "") + (", sq8" if sq8 else "")
                + (f", {scan} scan" if scan != "auto" else "")
                + (f", {os.path.basename(os.path.normpath(wd))})" if tagged else ")"))
        builds[name] = float(index.info.get("train_seconds", 0.0))
        sweep = index.config.search.settings
        if sq8:
            if index.method != "lmi":
                raise ValueError(f"--sq8: only LMI indexes hold 8-bit codes; {wd} is an {index.method.upper()} index")
            sweep = with_sq8(index, sweep)
        with bench.pq4_scan(scan):
            results = evaluate(index, data, sweep, 10, warm=True)
        for r in results:
            setting = {k: v for k, v in r.items() if k not in
                       ("recall@10", "recall@10_distance", "candidates_per_query", "queries_per_second")}
            rows.append({"method": name, "setting": setting,
                         **{k: r[k] for k in ("recall@10", "recall@10_distance", "candidates_per_query",
                                              "queries_per_second")}})
    return rows, builds, data, nlist


def peer_rows(data, nlist: int):
    """faiss IVF-Flat (nlist lists) and brute force, hnswlib unless --nohnsw, faiss IVF-PQ4fs with --pqfs and
    ScaNN with --scann (nlist leaves)."""
    nprobes = [int(x) for x in FLAGS.nprobe if int(x) <= nlist]
    rows, builds, _ = bench.bench_faiss(data, nlist, nprobes, FLAGS.threads)
    if FLAGS.pqfs:
        prows, pb, _ = bench.bench_faiss_pqfs(data, nlist, nprobes, [int(x) for x in FLAGS.k_factor], FLAGS.threads)
        rows, builds = rows + prows, {**builds, **pb}
    if FLAGS.scann:
        srows, sb, _ = bench.bench_scann(data, nlist, nprobes, [int(x) for x in FLAGS.reorder])
        rows, builds = rows + srows, {**builds, **sb}
    if FLAGS.hnsw:
        hrows, hb, _ = bench.bench_hnsw(data, [int(x) for x in FLAGS.ef], FLAGS.threads, FLAGS.hnsw_build_threads)
        rows, builds = rows + hrows, {**builds, **hb}
    return rows, builds


def train_suite_run(method: str, spec: str) -> str:
    """`launch/train.py` with the method's auto preset on `spec`, on every core (this process is pinned for
    the searches), in --suite_dir; a finished run (its eval.json) is reused."""
    import re
    import subprocess
    import sys
    wd = os.path.join(FLAGS.suite_dir, re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec) + "-" + method)
    if os.path.exists(os.path.join(wd, "eval.json")):
        return wd
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OMP_NUM_THREADS")}
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))  # the child inherits every core (no fork hook)
    try:
        out = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                              f"--config=configs/{method}.py:auto:{spec}", f"--workdir={wd}", "--noprogress"],
                             env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             capture_output=True, text=True)
    finally:
        os.sched_setaffinity(0, pinned)
    if out.returncode:
        raise RuntimeError(f"training {method} on {spec} failed:\n{out.stderr[-3000:]}")
    return wd


def suite_summary(rows: list[dict], data_name: str, builds: dict, key: str = "recall@10_distance") -> list[dict]:
    """Per method: fewest candidates and most queries/s at recall@10 0.90 and 0.95 (by distance, as
    ann-benchmarks counts it, so exact ties on binary data do not hide a correct answer; `key` picks the
    id-based recall instead), and their ratio to faiss IVF-Flat's (candidates: lower is better) and, where
    ScaNN ran, queries/s to ScaNN's."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    refs = {name: {t: next((bench.best_at(rows, m, t, key) for m in methods if m.startswith(prefix)), {})
                   for t in (0.90, 0.95)} for name, prefix in (("ivf", "faiss-ivf-flat"), ("scann", "scann"))}
    for m in methods:
        entry = {"data": data_name, "method": m, "build_s": builds.get(m, builds.get(m.split(" ")[0]))}
        for target in (0.90, 0.95):
            b = bench.best_at(rows, m, target, key)
            tag = f"{target:.2f}"
            if not b["reaches"]:
                entry[f"cand@{tag}"] = entry[f"qps@{tag}"] = "not reached"
                continue
            entry[f"cand@{tag}"] = b["min_candidates"]
            entry[f"qps@{tag}"] = round(b["max_queries_per_second"])
            ivf = refs["ivf"][target]
            if ivf.get("reaches") and b["min_candidates"]:
                entry[f"cand_vs_ivf@{tag}"] = round(b["min_candidates"] / ivf["min_candidates"], 3)
            for name, ref in refs.items():
                if ref[target].get("reaches"):
                    entry[f"qps_vs_{name}@{tag}"] = round(b["max_queries_per_second"]
                                                          / ref[target]["max_queries_per_second"], 3)
        out.append(entry)
    return out


def run_suite() -> dict:
    from jaxidx.data.suite import SUITE
    specs = FLAGS.suite_data or list(SUITE)
    table, per_data = [], {}
    for spec in specs:
        print(f"== {spec}", flush=True)
        wds = [train_suite_run(m, spec) for m in FLAGS.methods]
        rows, builds, data, _ = index_rows(wds, spec, tagged=False)
        lmi = next((jaxidx.load(wd) for wd in wds if "-lmi" in wd), None)
        nlist = (lmi or jaxidx.load(wds[0])).stats()["n_buckets"]
        if lmi is not None:  # the same leaves routed by their means, as IVF routes: learned vs centroid routing
            lmi.config.search.n_threads = FLAGS.threads
            sweep = [dict(s, route="centroids") for s in lmi.config.search.settings if "max_candidates" not in s]
            sq8 = FLAGS.methods.index("lmi") < len(FLAGS.sq8) and int(FLAGS.sq8[FLAGS.methods.index("lmi")])
            for r in evaluate(lmi, data, with_sq8(lmi, sweep) if sq8 else sweep, 10, warm=True):
                rows.append({"method": f"lmi-centroids (B {nlist}{', sq8' if sq8 else ''})",
                             "setting": {k: r[k] for k in ("n_probe", "reorder", "codes") if k in r},
                             **{k: r[k] for k in ("recall@10", "recall@10_distance", "candidates_per_query",
                                                  "queries_per_second")}})
        prows, pbuilds = peer_rows(data, nlist)
        rows += prows
        summary = suite_summary(rows, spec, {**builds, **pbuilds})
        print(format_results(summary), flush=True)
        table += summary
        per_data[spec] = rows
    return {"suite": table, "rows": per_data}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.suite:
        out = {"machine": bench.machine(), "command": bench.command(), "threads": FLAGS.threads, **run_suite()}
        bench.write_json(FLAGS.out, out)
        print(out["machine"])
        print(format_results(out["suite"]))
        print(f"results: {FLAGS.out}")
        return 0
    if not FLAGS.workdir:
        raise ValueError("--workdir: at least one trained run is needed (or --suite)")
    rows, builds, data, nlist = index_rows(FLAGS.workdir, FLAGS.data, FLAGS.settings)
    prows, pbuilds = peer_rows(data, nlist)
    rows += prows
    builds.update(pbuilds)
    summary = suite_summary(rows, data.name, builds, key=FLAGS.recall)
    out = {"machine": bench.machine(), "command": bench.command(), "data": data.name, "threads": FLAGS.threads,
           "n_queries": int(len(data.queries)), "build_seconds": builds, "rows": rows, "summary": summary}
    bench.write_json(FLAGS.out, out)
    bench.plot_ann_curves(rows, FLAGS.out.rsplit(".", 1)[0] + ".png", f"{data.name}, {FLAGS.threads} thread(s)")
    flat = [{"method": r["method"], **r["setting"], **{k: r[k] for k in r if k not in ("method", "setting")}}
            for r in rows]
    print(out["machine"])
    print(format_results(flat))
    print("\nbest at recall@10 >= 0.90 and 0.95 (ratios: queries/s to IVF-Flat's and ScaNN's):")
    print(format_results(summary))
    print("build seconds:", {k: round(v, 1) for k, v in builds.items()})


if __name__ == "__main__":
    cli.run(main)
