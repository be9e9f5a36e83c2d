#include "fedrecon/aggregate.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "fedrecon/cache.hpp"
#include "fedrecon/finite.hpp"
#include "fedrecon/parallel.hpp"
#include "fedrecon/privacy.hpp"

#include "fedrecon/strict_fp.hpp"

namespace fedrecon {

namespace {

// Coordinates per parallel task: a float64 block (128 KiB) stays in L2 while every client's
// slice streams through it once.
constexpr std::int64_t kBlock = 1 << 14;

// How many entries a sparse sum requests ahead of the one it adds.
constexpr std::size_t kPrefetchEntries = 8;

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// How a contribution enters a sum. Batch and streaming paths both use it (or axpy_n, which
// performs the same operations), so each coordinate sees the same float64 roundings in the
// same order; the loop only vectorises across independent coordinates.
inline void axpy(double c, const float* x, double* acc, std::int64_t n) {
  for (std::int64_t j = 0; j < n; ++j) acc[j] += c * static_cast<double>(x[j]);
}

// N clients at once: each coordinate still receives ((acc + c0 x0) + c1 x1) + ..., the same
// float64 operations in the same order as N axpy calls, but acc is loaded and stored once
// (twice as fast as axpy per client on a 100-client batch).
template <std::size_t N>
inline void axpy_n(const double* c, const float* const* x, std::int64_t lo, double* acc, std::int64_t n) {
  const float* xs[N];
  for (std::size_t k = 0; k < N; ++k) xs[k] = x[k] + lo;
  for (std::int64_t j = 0; j < n; ++j) {
    double a = acc[j];
    for (std::size_t k = 0; k < N; ++k) a += c[k] * static_cast<double>(xs[k][j]);
    acc[j] = a;
  }
}

// out[j] = (sum[j] + noise_{g0+j}) * scale for j < n; sum == nullptr stands for zeros.
// `scratch` holds at least kBlock doubles (noise is added there, never to `sum`).
template <class Out>
void finish(const double* sum, std::int64_t g0, std::int64_t n, const Finalize& f, Out* out,
            double* scratch) {
  if (f.noise_std <= 0.0) {
    if (sum == nullptr) {
      std::fill_n(out, n, Out(0));
    } else {
      for (std::int64_t j = 0; j < n; ++j) out[j] = static_cast<Out>(sum[j] * f.scale);
    }
    return;
  }
  for (std::int64_t lo = 0; lo < n; lo += kBlock) {
    const std::int64_t len = std::min(kBlock, n - lo);
    if (sum == nullptr) {
      std::fill_n(scratch, len, 0.0);
    } else if (sum + lo != scratch) {
      std::copy_n(sum + lo, len, scratch);
    }
    add_gaussian_noise(f.noise_key, f.noise_std, g0 + lo, len, scratch);
    for (std::int64_t j = 0; j < len; ++j) out[lo + j] = static_cast<Out>(scratch[j] * f.scale);
  }
}

void check_finalize(const Finalize& f) {
  if (!std::isfinite(f.scale)) fail("the scale of the sum must be finite");
  if (!std::isfinite(f.noise_std) || f.noise_std < 0.0) fail("noise_std must be finite and >= 0");
}

void check_coefs(const double* coefs, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    if (!std::isfinite(coefs[i])) fail("weights must be finite");
}

// Rows [r0, r1) of a (rows x dim) table, each either held (row_sum(r) != nullptr) or zero;
// row r goes to dst + (r - r0) * dim. Consecutive zero rows are finished as one run, so a
// mostly untouched table is written at memset speed.
template <class Out, class RowSum>
void finish_rows(std::int64_t r0, std::int64_t r1, std::int64_t dim, const Finalize& f, Out* dst,
                 double* scratch, RowSum&& row_sum) {
  std::int64_t r = r0;
  while (r < r1) {
    const double* s = row_sum(r, scratch);
    if (s != nullptr) {
      finish(s, r * dim, dim, f, dst + (r - r0) * dim, scratch);
      ++r;
      continue;
    }
    std::int64_t end = r + 1;
    while (end < r1 && row_sum.is_empty(end)) ++end;
    finish<Out>(nullptr, r * dim, (end - r) * dim, f, dst + (r - r0) * dim, scratch);
    r = end;
  }
}

// Where the parallel row blocks of a row-sparse sum's output table are written. Held rows and
// runs of zero rows alternate there, short scattered writes that read every line in first
// (read-for-ownership). So a table past the cache (kStreamBytes) is built block by block in the
// thread's L2-sized buffer and streamed out with non-temporal stores; a smaller one is written
// in place, where its reader will find it cached. (Dense blocks are written in one sequential
// sweep, which the hardware already handles: staging them measured 0-10% slower.)
template <class Out>
class BlockOut {
 public:
  BlockOut(Out* out, std::int64_t size, std::int64_t block, int threads)
      : out_(out), block_(block),
        staging_(static_cast<std::size_t>(size) * sizeof(Out) >= kStreamBytes ? static_cast<std::size_t>(threads) : 0) {}

  // Where thread tid writes table elements [lo, lo + block).
  Out* begin(int tid, std::int64_t lo) {
    if (staging_.empty()) return out_ + lo;
    auto& staged = staging_[static_cast<std::size_t>(tid)];
    staged.resize(static_cast<std::size_t>(block_));
    return staged.data();
  }
  // The block's first len elements are written.
  void end(int tid, std::int64_t lo, std::int64_t len) {
    if (!staging_.empty())
      stream_copy(out_ + lo, staging_[static_cast<std::size_t>(tid)].data(), static_cast<std::size_t>(len) * sizeof(Out));
  }

 private:
  Out* out_;
  std::int64_t block_;
  std::vector<std::vector<Out>> staging_;
};

// Keys (row << 32 | entry) of `total` < 2^32 entries, sorted: an LSD radix sort on the row
// (three stable 11-bit passes; ids are < 2^31), entries staying in order within a row.
std::vector<std::uint64_t> sort_by_row(const std::int32_t* rows, std::int64_t total) {
  const auto n = static_cast<std::size_t>(total);
  std::vector<std::uint64_t> keys(n), tmp(n);
  for (std::size_t e = 0; e < n; ++e)
    keys[e] = (static_cast<std::uint64_t>(static_cast<std::uint32_t>(rows[e])) << 32) | e;
  for (int shift = 32; shift < 64; shift += 11) {
    std::size_t count[2049] = {};
    for (const auto key : keys) ++count[((key >> shift) & 2047u) + 1];
    for (std::size_t d = 0; d < 2048; ++d) count[d + 1] += count[d];
    for (const auto key : keys) tmp[count[(key >> shift) & 2047u]++] = key;
    keys.swap(tmp);
  }
  return keys;
}

// Row blocks sized to about kBlock coordinates.
inline std::int64_t rows_per_block(std::int64_t dim) { return std::max<std::int64_t>(1, kBlock / std::max<std::int64_t>(1, dim)); }

}  // namespace

double checked_weight_sum(const double* weights, std::int64_t n) {
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double w = weights[i];
    if (!std::isfinite(w) || w < 0.0)
      fail("weights must be finite and >= 0; weights[" + std::to_string(i) + "] = " + std::to_string(w));
    total += w;
  }
  if (!std::isfinite(total)) fail("weights must have a finite sum");
  return total;
}

void check_sparse_rows(const SparseRows& u, std::int64_t num_rows) {
  if (num_rows < 0 || num_rows > std::numeric_limits<std::int32_t>::max())
    fail("num_rows must lie in [0, 2^31)");
  if (u.dim < 0) fail("values must have dim >= 0 columns");
  if (u.num_clients < 0 || u.offsets == nullptr) fail("offsets must hold num_clients + 1 entries");
  if (u.offsets[0] != 0) fail("offsets must start at 0");
  for (std::int64_t i = 0; i < u.num_clients; ++i)
    if (u.offsets[i + 1] < u.offsets[i]) fail("offsets must be non-decreasing");
  const std::int64_t total = u.offsets[u.num_clients];
  for (std::int64_t e = 0; e < total; ++e) {
    const std::int32_t r = u.rows[e];
    if (r < 0 || r >= num_rows)
      fail("rows must lie in [0, " + std::to_string(num_rows) + "); rows[" + std::to_string(e) +
           "] = " + std::to_string(r));
  }
}

template <class Out>
void weighted_sum_dense(const float* const* updates, const double* coefs, std::int64_t n,
                        std::int64_t size, const Finalize& f, Out* out, int num_threads) {
  if (n < 0 || size < 0) fail("updates must have a non-negative shape");
  check_coefs(coefs, n);
  check_finalize(f);
  const std::int64_t num_blocks = (size + kBlock - 1) / kBlock;
  const int threads = resolve_threads(num_threads, num_blocks);
  std::vector<std::vector<double>> scratch(static_cast<std::size_t>(threads));
  parallel_for(num_blocks, threads, [&](std::int64_t b, int tid) {
    auto& acc = scratch[static_cast<std::size_t>(tid)];
    acc.resize(static_cast<std::size_t>(kBlock));
    const std::int64_t lo = b * kBlock, len = std::min(kBlock, size - lo);
    std::fill_n(acc.data(), len, 0.0);
    // Every coordinate adds its clients in order; the block split only decides who does it.
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8) axpy_n<8>(coefs + i, updates + i, lo, acc.data(), len);
    for (; i < n; ++i) axpy(coefs[i], updates[i] + lo, acc.data(), len);
    // A NaN or infinity in any input reaches the sum (0 * inf is NaN too), so checking the
    // block's sums costs nothing extra.
    if (!all_finite(acc.data(), len)) fail("updates must be finite (found NaN or infinity)");
    finish(acc.data(), lo, len, f, out + lo, acc.data());
  });
}

template <class Out>
void weighted_sum_sparse(const SparseRows& u, const double* coefs, std::int64_t num_rows,
                         const Finalize& f, Out* out, int num_threads) {
  check_sparse_rows(u, num_rows);
  check_coefs(coefs, u.num_clients);
  check_finalize(f);
  const std::int64_t K = u.dim;
  const std::int64_t total = u.offsets[u.num_clients];

  if (static_cast<std::uint64_t>(total) > 0xffffffffull) fail("rows must have fewer than 2^32 entries");

  // Entries sorted by (row, entry index); entry order is client order (and the client's own
  // order for a repeated row), so each row then sums its contributions in client order.
  // Memory and time are O(entries), not O(num_rows).
  const std::vector<std::uint64_t> keys = sort_by_row(u.rows, total);
  std::vector<double> entry_coef(static_cast<std::size_t>(total));
  for (std::int64_t i = 0; i < u.num_clients; ++i)
    std::fill(entry_coef.begin() + u.offsets[i], entry_coef.begin() + u.offsets[i + 1], coefs[i]);

  const std::int64_t rpb = rows_per_block(K);
  const std::int64_t num_blocks = (num_rows + rpb - 1) / rpb;
  const int threads = resolve_threads(num_threads, num_blocks);
  std::vector<std::vector<double>> scratch(static_cast<std::size_t>(threads));
  BlockOut<Out> blocks(out, num_rows * K, rpb * K, threads);
  parallel_for(num_blocks, threads, [&](std::int64_t b, int tid) {
    auto& acc = scratch[static_cast<std::size_t>(tid)];
    acc.resize(static_cast<std::size_t>(std::max(kBlock, K)));
    const std::int64_t r0 = b * rpb, r1 = std::min(num_rows, (b + 1) * rpb);
    Out* dst = blocks.begin(tid, r0 * K);  // row r goes to dst + (r - r0) * K
    std::int64_t r = r0;
    auto k = static_cast<std::size_t>(
        std::lower_bound(keys.begin(), keys.end(), static_cast<std::uint64_t>(r) << 32) - keys.begin());
    // Entries in row order sit at random places in `values`: request them ahead, or every
    // one waits for its own cache misses (most of the call's time without this).
    std::size_t prefetched = k;
    const auto prefetch_ahead = [&](std::size_t upto) {
      for (upto = std::min(upto, keys.size()); prefetched < upto; ++prefetched) {
        const auto e = static_cast<std::int64_t>(keys[prefetched] & 0xffffffffull);
        prefetch_bytes(u.values + e * K, static_cast<std::size_t>(K) * sizeof(float));
        prefetch_bytes(entry_coef.data() + e, sizeof(double));
      }
    };
    while (r < r1) {
      const std::int64_t next = k < keys.size() ? std::min(r1, static_cast<std::int64_t>(keys[k] >> 32)) : r1;
      if (next > r) {  // a run of rows nobody sent
        finish<Out>(nullptr, r * K, (next - r) * K, f, dst + (r - r0) * K, acc.data());
        r = next;
        continue;
      }
      std::fill_n(acc.data(), K, 0.0);
      for (; k < keys.size() && static_cast<std::int64_t>(keys[k] >> 32) == r; ++k) {
        prefetch_ahead(k + kPrefetchEntries);
        const auto e = static_cast<std::int64_t>(keys[k] & 0xffffffffull);
        axpy(entry_coef[static_cast<std::size_t>(e)], u.values + e * K, acc.data(), K);
      }
      if (!all_finite(acc.data(), K)) fail("values must be finite (found NaN or infinity)");
      finish(acc.data(), r * K, K, f, dst + (r - r0) * K, acc.data());
      ++r;
    }
    blocks.end(tid, r0 * K, (r1 - r0) * K);
  });
}

template <class Out>
double weighted_mean_dense(const float* const* updates, const double* weights, std::int64_t n,
                           std::int64_t size, Out* out, int num_threads) {
  const double total = checked_weight_sum(weights, n);
  if (!(total > 0.0) || !std::isfinite(1.0 / total)) fail("weights must have a positive (normal) sum");
  Finalize f;
  f.scale = 1.0 / total;
  weighted_sum_dense(updates, weights, n, size, f, out, num_threads);
  return total;
}

template <class Out>
double weighted_mean_sparse(const SparseRows& updates, const double* weights,
                            std::int64_t num_rows, Out* out, int num_threads) {
  const double total = checked_weight_sum(weights, updates.num_clients);
  if (!(total > 0.0) || !std::isfinite(1.0 / total)) fail("weights must have a positive (normal) sum");
  Finalize f;
  f.scale = 1.0 / total;
  weighted_sum_sparse(updates, weights, num_rows, f, out, num_threads);
  return total;
}

// ---------------------------------------------------------------------------------------------
// WeightedSum

WeightedSum::WeightedSum(std::int64_t num_rows, std::int64_t dim) : num_rows_(num_rows), dim_(dim) {
  if (num_rows < 0 || num_rows > std::numeric_limits<std::int32_t>::max())
    fail("num_rows must lie in [0, 2^31)");
  if (dim < 0) fail("dim must be >= 0");
  // num_rows * dim float64 values, and their byte count, must be representable.
  if (dim > 0 && num_rows > (std::numeric_limits<std::int64_t>::max() / 16) / dim)
    fail("num_rows * dim is too large (" + std::to_string(num_rows) + " x " + std::to_string(dim) + ")");
  chunk_rows_ = rows_per_block(dim);
}

std::int64_t WeightedSum::rows_held() const {
  return dense_ ? num_rows_ : static_cast<std::int64_t>(held_.size());
}

void WeightedSum::make_dense(int num_threads) {
  const std::int64_t size = num_rows_ * dim_;
  std::unique_ptr<double[]> full(new double[static_cast<std::size_t>(std::max<std::int64_t>(size, 1))]);
  // Zeroing in parallel also spreads the first-touch page faults over the threads.
  const std::int64_t num_blocks = (size + kBlock - 1) / kBlock;
  parallel_for(num_blocks, resolve_threads(num_threads, num_blocks), [&](std::int64_t b, int) {
    const std::int64_t lo = b * kBlock;
    std::fill_n(full.get() + lo, std::min(kBlock, size - lo), 0.0);
  });
  for (std::size_t s = 0; s < held_.size(); ++s)
    std::copy_n(held_row(static_cast<std::int64_t>(s)), dim_,
                full.get() + static_cast<std::int64_t>(held_[s]) * dim_);
  dense_sum_ = std::move(full);
  dense_ = true;
  std::vector<std::int32_t>().swap(slot_);
  std::vector<std::int32_t>().swap(held_);
  std::vector<std::unique_ptr<double[]>>().swap(chunks_);
}

const double* WeightedSum::row_sum(std::int64_t r) const {
  if (dense_) return dense_sum_.get() + r * dim_;
  if (slot_.empty() || slot_[static_cast<std::size_t>(r)] < 0) return nullptr;
  return held_row(slot_[static_cast<std::size_t>(r)]);
}

double* WeightedSum::held_row(std::int64_t s) const {
  return chunks_[static_cast<std::size_t>(s / chunk_rows_)].get() + (s % chunk_rows_) * dim_;
}

void WeightedSum::add_dense(const float* x, double coef, double weight, int num_threads) {
  if (!std::isfinite(coef) || !std::isfinite(weight) || weight < 0.0)
    fail("weight must be finite and >= 0");
  if (!std::isfinite(total_weight_ + weight)) fail("weight: the total weight overflows");
  const std::int64_t size = num_rows_ * dim_;
  const std::int64_t num_blocks = (size + kBlock - 1) / kBlock;
  const int threads = resolve_threads(num_threads, num_blocks);
  // Check everything before touching the sum, so that a rejected update leaves no trace.
  parallel_for(num_blocks, threads, [&](std::int64_t b, int) {
    const std::int64_t lo = b * kBlock;
    if (!all_finite(x + lo, std::min(kBlock, size - lo))) fail("update must be finite (found NaN or infinity)");
  });
  if (!dense_) make_dense(num_threads);
  double* sum = dense_sum_.get();
  parallel_for(num_blocks, threads, [&](std::int64_t b, int) {
    const std::int64_t lo = b * kBlock;
    axpy(coef, x + lo, sum + lo, std::min(kBlock, size - lo));
  });
  total_weight_ += weight;
  ++num_updates_;
}

void WeightedSum::add_sparse(const std::int32_t* rows, const float* values, std::int64_t n,
                             double coef, double weight) {
  if (!std::isfinite(coef) || !std::isfinite(weight) || weight < 0.0)
    fail("weight must be finite and >= 0");
  if (!std::isfinite(total_weight_ + weight)) fail("weight: the total weight overflows");
  if (n < 0) fail("rows must have a non-negative length");
  for (std::int64_t e = 0; e < n; ++e)
    if (rows[e] < 0 || rows[e] >= num_rows_)
      fail("rows must lie in [0, " + std::to_string(num_rows_) + "); rows[" + std::to_string(e) +
           "] = " + std::to_string(rows[e]));
  if (!all_finite(values, n * dim_)) fail("values must be finite (found NaN or infinity)");
  // A zero coefficient adds ±0 to sums that start at +0 and can never become -0, so skipping
  // it changes no bit (and keeps the rows of a zero-weight client out of the sparse storage).
  if (coef != 0.0) {
    if (!dense_ && slot_.empty()) slot_.assign(static_cast<std::size_t>(num_rows_), -1);
    for (std::int64_t e = 0; e < n; ++e) {
      const std::int64_t r = rows[e];
      double* dst;
      if (dense_) {
        dst = dense_sum_.get() + r * dim_;
      } else {
        std::int32_t& s = slot_[static_cast<std::size_t>(r)];
        if (s < 0) {
          s = static_cast<std::int32_t>(held_.size());
          held_.push_back(static_cast<std::int32_t>(r));
          // Chunks survive reset() for the next round; a row is zeroed when first touched.
          if (static_cast<std::size_t>(s / chunk_rows_) == chunks_.size())
            chunks_.emplace_back(new double[static_cast<std::size_t>(std::max<std::int64_t>(1, chunk_rows_ * dim_))]);
          std::fill_n(held_row(s), dim_, 0.0);
        }
        dst = held_row(s);
      }
      axpy(coef, values + e * dim_, dst, dim_);
    }
  }
  total_weight_ += weight;
  ++num_updates_;
}

template <class Out>
void WeightedSum::finalize(const Finalize& f, Out* out, int num_threads) const {
  check_finalize(f);
  if (dense_) {
    const std::int64_t size = num_rows_ * dim_;
    const std::int64_t num_blocks = (size + kBlock - 1) / kBlock;
    const int threads = resolve_threads(num_threads, num_blocks);
    std::vector<std::vector<double>> scratch(static_cast<std::size_t>(threads));
    parallel_for(num_blocks, threads, [&](std::int64_t b, int tid) {
      auto& buf = scratch[static_cast<std::size_t>(tid)];
      buf.resize(static_cast<std::size_t>(kBlock));
      const std::int64_t lo = b * kBlock;
      finish(dense_sum_.get() + lo, lo, std::min(kBlock, size - lo), f, out + lo, buf.data());
    });
    return;
  }
  struct Held {
    const WeightedSum& s;
    bool is_empty(std::int64_t r) const { return s.row_sum(r) == nullptr; }
    const double* operator()(std::int64_t r, double*) const { return s.row_sum(r); }
  };
  const Held sums{*this};
  const std::int64_t rpb = rows_per_block(dim_);
  const std::int64_t num_blocks = (num_rows_ + rpb - 1) / rpb;
  const int threads = resolve_threads(num_threads, num_blocks);
  std::vector<std::vector<double>> scratch(static_cast<std::size_t>(threads));
  BlockOut<Out> blocks(out, num_rows_ * dim_, rpb * dim_, threads);
  parallel_for(num_blocks, threads, [&](std::int64_t b, int tid) {
    auto& buf = scratch[static_cast<std::size_t>(tid)];
    buf.resize(static_cast<std::size_t>(std::max(kBlock, dim_)));
    const std::int64_t r0 = b * rpb, r1 = std::min(num_rows_, (b + 1) * rpb);
    finish_rows(r0, r1, dim_, f, blocks.begin(tid, r0 * dim_), buf.data(), sums);
    blocks.end(tid, r0 * dim_, (r1 - r0) * dim_);
  });
}

template <class Out>
void WeightedSum::mean(Out* out, int num_threads) const {
  if (!(total_weight_ > 0.0) || !std::isfinite(1.0 / total_weight_))
    fail("weights must have a positive sum: add an update with weight > 0 first");
  Finalize f;
  f.scale = 1.0 / total_weight_;
  finalize(f, out, num_threads);
}

void WeightedSum::reset() {
  // Sparse storage (slots and chunks) is kept for the next round: only the held rows are
  // released, so a reused accumulator costs O(rows touched), not O(num_rows).
  for (const std::int32_t r : held_) slot_[static_cast<std::size_t>(r)] = -1;
  held_.clear();
  dense_ = false;
  dense_sum_.reset();
  total_weight_ = 0.0;
  num_updates_ = 0;
}

#define FEDRECON_AGGREGATE_INSTANTIATE(Out)                                                       \
  template void weighted_sum_dense<Out>(const float* const*, const double*, std::int64_t,         \
                                        std::int64_t, const Finalize&, Out*, int);                \
  template void weighted_sum_sparse<Out>(const SparseRows&, const double*, std::int64_t,          \
                                         const Finalize&, Out*, int);                             \
  template double weighted_mean_dense<Out>(const float* const*, const double*, std::int64_t,      \
                                           std::int64_t, Out*, int);                              \
  template double weighted_mean_sparse<Out>(const SparseRows&, const double*, std::int64_t, Out*, \
                                            int);                                                 \
  template void WeightedSum::finalize<Out>(const Finalize&, Out*, int) const;                     \
  template void WeightedSum::mean<Out>(Out*, int) const;
FEDRECON_AGGREGATE_INSTANTIATE(float)
FEDRECON_AGGREGATE_INSTANTIATE(double)
#undef FEDRECON_AGGREGATE_INSTANTIATE

}  // namespace fedrecon
