// tree_beam: the second level of a two-level cluster tree (ELIAS's cluster classifier at large C).
// Each query's routed groups (the top of the first level) open their children: the group's contiguous
// block of `rows` (n_rows / n_groups leaf classifiers); each child's log probability is its group's plus
// its log softmax among its siblings, and the k best children over all routed groups are kept. Per
// query this reads routed groups x group size rows, not all n_rows: the cost the tree exists for.
#include "scan.h"

namespace jaxidx {

py::tuple tree_beam(const py::object& phi_o, const py::object& groups_o, const py::object& group_logp_o,
                    const py::object& rows_o, const py::object& bias_o, const py::object& n_groups_o,
                    const py::object& k_o, const py::object& n_threads_o) {
    py::array phi_a = require_array<float>(phi_o, "phi", 2);
    py::array groups_a = require_array<int32_t>(groups_o, "groups", 2);
    py::array glogp_a = require_array<float>(group_logp_o, "group_logp", 2);
    py::array rows_a = require_array<float>(rows_o, "rows", 2);
    py::array bias_a = require_array<float>(bias_o, "bias", 1);
    const int64_t k = require_k(k_o);
    const int64_t Q = phi_a.shape(0), H = phi_a.shape(1), B = groups_a.shape(1), C = rows_a.shape(0);
    require_shape(groups_a, "groups", 0, Q, "one row per query");
    require_shape(glogp_a, "group_logp", 0, Q, "one row per query");
    require_shape(glogp_a, "group_logp", 1, B, "one log probability per routed group");
    require_shape(rows_a, "rows", 1, H, "the width of phi");
    require_shape(bias_a, "bias", 0, C, "one bias per row");
    if (C > kInt32Max) fail("rows", "more than 2^31 - 1 rows");
    const int64_t G = require_int(n_groups_o, "n_groups", 1, std::max<int64_t>(C, 1), "must be in [1, rows]");
    if (C % G != 0) fail("n_groups", std::to_string(G) + " does not divide the " + std::to_string(C) + " rows");
    const int64_t S = C / G;
    const int32_t* groups = data_of<int32_t>(groups_a);
    for (int64_t i = 0; i < Q * B; ++i) {
        if (groups[i] < -1 || groups[i] >= G) {
            fail("groups", "id " + std::to_string(groups[i]) + " out of range [-1, " + std::to_string(G) + ")");
        }
    }
    const int threads = resolve_threads(require_threads(n_threads_o), Q);
    const float *phi = data_of<float>(phi_a), *glogp = data_of<float>(glogp_a);
    const float *rows = data_of<float>(rows_a), *bias = data_of<float>(bias_a);
    py::array_t<int32_t> ids_o({Q, k});
    py::array_t<float> logp_o({Q, k});
    int32_t* out_ids = ids_o.mutable_data();
    float* out_logp = logp_o.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<TopK> tops(threads, TopK(true));
        std::vector<std::vector<float>> logits(threads, std::vector<float>(static_cast<size_t>(S)));
        parallel_for(Q, threads, 16, [&](int t, int64_t q0, int64_t q1) {
            TopK& top = tops[t];
            float* z = logits[t].data();
            for (int64_t q = q0; q < q1; ++q) {
                top.reset(static_cast<size_t>(k));
                const float* p = phi + q * H;
                for (int64_t j = 0; j < B; ++j) {
                    const int32_t g = groups[q * B + j];
                    if (g < 0) continue;
                    const int64_t first = g * S;
                    float m = -INFINITY;
                    for (int64_t c = 0; c < S; ++c) {  // the dot in the kernels' canonical order, plus the bias
                        z[c] = -exact_distance(kIP, p, rows + (first + c) * H, H) + bias[first + c];
                        m = std::max(m, z[c]);
                    }
                    float sum = 0.0f;
                    for (int64_t c = 0; c < S; ++c) sum += std::exp(z[c] - m);
                    const float log_sum = std::log(sum), base = glogp[q * B + j];
                    for (int64_t c = 0; c < S; ++c) {
                        top.push(base + ((z[c] - m) - log_sum), static_cast<int32_t>(first + c));
                    }
                }
                write_top(top, q, k, out_ids, out_logp, -INFINITY);
            }
        });
    }
    return py::make_tuple(ids_o, logp_o);
}

}  // namespace jaxidx
