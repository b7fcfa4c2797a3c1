// The exact distance scan shared by rerank_topk and merge_rerank_topk (defined in rerank.cpp).
#pragma once

#include "kernels.h"

namespace jaxidx {

enum Metric { kIP = 0, kCosine = 1, kL2 = 2 };

// "ip", "cosine" or "l2" as a Metric; anything else raises ValueError naming `metric`.
int require_metric(const py::object& metric);

// The distance of q to x (d floats each) for kIP or kL2, reduced in the canonical lane order as every scan
// (reference.distances): one vector pair, for terms such as a query's distance to a leaf centre.
float exact_distance(int metric, const float* q, const float* x, int64_t d);

// Distances from a zero-padded query (its norm for cosine) to base rows given by id, into a TopK.
using ScanFn = void (*)(const float* qpad, float qnorm, const float* base, int64_t d, const int32_t* ids, int64_t n,
                        TopK& top);

// One query's distances to base rows given by id, pushed into a TopK (AVX2 when the CPU has it); keeps the
// zero-padded copy of the query that the SIMD scan reads. One per thread.
class IdScanner {
  public:
    IdScanner(int metric, int64_t d);
    void scan(const float* q, const float* base, const int32_t* ids, int64_t n, TopK& top);

  private:
    int metric_;
    int64_t d_;
    ScanFn scan_;  // picked for the metric and the CPU
    std::vector<float> qpad_;
};

}  // namespace jaxidx
