#include "fedrecon/strict_fp.hpp"  // first: the float64 sums are exact sequences of roundings

#include "fedrecon/reduce.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>

#include "fedrecon/cache.hpp"
#include "fedrecon/client.hpp"
#include "fedrecon/finite.hpp"
#include "fedrecon/parallel.hpp"

namespace fedrecon {

void materialize_row(float g, float beta, const float* v, const float* u, int dim, float* out) {
  if (g == 0.0f) {
    for (int k = 0; k < dim; ++k) out[k] = beta * u[k];
  } else {
    for (int k = 0; k < dim; ++k) out[k] = g * v[k] + beta * u[k];
  }
}

ReduceChunks::ReduceChunks(std::int64_t num_items, int num_threads) {
  const int threads = resolve_threads(num_threads, std::max<std::int64_t>(1, num_items / 64));
  count = threads > 1 ? std::min<std::int64_t>(2 * threads, std::max<std::int64_t>(num_items, 1)) : 1;
  rows_per_chunk = std::max<std::int64_t>(1, (num_items + count - 1) / count);
  // 0 for d = 1 (M would be 2^64); for d >= 2^32 every int32 row gives 0, as it should.
  magic_ = rows_per_chunk == 1 ? 0 : ~std::uint64_t{0} / static_cast<std::uint64_t>(rows_per_chunk) + 1;
}

namespace {

// Server SGD on columns [0, n) of a row from their float64 sums: v[k] += float32(mean[k] * lr)
// with the float32 mean = float32(sum[k] * inv_total), the roundings of NumPy's
// `p += mean * float32(lr)` (optimizers.SGD) on the delta (this file is compiled without FMA
// contraction). Returns non-zero if a result is non-finite: all exponent bits set, a test
// that vectorises when OR-ed (a float probe sum, a serial dependency chain, would not).
inline std::uint32_t step_columns(float* v, const double* sum, std::int64_t n, double inv_total, float lr) {
  std::uint32_t bad = 0;
  for (std::int64_t k = 0; k < n; ++k) {
    const float mean = static_cast<float>(sum[k] * inv_total);
    const float x = v[k] + mean * lr;
    v[k] = x;
    bad |= nonfinite_bit(x);
  }
  return bad;
}

// Server SGD with momentum on n consecutive floats, columns of a row or a run of whole rows
// (optimizers.MomentumSGD's float32 roundings, in its order: lr_d = mean * lr; vel = vel *
// momentum; vel += lr_d; then p += vel, or with nesterov p += lr_d; p += vel * momentum).
// kZeroMean: rows nobody touched, whose mean is 0 (lr_d = 0 * lr, kept as arithmetic: -0 + 0 is
// +0, as in NumPy). Returns non-zero if a result is non-finite, as step_columns.
template <bool kNesterov, bool kZeroMean>
inline std::uint32_t momentum_loop(float* p, float* vel, const double* sum, std::int64_t n, double inv_total,
                                   float lr, float momentum) {
  std::uint32_t bad = 0;
  const float zero_step = 0.0f * lr;
  for (std::int64_t k = 0; k < n; ++k) {
    const float lr_d = kZeroMean ? zero_step : static_cast<float>(sum[k] * inv_total) * lr;
    float v = vel[k] * momentum;
    v = v + lr_d;
    vel[k] = v;
    float x;
    if (kNesterov) {
      x = p[k] + lr_d;
      x = x + v * momentum;
    } else {
      x = p[k] + v;
    }
    p[k] = x;
    bad |= nonfinite_bit(x);
  }
  return bad;
}

inline std::uint32_t momentum_columns(float* p, float* vel, const double* sum, std::int64_t n, double inv_total,
                                      const InPlaceStep& step) {
  const float lr = step.lr, m = step.momentum;
  if (step.nesterov)
    return sum == nullptr ? momentum_loop<true, true>(p, vel, sum, n, inv_total, lr, m)
                          : momentum_loop<true, false>(p, vel, sum, n, inv_total, lr, m);
  return sum == nullptr ? momentum_loop<false, true>(p, vel, sum, n, inv_total, lr, m)
                        : momentum_loop<false, false>(p, vel, sum, n, inv_total, lr, m);
}

// One client's contribution to one row, in a chunk's index: the client's cohort position, the
// row of its update (-1: the quantization noise of a row it did not touch) and, for the scalar
// form, its numbers (copied while indexing, so the sums read them in order).
struct Entry {
  std::uint32_t pos;
  std::int32_t local;
  float beta, gamma, bias;
};

// What the whole call shares: the reporting clients in cohort order and, for the scalar form,
// each client's weight and u by cohort position (u copied with a stride P padded to whole
// blocks of 8 with zeros, so the sums run on whole vectors).
struct Cohort {
  std::vector<std::uint32_t> reporting;
  bool scalar = false;     // the updates are in scalar form
  bool gamma = false;      // ... with L2 (some g may be non-zero)
  bool any_noisy = false;  // a dense quantized update: every row gets noise
  std::int64_t P = 0;
  std::vector<double> weights;
  std::vector<float> U;

  Cohort(const std::vector<UpdateRef>& updates, int dim) {
    if (updates.size() >= (std::size_t{1} << 32)) throw std::invalid_argument("too many clients (2^32 or more)");
    for (std::size_t i = 0; i < updates.size(); ++i) {
      const UpdateRef& u = updates[i];
      if (u.weight <= 0.0) continue;
      if (reporting.empty()) scalar = u.values == nullptr;
      if (scalar != (u.values == nullptr)) throw std::invalid_argument("updates mix rows and the scalar form");
      gamma = gamma || u.gamma != nullptr;
      any_noisy = any_noisy || (u.enc != nullptr && u.enc->noisy_zeros);
      reporting.push_back(static_cast<std::uint32_t>(i));
    }
    P = scalar ? padded_dim(dim) : dim;
    if (!scalar) return;
    weights.assign(updates.size(), 0.0);
    U.assign(updates.size() * static_cast<std::size_t>(P), 0.0f);
    for (const std::uint32_t i : reporting) {
      weights[i] = updates[i].weight;
      std::copy_n(updates[i].user, dim, U.data() + i * static_cast<std::size_t>(P));
    }
  }
};

// The entries of rows [lo, hi), grouped by row (a counting sort over the chunk's rows), each
// row's clients in cohort order: row lo + r has entries[start[r]:start[r+1]]. Built by the
// thread that reduces the chunk, so no index is built serially; its buffers live per thread.
struct ChunkIndex {
  std::vector<std::int64_t> start;
  UninitVector<Entry> entries;
  UninitVector<std::int64_t> touched;  // the rows with entries, ascending

  // The entries of chunk c (rows [lo, hi)), from each reporting client in cohort order: its
  // bucket for the chunk when the client bucketed its rows, else a scan of all of them.
  template <class F>
  static void each_entry(const Cohort& cohort, const std::vector<UpdateRef>& updates, std::int64_t c,
                         std::int64_t lo, std::int64_t hi, const F& f) {
    for (const std::uint32_t i : cohort.reporting) {
      const UpdateRef& u = updates[i];
      if (u.chunk_start != nullptr) {
        for (std::int64_t l = u.chunk_start[c]; l < u.chunk_start[c + 1]; ++l) f(u, i, l);
      } else {
        for (std::int64_t l = 0; l < u.nrows; ++l)
          if (u.rows[l] >= lo && u.rows[l] < hi) f(u, i, l);
      }
    }
  }

  void build(const Cohort& cohort, const std::vector<UpdateRef>& updates, std::int64_t c, std::int64_t lo,
             std::int64_t hi) {
    start.assign(static_cast<std::size_t>(hi - lo) + 1, 0);
    each_entry(cohort, updates, c, lo, hi, [&](const UpdateRef& u, std::uint32_t, std::int64_t l) {
      ++start[static_cast<std::size_t>(u.rows[l] - lo) + 1];
    });
    // Branch-free, the running sum in a register: a push_back per touched row and the sum
    // carried through memory made this pass a third of the index's time.
    touched.resize(static_cast<std::size_t>(hi - lo));
    std::size_t num_touched = 0;
    std::int64_t sum = 0;
    for (std::size_t r = 1; r < start.size(); ++r) {
      const std::int64_t count = start[r];
      touched[num_touched] = lo + static_cast<std::int64_t>(r) - 1;
      num_touched += count > 0 ? 1 : 0;
      sum += count;
      start[r] = sum;
    }
    touched.resize(num_touched);
    entries.resize(static_cast<std::size_t>(start.back()));
    each_entry(cohort, updates, c, lo, hi, [&](const UpdateRef& u, std::uint32_t i, std::int64_t l) {
      Entry& e = entries[static_cast<std::size_t>(start[static_cast<std::size_t>(u.rows[l] - lo)]++)];
      e.pos = i;
      e.local = static_cast<std::int32_t>(l);
      if (cohort.scalar) {
        e.beta = u.beta[l];
        e.gamma = u.gamma != nullptr ? u.gamma[l] : 0.0f;
        e.bias = u.bias != nullptr ? u.bias[l] : 0.0f;
      }
    });
    // The placement advanced each start to the next row's: shift back.
    for (std::size_t r = start.size() - 1; r > 0; --r) start[r] = start[r - 1];
    start[0] = 0;
  }
};

// The scalar form without L2 (x = beta * u, materialize_row's arithmetic): the sum over the
// entries e[0:n) of w * x[kb:kb+B), held in registers across the run (B doubles: a few
// vector registers) and handed to the sink for columns [kb, min(kb + B, K)), which finishes
// it there (an in-place step, or the mean) without a store and reload of the sums.
template <int B, class Sink>
inline std::uint32_t scalar_block(const Entry* e, std::size_t n, const Cohort& cohort, std::int64_t kb,
                                  std::int64_t K, std::int64_t row, const Sink& sink) {
  double acc[B];
  for (std::size_t i = 0; i < n; ++i) {
    const float beta = e[i].beta;
    const double w = cohort.weights[e[i].pos];
    const float* u = cohort.U.data() + static_cast<std::int64_t>(e[i].pos) * cohort.P + kb;
    if (i == 0) {
#pragma GCC unroll 64
      for (int j = 0; j < B; ++j) acc[j] = w * static_cast<double>(beta * u[j]);
    } else {
#pragma GCC unroll 64
      for (int j = 0; j < B; ++j) acc[j] += w * static_cast<double>(beta * u[j]);
    }
  }
  return kb < K ? sink.block(row, kb, acc, std::min<std::int64_t>(B, K - kb)) : 0;
}

// Accumulators the target's vector registers hold at once (8 registers' worth: the others
// keep the operands): one pass over a row's entries covers this many doubles.
#if defined(__AVX512F__)
constexpr int kRegisterDoubles = 64;
#elif defined(__AVX__)
constexpr int kRegisterDoubles = 32;
#else
constexpr int kRegisterDoubles = 16;
#endif

// The row's P doubles in as few passes over its entries as the registers allow.
template <int Rem, class Sink>
inline std::uint32_t scalar_blocks(const Entry* e, std::size_t n, const Cohort& cohort, std::int64_t kb,
                                   std::int64_t K, std::int64_t row, const Sink& sink) {
  if constexpr (Rem > 0) {
    constexpr int W = Rem < kRegisterDoubles ? Rem : kRegisterDoubles;
    return scalar_block<W>(e, n, cohort, kb, K, row, sink) |
           scalar_blocks<Rem - W>(e, n, cohort, kb + W, K, row, sink);
  } else {
    return 0;
  }
}

// scalar_blocks<P> for the padded size P (a multiple of 8) known at run time.
template <int P = 8, class Sink>
inline std::uint32_t scalar_sum(const Entry* e, std::size_t n, const Cohort& cohort, std::int64_t K,
                                std::int64_t row, const Sink& sink) {
  if constexpr (P > 128) {
    std::uint32_t bad = 0;  // wide rows: blocks of 16 with a tail of 8
    std::int64_t kb = 0;
    for (; kb + 16 <= cohort.P; kb += 16) bad |= scalar_block<16>(e, n, cohort, kb, K, row, sink);
    if (kb < cohort.P) bad |= scalar_block<8>(e, n, cohort, kb, K, row, sink);
    return bad;
  } else {
    if (cohort.P == P) return scalar_blocks<P>(e, n, cohort, 0, K, row, sink);
    return scalar_sum<P + 8>(e, n, cohort, K, row, sink);
  }
}

// Per-thread buffers of the reduction, kept across calls (pool threads live on).
struct ReduceScratch {
  ChunkIndex index;
  std::vector<Entry> contrib;
  std::vector<double> acc;
  std::vector<float> row;
  CodecScratch codec;
};
ReduceScratch& reduce_scratch() {
  static thread_local ReduceScratch s;
  return s;
}

// How many update rows the reduction requests ahead of the one it sums.
constexpr std::size_t kPrefetchEntries = 16;

// Reduces every touched row (with noise: every row) of the cohort: the sink gets the
// un-normalised float64 weighted sums, each row's clients summed in cohort order (the first
// contribution assigns), as sink.block(row, kb, sums, n) for columns [kb, kb + n) (one or more
// blocks per row, returning non-zero when it left a non-finite value) and then
// sink.row_done(row, bias_sum, bad) with the blocks' results OR-ed. Parallel over chunks of
// consecutive rows, each indexed by the thread that reduces it; gap(lo, hi) gets each run of
// rows [lo, hi) the sink skipped, so a dense output writes every row once. A row's scalar-form
// contributions read the model's row, so the sink may overwrite that row (and only that row).
// Returns the number of touched rows.
template <class Gap, class Sink>
std::int64_t reduce_rows(const std::vector<UpdateRef>& updates, const ModelView& model, int num_threads,
                         const Gap& gap, const Sink& sink) {
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  const Cohort cohort(updates, model.dim);
  const std::int64_t P = cohort.P;
  const ReduceChunks chunks(model.num_items, num_threads);
  const int threads = resolve_threads(num_threads, chunks.count);
  std::atomic<std::int64_t> touched{0};
  parallel_for(chunks.count, threads, [&](std::int64_t chunk, int) {
    const std::int64_t lo = std::min(model.num_items, chunk * chunks.rows_per_chunk);
    const std::int64_t hi = std::min(model.num_items, lo + chunks.rows_per_chunk);
    ReduceScratch& sc = reduce_scratch();
    sc.index.build(cohort, updates, chunk, lo, hi);
    const std::vector<std::int64_t>& start = sc.index.start;
    const Entry* entries = sc.index.entries.data();
    sc.acc.resize(static_cast<std::size_t>(P));
    sc.row.resize(static_cast<std::size_t>(K));
    float* row_buf = sc.row.data();
    double* acc = sc.acc.data();
    std::int64_t current_row = 0;
    // acc (+)= w * x in float64 for one row x of float32.
    const auto accumulate = [K](const float* x, double w, double* a, bool first) {
      if (first) {
        for (std::int64_t k = 0; k < K; ++k) a[k] = w * static_cast<double>(x[k]);
      } else {
        for (std::int64_t k = 0; k < K; ++k) a[k] += w * static_cast<double>(x[k]);
      }
    };
    // The sums of a row's contributions e[0:n) in cohort order: materialised rows or noise ...
    const auto sum_rows = [&](const Entry* e, std::size_t n, double& acc_bias) {
      for (std::size_t i = 0; i < n; ++i) {
        const UpdateRef& u = updates[e[i].pos];
        const float* x = row_buf;
        double bs = 0.0;
        if (e[i].local < 0) {
          decode_untouched_row(*u.enc, current_row, model.dim, row_buf, sc.codec);
        } else {
          x = u.values + static_cast<std::int64_t>(e[i].local) * K;
          if (bias) bs = u.weight * u.bias[e[i].local];
        }
        accumulate(x, u.weight, acc, i == 0);
        acc_bias = i == 0 ? bs : acc_bias + bs;
      }
    };
    // ... or the scalar form. Returns the sink's verdict on the row's blocks.
    const auto sum_scalar = [&](const Entry* e, std::size_t n, double& acc_bias) -> std::uint32_t {
      std::uint32_t bad = 0;
      if (!cohort.gamma) {
        bad = scalar_sum(e, n, cohort, K, current_row, sink);
      } else {
        // With L2: x = g * v + beta * u, materialize_row's arithmetic, one contribution at a time.
        const float* v = model.row(current_row);
        for (std::size_t i = 0; i < n; ++i) {
          const float* u = cohort.U.data() + static_cast<std::int64_t>(e[i].pos) * P;
          if (e[i].gamma == 0.0f) {
            for (std::int64_t k = 0; k < K; ++k) row_buf[k] = e[i].beta * u[k];
          } else {
            for (std::int64_t k = 0; k < K; ++k) row_buf[k] = e[i].gamma * v[k] + e[i].beta * u[k];
          }
          accumulate(row_buf, cohort.weights[e[i].pos], acc, i == 0);
        }
        bad = sink.block(current_row, 0, acc, K);
      }
      double bs = 0.0;
      for (std::size_t i = 0; i < n && bias; ++i) {
        const double b = cohort.weights[e[i].pos] * e[i].bias;
        bs = i == 0 ? b : bs + b;
      }
      acc_bias = bs;
      return bad;
    };
    // Row order reads materialised updates at scattered places, one update row per entry:
    // without prefetching, every entry waited for its own cache misses.
    std::size_t prefetched = 0;
    const auto prefetch_ahead = [&](std::size_t upto) {
      upto = std::min(upto, sc.index.entries.size());
      for (; prefetched < upto; ++prefetched) {
        const Entry& e = entries[prefetched];
        prefetch_bytes(updates[e.pos].values + static_cast<std::int64_t>(e.local) * K,
                       static_cast<std::size_t>(K) * sizeof(float));
      }
    };
    // Without noise only the touched rows are visited; with it, every row. A large table's rows
    // (read by the scalar form and by an in-place step) are requested a few rows ahead: they
    // are scattered where the hardware cannot predict them, and not in cache (cache.hpp).
    const UninitVector<std::int64_t>& touched_rows = sc.index.touched;
    const bool large_table = !cohort.any_noisy && model.item_factors != nullptr &&
                             model.num_items * K * static_cast<std::int64_t>(sizeof(float)) > kLargeTableBytes;
    const std::int64_t visits = cohort.any_noisy ? hi - lo : static_cast<std::int64_t>(touched_rows.size());
    constexpr std::int64_t kRowsAhead = 8;
    std::int64_t unwritten = lo;  // rows [unwritten, row) were skipped
    for (std::int64_t v = 0; v < visits; ++v) {
      const std::int64_t row = cohort.any_noisy ? lo + v : touched_rows[static_cast<std::size_t>(v)];
      if (large_table && v + kRowsAhead < visits)
        prefetch_bytes(model.row(touched_rows[static_cast<std::size_t>(v + kRowsAhead)]),
                       static_cast<std::size_t>(K) * sizeof(float));
      const std::size_t b = static_cast<std::size_t>(start[static_cast<std::size_t>(row - lo)]);
      const std::size_t b_end = static_cast<std::size_t>(start[static_cast<std::size_t>(row - lo) + 1]);
      if (!cohort.scalar) prefetch_ahead(b_end + kPrefetchEntries);
      const Entry* e = entries + b;
      std::size_t n = b_end - b;
      if (cohort.any_noisy) {  // every reporting client adds its row or its noise
        sc.contrib.clear();
        std::size_t next = b;
        for (const std::uint32_t i : cohort.reporting) {
          if (next < b_end && entries[next].pos == i)
            sc.contrib.push_back(entries[next++]);
          else if (const EncodedUpdate* enc = updates[i].enc; enc != nullptr && enc->noisy_zeros)
            sc.contrib.push_back({i, -1, 0.0f, 0.0f, 0.0f});
        }
        e = sc.contrib.data();
        n = sc.contrib.size();
      }
      if (n == 0) continue;
      current_row = row;
      double bias_sum = 0.0;
      // Rows skipped before this one are written first (a sink may write this row's blocks).
      if (unwritten < row) gap(unwritten, row);
      std::uint32_t bad;
      if (cohort.scalar) {
        bad = sum_scalar(e, n, bias_sum);
      } else {
        sum_rows(e, n, bias_sum);
        bad = sink.block(row, 0, acc, K);
      }
      sink.row_done(row, bias_sum, bad);
      unwritten = row + 1;
    }
    if (unwritten < hi) gap(unwritten, hi);
    touched.fetch_add(static_cast<std::int64_t>(touched_rows.size()), std::memory_order_relaxed);
  });
  return touched.load();
}

}  // namespace

ReduceResult reduce_mean(const ModelView& model, const std::vector<UpdateRef>& updates,
                         double total_weight, int num_threads, float* delta_out,
                         float* delta_bias_out, const InPlaceStep& step) {
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  // Nobody reports: nothing is reduced, and the model (or the zero delta) stays as it is, but for
  // momentum, which moves every row by its velocity.
  const double inv_total = total_weight > 0.0 ? 1.0 / total_weight : 0.0;
  ReduceResult result;
  if (step.item_factors != nullptr) {
    std::atomic<std::int64_t> nonfinite{0};
    // The model's rows and the velocity's are S floats apart (ModelView::stride).
    const std::int64_t S = model.stride();
    struct StepSink {
      const InPlaceStep& step;
      std::int64_t S;
      bool bias;
      double inv_total;
      std::atomic<std::int64_t>& nonfinite;
      std::uint32_t block(std::int64_t row, std::int64_t kb, const double* sums, std::int64_t n) const {
        if (step.velocity != nullptr)
          return momentum_columns(step.item_factors + row * S + kb, step.velocity + row * S + kb, sums, n,
                                  inv_total, step);
        return step_columns(step.item_factors + row * S + kb, sums, n, inv_total, step.lr);
      }
      void row_done(std::int64_t row, double bias_sum, std::uint32_t bad) const {
        if (bias && step.velocity != nullptr)
          bad |= momentum_columns(step.item_bias + row, step.velocity_bias + row, &bias_sum, 1, inv_total, step);
        else if (bias)
          bad |= step_columns(step.item_bias + row, &bias_sum, 1, inv_total, step.lr);
        if (bad) nonfinite.fetch_add(1, std::memory_order_relaxed);
      }
    };
    // Plain SGD leaves untouched rows alone; momentum moves them too (a zero mean): the run of
    // rows is one contiguous range, stepped in one loop (a padded row's zero columns stay zero:
    // 0 * momentum + 0 * lr); rows are counted only if it overflowed.
    const auto gap = [&](std::int64_t lo, std::int64_t hi) {
      if (step.velocity == nullptr) return;
      std::uint32_t bad =
          momentum_columns(step.item_factors + lo * S, step.velocity + lo * S, nullptr, (hi - lo) * S, 0.0, step);
      if (bias) bad |= momentum_columns(step.item_bias + lo, step.velocity_bias + lo, nullptr, hi - lo, 0.0, step);
      if (!bad) return;
      for (std::int64_t r = lo; r < hi; ++r) {
        const float* v = step.item_factors + r * S;
        bool row_bad = bias && !std::isfinite(step.item_bias[r]);
        for (std::int64_t k = 0; k < K && !row_bad; ++k) row_bad = !std::isfinite(v[k]);
        if (row_bad) nonfinite.fetch_add(1, std::memory_order_relaxed);
      }
    };
    result.rows_aggregated = reduce_rows(updates, model, num_threads, gap, StepSink{step, S, bias, inv_total, nonfinite});
    result.nonfinite_rows = nonfinite.load();
    return result;
  }
  struct MeanSink {
    float* delta_out;
    float* delta_bias_out;
    std::int64_t K;
    bool bias;
    double inv_total;
    std::uint32_t block(std::int64_t row, std::int64_t kb, const double* sums, std::int64_t n) const {
      float* out = delta_out + row * K + kb;
      for (std::int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(sums[k] * inv_total);
      return 0;
    }
    void row_done(std::int64_t row, double bias_sum, std::uint32_t) const {
      if (bias) delta_bias_out[row] = static_cast<float>(bias_sum * inv_total);
    }
  };
  result.rows_aggregated = reduce_rows(
      updates, model, num_threads,
      [&](std::int64_t lo, std::int64_t hi) {  // untouched rows are 0, written once
        std::fill(delta_out + lo * K, delta_out + hi * K, 0.0f);
        if (bias) std::fill(delta_bias_out + lo, delta_bias_out + hi, 0.0f);
      },
      MeanSink{delta_out, delta_bias_out, K, bias, inv_total});
  return result;
}

}  // namespace fedrecon
