// The cohort's reduction: the weighted mean of the clients' sparse updates, row by row, and the
// server's SGD step fused into it. No Python here.
//
// Order: each row sums its clients' contributions in cohort order, in float64, starting from the
// first contribution and rounding each step as "acc += w * x" (no fused multiply-add). Threads
// only split the set of rows, so results are bit-identical for any thread count; and any
// process that holds the clients' updates in cohort order (reduce_updates: Ray, Flower, the
// functional API) reproduces the fused round exactly.
#pragma once

#include <cstdint>
#include <vector>

#include "fedrecon/codec.hpp"
#include "fedrecon/types.hpp"

namespace fedrecon {

/// One client's update as the reduction reads it: its touched rows (distinct, any order) and,
/// for touched row e, either materialised values (values + e * dim) or, with values == nullptr,
/// the scalar form of a client update with u frozen (ClientWorker::update_compact):
///   x_e = g[e] * v_row + beta[e] * u      (materialize_row; v_row: the model's row before the step)
struct UpdateRef {
  const std::int32_t* rows = nullptr;
  std::int64_t nrows = 0;
  const float* values = nullptr;  // nrows x dim, or nullptr: the scalar form
  const float* beta = nullptr;    // scalar form: nrows
  const float* gamma = nullptr;   // scalar form: nrows g's, or nullptr when every g is 0
  const float* user = nullptr;    // scalar form: u (dim)
  const float* bias = nullptr;    // item-bias deltas (nrows), nullptr for a model without biases
  double weight = 0.0;            // > 0: the client reports
  const EncodedUpdate* enc = nullptr;  // a dense quantized update: untouched rows decode to noise
  // Optional: the rows already bucketed by reduction chunk (ReduceChunks for the same
  // num_threads), chunk c holding rows[chunk_start[c]:chunk_start[c+1]]. Lets each chunk take
  // its entries without scanning every client's rows.
  const std::int32_t* chunk_start = nullptr;
};

/// How the reduction splits the model's rows among threads: chunk c holds rows
/// [c * rows_per_chunk, min((c + 1) * rows_per_chunk, num_items)). Several chunks per thread
/// balance the work; one chunk on one thread.
struct ReduceChunks {
  std::int64_t count = 1;
  std::int64_t rows_per_chunk = 1;
  ReduceChunks(std::int64_t num_items, int num_threads);
  /// The chunk of a row in [0, num_items) (rows are int32). The clients bucket every row they
  /// touch by it: a 64-bit idiv per row was 6% of a 2-thread round (perf), so it divides by
  /// multiplying (Lemire, Kaser & Kurz 2019: floor(n / d) = (M * n) >> 64 with
  /// M = floor((2^64 - 1) / d) + 1, exact for all 32-bit n and d).
  std::int64_t of(std::int32_t row) const {
#if defined(__SIZEOF_INT128__)
    if (magic_ == 0) return row;  // d = 1
    return static_cast<std::int64_t>((static_cast<unsigned __int128>(magic_) * static_cast<std::uint32_t>(row)) >> 64);
#else
    return row / rows_per_chunk;
#endif
  }

 private:
  std::uint64_t magic_ = 0;
};

/// A scalar-form row: out = g * v + beta * u in float32 (each product rounded, then the sum; just
/// beta * u when g is 0). The one definition every path shares, so a fused round, the rows
/// client_updates returns, and a quantizing codec all see the same floats.
void materialize_row(float g, float beta, const float* v, const float* u, int dim, float* out);

/// Server SGD applied by the reduction instead of writing a dense delta: V[r] += lr * mean[r]
/// (and the item biases) for every row the round reduced, on the thread that reduced it, in
/// the float32 arithmetic of optimizers.SGD on the delta (reduce.cpp, step_columns). Untouched rows are
/// neither read nor written. The pointers are the model's own arrays (ModelView's memory).
/// With `velocity`, server SGD with momentum instead (optimizers.MomentumSGD, Keras convention:
/// vel = momentum * vel + lr * mean; V += vel, or with nesterov V += lr * mean + momentum * vel):
/// every row moves, so the untouched rows take the step with a zero mean, chunk by chunk.
struct InPlaceStep {
  float* item_factors = nullptr;  // nullptr: no step, write delta_out
  float* item_bias = nullptr;     // with a biased model
  float lr = 1.0f;
  float* velocity = nullptr;       // num_items rows of the model's stride, or nullptr: plain SGD
  float* velocity_bias = nullptr;  // num_items, with velocity and a biased model
  float momentum = 0.0f;           // in [0, 1)
  bool nesterov = false;
};

struct ReduceResult {
  std::int64_t rows_aggregated = 0;  // distinct rows the reporting clients touched
  std::int64_t nonfinite_rows = 0;   // with an InPlaceStep: rows it left non-finite
};

/// Writes delta_out (num_items x dim) = sum_i w_i x_i / total_weight over the reporting clients
/// (0 for untouched rows, all 0 when nobody reports) and delta_bias_out (num_items; with
/// biases), or with step.item_factors set applies the mean to the model in place instead.
/// `model` gives the shape, has_bias() and, for scalar-form updates, the rows v.
ReduceResult reduce_mean(const ModelView& model, const std::vector<UpdateRef>& updates,
                         double total_weight, int num_threads, float* delta_out,
                         float* delta_bias_out, const InPlaceStep& step = InPlaceStep());

}  // namespace fedrecon
