// Weighted aggregation of many client updates (any model, not only FedRecon): the weighted
// mean sum_i w_i x_i / sum_i w_i and the weighted sum, accumulated in float64.
//
// Determinism: every output coordinate is the float64 sum of its contributions in client order
// (and, within a client that repeats a row, in the order of its entries), starting from +0.0,
// each step rounded as "acc += c * x" (product, then sum; no fused multiply-add).
// Threads only split the set of coordinates, never a sum, so results are bit-identical for any
// num_threads, and the streaming accumulator (WeightedSum, one client at a time) gives exactly
// the bits of the batch kernels for the same clients in the same order.
//
// Errors: std::invalid_argument only (shapes, weights, row ids, non-finite values); the
// message names the offending argument as the Python API spells it.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace fedrecon {

/// Sparse-row updates of many clients: client i sent rows[offsets[i] .. offsets[i+1]) (ids in
/// [0, num_rows)) with the matching rows of `values` (row-major, `dim` floats per row).
struct SparseRows {
  const std::int64_t* offsets = nullptr;  // num_clients + 1, non-decreasing, offsets[0] == 0
  const std::int32_t* rows = nullptr;     // offsets[num_clients]
  const float* values = nullptr;          // offsets[num_clients] x dim
  std::int64_t num_clients = 0;
  std::int64_t dim = 0;
};

/// How a float64 sum leaves the kernel: out = (sum + noise) * scale, noise_g ~ N(0, noise_std²)
/// for output coordinate g drawn from the counter-based stream `noise_key` (privacy.hpp).
/// scale is 1 / total weight for a mean, 1 for a sum, 1 / denominator for DP-FedAvg.
struct Finalize {
  double scale = 1.0;
  double noise_std = 0.0;  // 0: no noise
  std::uint64_t noise_key = 0;
};

/// Checks weights (finite, >= 0) and returns their float64 sum in order.
/// Throws std::invalid_argument naming `weights`.
double checked_weight_sum(const double* weights, std::int64_t n);

/// Dense batch: out[j] = (sum_i coefs[i] * updates[i][j] + noise_j) * f.scale for j < size.
/// `updates` holds n pointers to `size` floats each (a stack or separate arrays); coefs are
/// finite. Parallel over blocks of coordinates. Throws std::invalid_argument naming `updates`
/// if a value is NaN or infinite. Out is float or double.
template <class Out>
void weighted_sum_dense(const float* const* updates, const double* coefs, std::int64_t n,
                        std::int64_t size, const Finalize& f, Out* out, int num_threads);

/// Sparse batch into a (num_rows x dim) table: row r of out is
/// (sum over entries e of client i with rows[e] == r of coefs[i] * values[e] + noise) * scale,
/// and (0 + noise) * scale for a row nobody sent. Entries are sorted by row (stable radix sort,
/// O(entries) memory, fewer than 2^32 entries), then blocks of rows are reduced in parallel,
/// each row in client order. Throws std::invalid_argument naming `offsets`, `rows` or `values`.
template <class Out>
void weighted_sum_sparse(const SparseRows& updates, const double* coefs, std::int64_t num_rows,
                         const Finalize& f, Out* out, int num_threads);

/// Weighted mean, dense batch: out = Σ_i w_i x_i / Σ_i w_i (weighted_sum_dense with coefs = w
/// and scale = 1 / Σ w). Returns Σ w_i. Throws std::invalid_argument naming `weights` for a
/// negative or non-finite weight or a zero total.
template <class Out>
double weighted_mean_dense(const float* const* updates, const double* weights, std::int64_t n,
                           std::int64_t size, Out* out, int num_threads);

/// Weighted mean, sparse batch into a (num_rows x dim) table (0 on rows nobody sent).
template <class Out>
double weighted_mean_sparse(const SparseRows& updates, const double* weights,
                            std::int64_t num_rows, Out* out, int num_threads);

/// Checks a SparseRows view (offsets monotone from 0, row ids in [0, num_rows)).
void check_sparse_rows(const SparseRows& updates, std::int64_t num_rows);


/// Streaming accumulator of a (num_rows x dim) table: sum += coef * update, total_weight +=
/// weight, one client at a time, in float64.
///
/// Storage is row-sparse until the first dense update: only rows that sparse updates touched
/// are held (a slot per row), so a 1M-row table that clients touch sparsely costs memory in
/// proportion to the touched rows. A dense update switches to a full float64 table once.
/// An update with a NaN or infinite value is rejected before anything is changed.
/// Not thread-safe: one add/finalize at a time per object (each call may use num_threads).
class WeightedSum {
 public:
  WeightedSum(std::int64_t num_rows, std::int64_t dim);

  /// sum += coef * x (num_rows * dim floats). Parallel over blocks of coordinates.
  void add_dense(const float* x, double coef, double weight, int num_threads);
  /// sum[rows[e]] += coef * values[e] for e < n, in order (a repeated row adds twice).
  void add_sparse(const std::int32_t* rows, const float* values, std::int64_t n, double coef,
                  double weight);
  /// out (num_rows * dim) = (sum + noise) * f.scale; untouched rows give (0 + noise) * scale.
  template <class Out>
  void finalize(const Finalize& f, Out* out, int num_threads) const;
  /// out = sum / total_weight. Throws std::invalid_argument naming `weights` if the total
  /// weight is 0 (no update with a positive weight yet).
  template <class Out>
  void mean(Out* out, int num_threads) const;
  /// Forget every update (keeps the shape, and the sparse storage for reuse).
  void reset();

  std::int64_t num_rows() const { return num_rows_; }
  std::int64_t dim() const { return dim_; }
  std::int64_t num_updates() const { return num_updates_; }
  double total_weight() const { return total_weight_; }
  bool is_dense() const { return dense_; }
  /// Rows that hold a sum (all rows once dense).
  std::int64_t rows_held() const;

 private:
  void make_dense(int num_threads);
  const double* row_sum(std::int64_t r) const;
  double* held_row(std::int64_t s) const;

  std::int64_t num_rows_;
  std::int64_t dim_;
  bool dense_ = false;
  std::vector<std::int32_t> slot_;   // sparse mode: row -> index into held_, -1 if untouched
  std::vector<std::int32_t> held_;   // sparse mode: rows in first-touch order
  // Sparse mode: the sums of held_[s] live in chunk s / chunk_rows_ (fixed-size blocks, so
  // growing never copies or re-faults what is already held).
  std::vector<std::unique_ptr<double[]>> chunks_;
  std::int64_t chunk_rows_ = 1;
  std::unique_ptr<double[]> dense_sum_;  // dense mode: num_rows x dim (filled in parallel)
  double total_weight_ = 0.0;
  std::int64_t num_updates_ = 0;
};

#define FEDRECON_AGGREGATE_EXTERN(Out)                                                          \
  extern template void weighted_sum_dense<Out>(const float* const*, const double*, std::int64_t,  \
                                               std::int64_t, const Finalize&, Out*, int);         \
  extern template void weighted_sum_sparse<Out>(const SparseRows&, const double*, std::int64_t,   \
                                                const Finalize&, Out*, int);                      \
  extern template double weighted_mean_dense<Out>(const float* const*, const double*,             \
                                                  std::int64_t, std::int64_t, Out*, int);         \
  extern template double weighted_mean_sparse<Out>(const SparseRows&, const double*,              \
                                                   std::int64_t, Out*, int);                      \
  extern template void WeightedSum::finalize<Out>(const Finalize&, Out*, int) const;              \
  extern template void WeightedSum::mean<Out>(Out*, int) const;
FEDRECON_AGGREGATE_EXTERN(float)
FEDRECON_AGGREGATE_EXTERN(double)
#undef FEDRECON_AGGREGATE_EXTERN

}  // namespace fedrecon
