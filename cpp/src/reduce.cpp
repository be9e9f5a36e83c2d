#include "fedrecon/strict_fp.hpp"  // first: the float64 sums are exact sequences of roundings

#include "fedrecon/reduce.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

#include "fedrecon/cache.hpp"
#include "fedrecon/client.hpp"
#include "fedrecon/parallel.hpp"

namespace fedrecon {

void materialize_row(float g, float beta, const float* v, const float* u, int dim, float* out) {
  if (g == 0.0f) {
    for (int k = 0; k < dim; ++k) out[k] = beta * u[k];
  } else {
    for (int k = 0; k < dim; ++k) out[k] = g * v[k] + beta * u[k];
  }
}

bool sgd_step_row(float* v, const double* sum, double inv_total, float lr, std::int64_t dim) {
  // This file is compiled without FMA contraction, so mean * lr is rounded before the add.
  // Non-finite means all exponent bits set; OR-ing that test vectorises, a float probe sum
  // (a serial dependency chain) would not.
  std::uint32_t bad = 0;
  for (std::int64_t k = 0; k < dim; ++k) {
    const float mean = static_cast<float>(sum[k] * inv_total);
    const float x = v[k] + mean * lr;
    v[k] = x;
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bad |= static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

namespace {

// The cohort's touched rows: (row, client) entries grouped by row, clients in cohort order.
struct RowIndex {
  struct Entry {
    std::uint64_t key;   // (row << 32) | cohort position
    std::int32_t local;  // row of the client's update; -1: noise of an untouched row
  };
  // The scalar form's numbers of each entry, copied next to it while indexing, so the sums
  // read them in entry order instead of chasing each client's arrays.
  struct Coef {
    float beta, gamma, bias;
  };
  UninitVector<Entry> entries;
  UninitVector<Coef> coefs;             // scalar form only: one per entry
  bool scalar = false;                  // the reporting clients' updates are in scalar form
  bool gamma = false;                   // ... with L2 (some g may be non-zero)
  std::vector<std::size_t> seg;         // entries[seg[s]:seg[s+1]] share one row
  std::vector<std::int64_t> reporting;  // cohort positions of the reporting clients, in order
  bool any_noisy = false;               // a dense quantized update: every row gets noise
  std::int64_t num_segments() const { return static_cast<std::int64_t>(seg.size()) - 1; }
  std::int64_t row_of(std::int64_t s) const {
    return static_cast<std::int64_t>(entries[seg[static_cast<std::size_t>(s)]].key >> 32);
  }
};
using Contribution = RowIndex::Entry;
inline std::int64_t position(const Contribution& c) { return static_cast<std::int64_t>(c.key & 0xffffffffULL); }

// Counting sort of the reporting clients' rows: count, then place each client's entries in
// cohort order, so each row's clients stay in cohort order. Linear in rows + entries.
void index_rows(const std::vector<UpdateRef>& updates, std::int64_t num_items, RowIndex& index) {
  if (updates.size() >= (std::size_t{1} << 32)) throw std::invalid_argument("too many clients (2^32 or more)");
  std::vector<std::int64_t> start(static_cast<std::size_t>(num_items) + 1, 0);
  for (std::size_t i = 0; i < updates.size(); ++i) {
    const UpdateRef& u = updates[i];
    if (u.weight <= 0.0) continue;
    if (index.reporting.empty()) index.scalar = u.values == nullptr;
    if (index.scalar != (u.values == nullptr)) throw std::invalid_argument("updates mix rows and the scalar form");
    index.gamma = index.gamma || u.gamma != nullptr;
    index.reporting.push_back(static_cast<std::int64_t>(i));
    index.any_noisy = index.any_noisy || (u.enc != nullptr && u.enc->noisy_zeros);
    for (std::int64_t l = 0; l < u.nrows; ++l) ++start[static_cast<std::size_t>(u.rows[l]) + 1];
  }
  // Prefix sums in place; before row's step, start[row + 1] is still its count and start[row]
  // its first slot, so the touched rows' segments are read off on the way.
  for (std::size_t row = 0; row + 1 < start.size(); ++row) {
    if (start[row + 1] > 0) index.seg.push_back(static_cast<std::size_t>(start[row]));
    start[row + 1] += start[row];
  }
  index.seg.push_back(static_cast<std::size_t>(start.back()));
  index.entries.resize(static_cast<std::size_t>(start.back()));
  if (index.scalar) index.coefs.resize(index.entries.size());
  Contribution* entries = index.entries.data();
  for (const std::int64_t i : index.reporting) {
    const UpdateRef& u = updates[static_cast<std::size_t>(i)];
    for (std::int64_t l = 0; l < u.nrows; ++l) {
      const std::int64_t slot = start[static_cast<std::size_t>(u.rows[l])]++;
      Contribution& e = entries[slot];
      e.key = (static_cast<std::uint64_t>(u.rows[l]) << 32) | static_cast<std::uint64_t>(i);
      e.local = static_cast<std::int32_t>(l);
      if (index.scalar)
        index.coefs[static_cast<std::size_t>(slot)] = {u.beta[l], u.gamma != nullptr ? u.gamma[l] : 0.0f,
                                                       u.bias != nullptr ? u.bias[l] : 0.0f};
    }
  }
}

// The scalar form without L2 (x = beta * u, materialize_row's arithmetic): the sum over the
// contributions c[0:n) of w * x[kb:kb+B), held in registers across the run (B doubles: a few
// vector registers) and stored once. coef[i] goes with c[i]; U holds the cohort's u's, stride P.
template <int B>
inline void scalar_block(const Contribution* c, const RowIndex::Coef* coef, std::size_t n,
                         const double* weights, const float* U, std::int64_t P, std::int64_t kb,
                         double* out) {
  double acc[B];
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t p = position(c[i]);
    const float beta = coef[i].beta;
    const double w = weights[p];
    const float* u = U + p * P + kb;
    if (i == 0) {
#pragma GCC unroll 32
      for (int j = 0; j < B; ++j) acc[j] = w * static_cast<double>(beta * u[j]);
    } else {
#pragma GCC unroll 32
      for (int j = 0; j < B; ++j) acc[j] += w * static_cast<double>(beta * u[j]);
    }
  }
  for (int j = 0; j < B; ++j) out[kb + j] = acc[j];
}

// How many update rows the reduction requests ahead of the one it sums.
constexpr std::size_t kPrefetchEntries = 16;

// Reduces every touched row (with noise: every row) of the cohort: emit(row, slot, sum,
// bias_sum) gets the un-normalised float64 weighted sums, slot = the row's segment (with noise:
// the row). Parallel over blocks of consecutive rows; gap(lo, hi) gets each run of rows
// [lo, hi) that emit skipped, so a dense output writes every row once. A row's scalar-form
// contributions read the model's row, so emit may overwrite that row (and only that row).
template <class Gap, class Emit>
void reduce_rows(const std::vector<UpdateRef>& updates, const RowIndex& index, const ModelView& model,
                 int num_threads, const Gap& gap, const Emit& emit) {
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  const std::int64_t num_segments = index.num_segments();
  const std::int64_t rows_per_block = 256;
  const std::int64_t num_blocks = (model.num_items + rows_per_block - 1) / rows_per_block;
  const int threads = resolve_threads(num_threads, num_blocks);
  // The scalar form's per-client numbers by cohort position: weights, and the u's copied with
  // a stride P padded to whole blocks of 8 (zeros), so the sums run on whole vectors.
  const std::int64_t P = index.scalar ? (K + 7) / 8 * 8 : K;
  std::vector<double> weights(index.scalar ? updates.size() : 0);
  std::vector<float> U(index.scalar ? updates.size() * static_cast<std::size_t>(P) : 0, 0.0f);
  for (std::size_t i = 0; i < weights.size(); ++i) {
    weights[i] = updates[i].weight;
    if (updates[i].weight > 0.0) std::copy_n(updates[i].user, K, U.data() + i * static_cast<std::size_t>(P));
  }
  struct Scratch {
    std::vector<double> acc;  // P
    std::vector<float> row;   // K
    CodecScratch codec;
  };
  std::vector<Scratch> scratch;
  for (int t = 0; t < threads; ++t)
    scratch.push_back({std::vector<double>(static_cast<std::size_t>(P)), std::vector<float>(static_cast<std::size_t>(K)), {}});
  parallel_for(num_blocks, threads, [&](std::int64_t b, int tid) {
    const std::int64_t lo = b * rows_per_block, hi = std::min(model.num_items, lo + rows_per_block);
    std::int64_t unwritten = lo;  // rows [unwritten, row) were skipped
    Scratch& sc = scratch[static_cast<std::size_t>(tid)];
    std::vector<Contribution> contrib;
    float* row_buf = sc.row.data();
    std::int64_t current_row = 0;
    // One contribution into a level's accumulators (the first one assigns): x = the client's row
    // (materialised, decoded noise, or from the scalar form exactly as materialize_row gives it),
    // acc += w * x in float64.
    const auto accumulate = [K](const float* x, double w, double* a, bool first) {
      if (first) {
        for (std::int64_t k = 0; k < K; ++k) a[k] = w * static_cast<double>(x[k]);
      } else {
        for (std::int64_t k = 0; k < K; ++k) a[k] += w * static_cast<double>(x[k]);
      }
    };
    const auto add_rows = [&](const Contribution& c, double* a, double& acc_bias, bool first) {
      const UpdateRef& u = updates[static_cast<std::size_t>(position(c))];
      const float* x = row_buf;
      double bs = 0.0;
      if (c.local < 0) {
        decode_untouched_row(*u.enc, current_row, model.dim, row_buf, sc.codec);
      } else {
        x = u.values + static_cast<std::int64_t>(c.local) * K;
        if (bias) bs = u.weight * u.bias[c.local];
      }
      accumulate(x, u.weight, a, first);
      acc_bias = first ? bs : acc_bias + bs;
    };
    // The sums of a row's contributions c[0:n), in cohort order (the first one assigns).
    const auto leaf_rows = [&](const Contribution* c, std::size_t n, double* a, double& acc_bias) {
      for (std::size_t i = 0; i < n; ++i) add_rows(c[i], a, acc_bias, i == 0);
    };
    const auto leaf_scalar = [&](const Contribution* c, std::size_t n, double* a, double& acc_bias) {
      const RowIndex::Coef* coef = index.coefs.data() + (c - index.entries.data());
      if (!index.gamma) {
        std::int64_t kb = 0;
        for (; kb + 16 <= P; kb += 16) scalar_block<16>(c, coef, n, weights.data(), U.data(), P, kb, a);
        if (kb < P) scalar_block<8>(c, coef, n, weights.data(), U.data(), P, kb, a);
      } else {
        // With L2: x = g * v + beta * u, materialize_row's arithmetic, one contribution at a time.
        const float* v = model.item_factors + current_row * K;
        for (std::size_t i = 0; i < n; ++i) {
          const std::int64_t p = position(c[i]);
          const float* u = U.data() + p * P;
          if (coef[i].gamma == 0.0f) {
            for (std::int64_t k = 0; k < K; ++k) row_buf[k] = coef[i].beta * u[k];
          } else {
            for (std::int64_t k = 0; k < K; ++k) row_buf[k] = coef[i].gamma * v[k] + coef[i].beta * u[k];
          }
          accumulate(row_buf, weights[static_cast<std::size_t>(p)], a, i == 0);
        }
      }
      double bs = 0.0;
      for (std::size_t i = 0; i < n && bias; ++i) {
        const double b = weights[static_cast<std::size_t>(position(c[i]))] * coef[i].bias;
        bs = i == 0 ? b : bs + b;
      }
      acc_bias = bs;
    };
    // The first segment at or after row `lo`.
    std::int64_t s = 0, z = num_segments;
    while (s < z) {
      const std::int64_t mid = (s + z) / 2;
      if (index.row_of(mid) < lo) s = mid + 1; else z = mid;
    }
    // Row order reads materialised updates at scattered places, one update row per entry:
    // without prefetching, every entry waited for its own cache misses.
    std::size_t prefetched = s < num_segments ? index.seg[static_cast<std::size_t>(s)] : 0;
    const auto prefetch_ahead = [&](std::size_t upto) {
      upto = std::min(upto, index.entries.size());
      for (; prefetched < upto; ++prefetched) {
        const Contribution& c = index.entries[prefetched];
        const UpdateRef& u = updates[static_cast<std::size_t>(position(c))];
        if (u.values != nullptr)
          prefetch_bytes(u.values + static_cast<std::int64_t>(c.local) * K, static_cast<std::size_t>(K) * sizeof(float));
      }
    };
    for (std::int64_t row = lo; row < hi; ++row) {
      const bool has_seg = s < num_segments && index.row_of(s) == row;
      if (!has_seg && !index.any_noisy) {
        if (s >= num_segments || index.row_of(s) >= hi) break;  // no more touched rows here
        row = index.row_of(s) - 1;  // jump to the next touched row
        continue;
      }
      std::size_t e = has_seg ? index.seg[static_cast<std::size_t>(s)] : 0;
      const std::size_t e_end = has_seg ? index.seg[static_cast<std::size_t>(s) + 1] : 0;
      if (has_seg && !index.scalar) prefetch_ahead(e_end + kPrefetchEntries);
      const Contribution* c = index.entries.data() + e;
      std::size_t n = e_end - e;
      if (index.any_noisy) {  // every reporting client adds its row or its noise
        contrib.clear();
        for (const std::int64_t i : index.reporting) {
          if (e < e_end && position(index.entries[e]) == i)
            contrib.push_back(index.entries[e++]);
          else if (const EncodedUpdate* enc = updates[static_cast<std::size_t>(i)].enc; enc != nullptr && enc->noisy_zeros)
            contrib.push_back({(static_cast<std::uint64_t>(row) << 32) | static_cast<std::uint64_t>(i), -1});
        }
        c = contrib.data();
        n = contrib.size();
      }
      const std::int64_t slot = index.any_noisy ? row : s;
      if (has_seg) ++s;
      current_row = row;
      if (n > 0) {
        double bias_sum = 0.0;
        if (index.scalar)
          leaf_scalar(c, n, sc.acc.data(), bias_sum);
        else
          leaf_rows(c, n, sc.acc.data(), bias_sum);
        if (unwritten < row) gap(unwritten, row);
        emit(row, slot, sc.acc.data(), bias_sum);
        unwritten = row + 1;
      }
    }
    if (unwritten < hi) gap(unwritten, hi);
  });
}

}  // namespace

ReduceResult reduce_mean(const ModelView& model, const std::vector<UpdateRef>& updates,
                         double total_weight, int num_threads, float* delta_out,
                         float* delta_bias_out, const InPlaceStep& step) {
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  RowIndex index;
  index_rows(updates, model.num_items, index);
  ReduceResult result;
  result.rows_aggregated = index.num_segments();
  if (step.item_factors != nullptr) {
    if (total_weight <= 0.0) return result;  // nobody reports: the model stays as it is
    const double inv_total = 1.0 / total_weight;
    std::atomic<std::int64_t> nonfinite{0};
    reduce_rows(
        updates, index, model, num_threads, [](std::int64_t, std::int64_t) {},
        [&](std::int64_t row, std::int64_t, const double* sum, double bias_sum) {
          bool ok = sgd_step_row(step.item_factors + row * K, sum, inv_total, step.lr, K);
          if (bias) ok = sgd_step_row(step.item_bias + row, &bias_sum, inv_total, step.lr, 1) && ok;
          if (!ok) nonfinite.fetch_add(1, std::memory_order_relaxed);
        });
    result.nonfinite_rows = nonfinite.load();
    return result;
  }
  if (total_weight <= 0.0) {
    std::fill_n(delta_out, model.num_items * K, 0.0f);
    if (bias) std::fill_n(delta_bias_out, model.num_items, 0.0f);
    return result;
  }
  const double inv_total = 1.0 / total_weight;
  reduce_rows(
      updates, index, model, num_threads,
      [&](std::int64_t lo, std::int64_t hi) {  // untouched rows are 0, written once
        std::fill(delta_out + lo * K, delta_out + hi * K, 0.0f);
        if (bias) std::fill(delta_bias_out + lo, delta_bias_out + hi, 0.0f);
      },
      [&](std::int64_t row, std::int64_t, const double* sum, double bias_sum) {
        float* out = delta_out + row * K;
        for (std::int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(sum[k] * inv_total);
        if (bias) delta_bias_out[row] = static_cast<float>(bias_sum * inv_total);
      });
  return result;
}

}  // namespace fedrecon
