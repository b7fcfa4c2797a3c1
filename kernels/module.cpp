// pybind11 bindings of jaxidx._kernels. Arguments arrive as plain objects so
// that every check (and its ValueError naming the argument) lives in C++.
#include "kernels.h"

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "jaxidx C++ search kernels: bucket merge/top-k, exact re-rank (also fused with the merge), 4-bit PQ fast scan with exact re-rank, row top-k, cluster-tree beam, balanced assignment";
    m.def("merge_candidates", &jaxidx::merge_candidates, py::arg("bucket_ids"), py::arg("offsets"),
          py::arg("members"), py::arg("min_count"), py::arg("min_candidates"), py::arg("n_items"),
          py::arg("n_threads"));
    m.def("merge_rerank_topk", &jaxidx::merge_rerank_topk, py::arg("queries"), py::arg("base"),
          py::arg("bucket_ids"), py::arg("offsets"), py::arg("members"), py::arg("k"), py::arg("min_count"),
          py::arg("metric"), py::arg("n_threads"));
    m.def("merge_topk", &jaxidx::merge_topk, py::arg("bucket_ids"), py::arg("bucket_scores"), py::arg("offsets"),
          py::arg("members"), py::arg("weights"), py::arg("k"), py::arg("min_count"), py::arg("agg"),
          py::arg("n_items"), py::arg("n_threads"));
    m.def("topk_rows", &jaxidx::topk_rows, py::arg("x"), py::arg("k"), py::arg("n_threads"));
    m.def("rerank_topk", &jaxidx::rerank_topk, py::arg("queries"), py::arg("base"), py::arg("cand_offsets"),
          py::arg("cand_ids"), py::arg("run_lens"), py::arg("k"), py::arg("metric"), py::arg("n_threads"));
    m.def("pq4_search", &jaxidx::pq4_search, py::arg("queries"), py::arg("base"), py::arg("codes"),
          py::arg("codebooks"), py::arg("centres"), py::arg("row_offsets"), py::arg("block_offsets"),
          py::arg("leaves"), py::arg("lens"), py::arg("reorder"), py::arg("k"), py::arg("metric"),
          py::arg("n_threads"), py::arg("row_terms"), py::arg("row_ids"));
    m.def("sq8_search", &jaxidx::sq8_search, py::arg("queries"), py::arg("base"), py::arg("codes"), py::arg("lo"),
          py::arg("scale"), py::arg("row_terms"), py::arg("row_offsets"), py::arg("leaves"), py::arg("lens"),
          py::arg("reorder"), py::arg("k"), py::arg("metric"), py::arg("n_threads"));
    m.def(
        "simd_paths",
        [] {
            std::string exact = "portable", fastscan = "portable", sq8 = "portable";
#if defined(__x86_64__) || defined(__i386__)
            if (jaxidx::use_avx2()) exact = fastscan = sq8 = "avx2";
            if (jaxidx::use_avx512bw()) fastscan = "avx512bw";
            if (jaxidx::use_avx512vnni()) sq8 = "avx512vnni";
#endif
            py::dict out;
            out["exact"] = exact;        // rerank_topk, merge_rerank_topk, pq4_search's and sq8_search's re-rank
            out["pq4_scan"] = fastscan;  // pq4_search's code scan
            out["sq8_scan"] = sq8;       // sq8_search's code scan
            return out;
        },
        "The instruction set each kernel family runs on this CPU (chosen at run time; JAXIDX_NO_AVX2 / "
        "JAXIDX_NO_AVX512 force the narrower paths).");
    m.def("tree_beam", &jaxidx::tree_beam, py::arg("phi"), py::arg("groups"), py::arg("group_logp"),
          py::arg("rows"), py::arg("bias"), py::arg("n_groups"), py::arg("k"), py::arg("n_threads"));
    m.def("balanced_assign", &jaxidx::balanced_assign, py::arg("candidates"), py::arg("n_buckets"),
          py::arg("order"), py::arg("capacity"), py::arg("initial_counts"), py::arg("n_choices"),
          py::arg("n_threads"));
}
