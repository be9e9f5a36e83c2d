#include "fedrecon/cohort.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "fedrecon/aggregate.hpp"
#include "fedrecon/cache.hpp"
#include "fedrecon/client.hpp"
#include "fedrecon/parallel.hpp"
#include "fedrecon/rng.hpp"

namespace fedrecon {

namespace {

void check_inputs(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                  std::int64_t num_sampled, const ClientConfig& config) {
  if (model.dim < 1) throw std::invalid_argument("dim must be >= 1");
  if (model.num_items < 0) throw std::invalid_argument("num_items must be >= 0");
  if (!config.user_default.empty() && static_cast<std::int64_t>(config.user_default.size()) != model.dim)
    throw std::invalid_argument("user_default must have dim entries");
  if (num_sampled < 0) throw std::invalid_argument("number of clients must be >= 0");
  if (data.num_clients < 0 || data.indptr == nullptr) throw std::invalid_argument("indptr is empty");
  if (data.indptr[0] != 0 || data.indptr[data.num_clients] != data.nnz)
    throw std::invalid_argument("indptr must start at 0 and end at the number of ratings");
  for (std::int64_t i = 0; i < num_sampled; ++i) {
    const std::int64_t c = clients[i];
    if (c < 0 || c >= data.num_clients)
      throw std::out_of_range("client id " + std::to_string(c) + " is outside [0, " +
                              std::to_string(data.num_clients) + ")");
    // Bounds of the client's slice: nothing downstream reads outside [0, nnz).
    if (data.indptr[c] < 0 || data.indptr[c + 1] < data.indptr[c] || data.indptr[c + 1] > data.nnz)
      throw std::invalid_argument("indptr must be non-decreasing within [0, number of ratings]");
  }
}

// The reporting clients' updates of one call, appended per thread; results refer to them by
// offset, so nothing is allocated per client once the arenas have grown.
struct Arena {
  std::vector<std::int32_t> rows;
  UninitVector<float> values;
  std::vector<float> bias;
  void clear() {
    rows.clear();
    values.clear();
    bias.clear();
  }
};

// Workers (with their num_items-sized scratch) and arenas are reused across calls: a lease
// takes them from a process-wide free list and returns them, so concurrent callers never share
// one. A call that ends in an exception drops them rather than return possibly dirty scratch.
class WorkerLease {
 public:
  WorkerLease(const ModelView& model, int threads) {
    std::lock_guard<std::mutex> lock(mutex());
    for (int t = 0; t < threads; ++t) {
      if (free_list().empty()) {
        slots_.push_back(std::make_unique<Slot>(Slot{std::make_unique<ClientWorker>(model), Arena()}));
      } else {
        slots_.push_back(std::move(free_list().back()));
        free_list().pop_back();
        slots_.back()->worker->rebind(model);
        slots_.back()->arena.clear();
      }
    }
  }
  ~WorkerLease() {
    if (std::uncaught_exceptions() > 0) return;
    std::lock_guard<std::mutex> lock(mutex());
    // Back in reverse, so the next lease hands slot t to thread t again: its scratch and arena
    // are then still in that core's cache (swapping them every call made each write a miss).
    for (auto s = slots_.rbegin(); s != slots_.rend(); ++s)
      if (free_list().size() < 64) free_list().push_back(std::move(*s));
  }
  WorkerLease(const WorkerLease&) = delete;
  WorkerLease& operator=(const WorkerLease&) = delete;
  ClientWorker& operator[](std::size_t i) { return *slots_[i]->worker; }
  Arena& arena(std::size_t i) { return slots_[i]->arena; }
  const Arena& arena(std::size_t i) const { return slots_[i]->arena; }

 private:
  struct Slot {
    std::unique_ptr<ClientWorker> worker;
    Arena arena;
  };
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::unique_ptr<Slot>>& free_list() {
    static auto* list = new std::vector<std::unique_ptr<Slot>>();  // leaked: no exit-order issues
    return *list;
  }
  std::vector<std::unique_ptr<Slot>> slots_;
};

// One client's sparse update, kept until the ordered reduction.
struct ClientResult {
  int arena = 0;            // thread whose arena holds the update
  std::size_t offset = 0;   // first row in that arena
  std::size_t nrows = 0;
  ClientStats stats;
  EncodedUpdate enc;
};

// Views of a result's update in its arena.
struct UpdateView {
  const std::int32_t* rows;
  const float* values;  // nrows x dim
  const float* bias;    // nrows, or nullptr
};

UpdateView view(const WorkerLease& lease, const ClientResult& r, std::int64_t K, bool bias) {
  const Arena& a = lease.arena(static_cast<std::size_t>(r.arena));
  return {a.rows.data() + r.offset, a.values.data() + r.offset * static_cast<std::size_t>(K),
          bias ? a.bias.data() + r.offset : nullptr};
}

std::vector<ClientResult> run_updates(WorkerLease& workers, const ModelView& model, const CsrView& data,
                                      const std::int64_t* clients, std::int64_t n,
                                      const ClientConfig& config, std::uint64_t seed,
                                      std::uint64_t round, int num_threads, const UserState& users,
                                      const UpdateCodec& codec) {
  // The caller has validated config and inputs (before leasing workers sized by the model).
  if (codec.bits != 0) check_bits(codec.bits);
  if (!(codec.clip >= 0.0) || codec.threshold < 0) throw std::invalid_argument("clip and threshold must be >= 0");
  const int threads = resolve_threads(num_threads, n);
  std::vector<CodecScratch> scratch(static_cast<std::size_t>(threads));
  std::vector<ClientResult> results(static_cast<std::size_t>(n));
  const std::int64_t K = model.dim;
  // Largest clients first, so the threads finish together (each result is stored by cohort
  // position, so the order of work never changes a result).
  std::vector<std::int64_t> order(static_cast<std::size_t>(threads > 1 ? n : 0));
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(order.size()); ++i) order[static_cast<std::size_t>(i)] = i;
  const auto size = [&](std::int64_t i) { return data.indptr[clients[i] + 1] - data.indptr[clients[i]]; };
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return size(a) > size(b); });
  parallel_for(n, threads, [&](std::int64_t j, int tid) {
    const std::int64_t i = order.empty() ? j : order[static_cast<std::size_t>(j)];
    ClientWorker& w = workers[static_cast<std::size_t>(tid)];
    const std::int64_t c = clients[i];
    w.split(data, c, config, seed, round);
    const float* init_u = users.users_in ? users.users_in + i * K : nullptr;
    const float init_bu = users.user_bias_in ? users.user_bias_in[i] : 0.0f;
    w.reconstruct(config, seed, round, static_cast<std::int64_t>(data.stream_id(c)), init_u, init_bu);
    ClientResult& out = results[static_cast<std::size_t>(i)];
    Arena& a = workers.arena(static_cast<std::size_t>(tid));
    out.stats = w.update(config, a.values);  // appends the update's values, if it has one
    if (users.users_out != nullptr) {
      // A diverged client keeps its stored embedding.
      const bool keep = out.stats.status == kNonFinite && init_u != nullptr;
      std::copy_n(keep ? init_u : w.user(), K, users.users_out + i * K);
      if (users.user_bias_out != nullptr) users.user_bias_out[i] = keep ? init_bu : w.user_bias();
    }
    if (out.stats.weight > 0.0) {
      const std::size_t nrows = w.rows().size();
      out.arena = tid;
      out.offset = a.rows.size();
      out.nrows = nrows;
      a.rows.insert(a.rows.end(), w.rows().begin(), w.rows().end());
      if (model.has_bias()) a.bias.insert(a.bias.end(), w.bias_delta(), w.bias_delta() + nrows);
      bool clipped = false;
      out.stats.bytes = encode_update(codec, model.num_items, model.dim, a.rows.data() + out.offset,
                                      static_cast<std::int64_t>(nrows), a.values.data() + out.offset * static_cast<std::size_t>(K),
                                      model.has_bias() ? a.bias.data() + out.offset : nullptr,
                                      derive_seed(seed, round, data.stream_id(c), kStreamQuant),
                                      out.enc, clipped, scratch[static_cast<std::size_t>(tid)]);
      out.stats.clipped = clipped ? 1 : 0;
    }
  });
  return results;
}

// The cohort's touched rows: (row, client) entries grouped by row, clients in cohort order.
struct RowIndex {
  struct Entry {
    std::uint64_t key;  // (row << 32) | cohort position
    std::int32_t local; // row of the client's update
  };
  UninitVector<Entry> entries;
  std::vector<std::size_t> seg;         // entries[seg[s]:seg[s+1]] share one row
  std::vector<std::int64_t> reporting;  // cohort positions of the reporting clients, in order
  bool any_noisy = false;               // a dense quantized update: every row gets noise
  std::int64_t num_segments() const { return static_cast<std::int64_t>(seg.size()) - 1; }
  std::int64_t row_of(std::int64_t s) const {
    return static_cast<std::int64_t>(entries[seg[static_cast<std::size_t>(s)]].key >> 32);
  }
};

// Copies the per-client stats out, totals them in cohort order and indexes the touched rows.
// views(result) gives a result's update (UpdateView): in a worker arena, or in the caller's
// arrays (reduce_updates).
template <class Views>
RoundSummary index_rows(const Views& views, const std::vector<ClientResult>& results,
                        const ModelView& model, ClientStats* stats_out, RowIndex& index) {
  RoundSummary summary;
  // Counting sort by row, straight from the updates: count, then place each reporting client's
  // entries in cohort order, so each row's clients stay in cohort order. Linear in rows +
  // entries. (Appending entries and sorting a copy cost twice as much: each appended entry
  // was built on the stack and reloaded as one 16-byte vector, a store-forwarding stall.)
  std::vector<std::int64_t> start(static_cast<std::size_t>(model.num_items) + 1, 0);
  for (std::size_t i = 0; i < results.size(); ++i) {
    const ClientResult& r = results[i];
    stats_out[i] = r.stats;
    // A dropped (non-finite) client is counted but its metrics would poison the round's.
    if (r.stats.status == kNonFinite) {
      summary.num_nonfinite += 1;
      continue;
    }
    summary.loss_sum += r.stats.loss_sum;
    summary.num_examples += r.stats.num_examples;
    summary.num_correct += r.stats.num_correct;
    if (r.stats.weight <= 0.0) continue;
    summary.total_weight += r.stats.weight;
    summary.num_reporting += 1;
    summary.rows_sent += static_cast<std::int64_t>(r.nrows);
    summary.bytes_sent += r.stats.bytes;
    summary.num_clipped += r.stats.clipped;
    index.reporting.push_back(static_cast<std::int64_t>(i));
    index.any_noisy = index.any_noisy || r.enc.noisy_zeros;
    const std::int32_t* rows = views(r).rows;
    for (std::size_t l = 0; l < r.nrows; ++l) ++start[static_cast<std::size_t>(rows[l]) + 1];
  }
  // Prefix sums in place; before row's step, start[row + 1] is still its count and start[row]
  // its first slot, so the touched rows' segments are read off on the way.
  for (std::size_t row = 0; row + 1 < start.size(); ++row) {
    if (start[row + 1] > 0) index.seg.push_back(static_cast<std::size_t>(start[row]));
    start[row + 1] += start[row];
  }
  index.seg.push_back(static_cast<std::size_t>(start.back()));
  index.entries.resize(static_cast<std::size_t>(start.back()));
  RowIndex::Entry* entries = index.entries.data();
  for (const std::int64_t i : index.reporting) {
    const ClientResult& r = results[static_cast<std::size_t>(i)];
    const std::int32_t* rows = views(r).rows;
    for (std::size_t l = 0; l < r.nrows; ++l) {
      RowIndex::Entry& e = entries[start[static_cast<std::size_t>(rows[l])]++];
      e.key = (static_cast<std::uint64_t>(rows[l]) << 32) | static_cast<std::uint64_t>(i);
      e.local = static_cast<std::int32_t>(l);
    }
  }
  summary.rows_aggregated = index.num_segments();
  return summary;
}

// One client's contribution to one row: an entry of the row index, or (local < 0) the
// quantization noise a dense update decodes to on a row the client did not touch.
using Contribution = RowIndex::Entry;
inline std::int64_t position(const Contribution& c) { return static_cast<std::int64_t>(c.key & 0xffffffffULL); }

// Sums the contributions to a row along a fixed binary tree over cohort positions: a range of
// more than kReduceLeaf positions splits at its midpoint (rounded up), a smaller one is summed
// in cohort order (float64). A range's tree depends only on its length, so shards of a cohort
// reduced elsewhere (reduce_partial, other processes or machines) combine into exactly the
// local result; a range without contributions is absent, not zero.
class TreeSum {
 public:
  TreeSum(std::int64_t num_sampled, std::int64_t dim) : K_(dim) {
    int depth = 1;
    for (std::int64_t n = num_sampled; n > kReduceLeaf; n = (n + 1) / 2) ++depth;
    acc_.resize(static_cast<std::size_t>(depth * dim));
    bias_.resize(static_cast<std::size_t>(depth));
  }
  const double* values() const { return acc_.data(); }
  double bias() const { return bias_[0]; }

  // add(contribution, acc, acc_bias, first) adds one contribution into a level's accumulators
  // (the first one assigns). The sum of contributions c[0:n) (positions in [a, b)) lands in
  // level d.
  template <class Add>
  bool sum(const Contribution* c, std::size_t n, std::int64_t a, std::int64_t b, int d, const Add& add) {
    if (n == 0) return false;
    while (n > 1 && b - a > kReduceLeaf) {
      const std::int64_t mid = a + (b - a + 1) / 2;
      const std::size_t nl = static_cast<std::size_t>(
          std::lower_bound(c, c + n, mid, [](const Contribution& x, std::int64_t p) { return position(x) < p; }) - c);
      if (nl == n) {
        b = mid;  // one child holds everything: its sum is this node's, no copy needed
      } else if (nl == 0) {
        a = mid;
      } else {
        sum(c, nl, a, mid, d, add);
        sum(c + nl, n - nl, mid, b, d + 1, add);
        Eigen::Map<Eigen::VectorXd>(level(d), K_) += Eigen::Map<const Eigen::VectorXd>(level(d + 1), K_);
        bias_[static_cast<std::size_t>(d)] += bias_[static_cast<std::size_t>(d) + 1];
        return true;
      }
    }
    Eigen::Map<Eigen::VectorXd> acc(level(d), K_);
    for (std::size_t i = 0; i < n; ++i) add(c[i], acc, bias_[static_cast<std::size_t>(d)], i == 0);
    return true;
  }

 private:
  double* level(int d) { return acc_.data() + static_cast<std::size_t>(d) * static_cast<std::size_t>(K_); }
  std::int64_t K_;
  std::vector<double> acc_, bias_;
};

// How many update rows the reduction requests ahead of the one it sums.
constexpr std::size_t kPrefetchEntries = 16;

// Reduces every touched row (with noise: every row) of the cohort: emit(row, slot, sum,
// bias_sum) gets the un-normalised float64 weighted sums, slot = the row's segment (with noise:
// the row). Parallel over blocks of consecutive rows; gap(lo, hi) gets each run of rows
// [lo, hi) that emit skipped, so a dense output writes every row once.
template <class Views, class Gap, class Emit>
void reduce_rows(const Views& views, const std::vector<ClientResult>& results,
                 const RowIndex& index, const ModelView& model, int num_threads, const Gap& gap,
                 const Emit& emit) {
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  const std::int64_t num_sampled = static_cast<std::int64_t>(results.size());
  const std::int64_t num_segments = index.num_segments();
  const std::int64_t rows_per_block = 256;
  const std::int64_t num_blocks = (model.num_items + rows_per_block - 1) / rows_per_block;
  const int threads = resolve_threads(num_threads, num_blocks);
  struct Scratch {
    TreeSum tree;
    std::vector<Contribution> contrib;
    std::vector<float> noise;
    CodecScratch codec;
  };
  std::vector<Scratch> scratch;
  for (int t = 0; t < threads; ++t)
    scratch.push_back({TreeSum(num_sampled, K), {}, std::vector<float>(static_cast<std::size_t>(K)), {}});
  parallel_for(num_blocks, threads, [&](std::int64_t b, int tid) {
    const std::int64_t lo = b * rows_per_block, hi = std::min(model.num_items, lo + rows_per_block);
    std::int64_t unwritten = lo;  // rows [unwritten, row) were skipped
    Scratch& sc = scratch[static_cast<std::size_t>(tid)];
    TreeSum& tree = sc.tree;
    std::vector<Contribution>& contrib = sc.contrib;
    std::vector<float>& noise = sc.noise;
    CodecScratch& cs = sc.codec;
    std::int64_t current_row = 0;
    auto add = [&](const Contribution& c, Eigen::Map<Eigen::VectorXd>& acc, double& acc_bias, bool first) {
      const ClientResult& r = results[static_cast<std::size_t>(position(c))];
      const float* x = noise.data();
      double b = 0.0;
      if (c.local >= 0) {
        const UpdateView u = views(r);
        x = u.values + static_cast<std::int64_t>(c.local) * K;
        if (bias) b = r.stats.weight * u.bias[c.local];
      } else {
        decode_untouched_row(r.enc, current_row, model.dim, noise.data(), cs);
      }
      // Plain loops: GCC vectorises them (vcvtps2pd + FMA); Eigen's float->double cast of a
      // dynamic-size map is scalar. Same arithmetic either way: acc = fma(w, x, acc).
      const double w = r.stats.weight;
      double* a = acc.data();
      if (first) {
        for (std::int64_t k = 0; k < K; ++k) a[k] = w * static_cast<double>(x[k]);
        acc_bias = b;
      } else {
        for (std::int64_t k = 0; k < K; ++k) a[k] += w * static_cast<double>(x[k]);
        acc_bias += b;
      }
    };
    // The first segment at or after row `lo`.
    std::int64_t s = 0, z = num_segments;
    while (s < z) {
      const std::int64_t mid = (s + z) / 2;
      if (index.row_of(mid) < lo) s = mid + 1; else z = mid;
    }
    // Row order reads the arenas at scattered places, one update row per entry: without
    // prefetching, every entry waited for its own cache misses (the reduction's main cost).
    std::size_t prefetched = s < num_segments ? index.seg[static_cast<std::size_t>(s)] : 0;
    const auto prefetch_ahead = [&](std::size_t upto) {
      upto = std::min(upto, index.entries.size());
      for (; prefetched < upto; ++prefetched) {
        const Contribution& c = index.entries[prefetched];
        const UpdateView u = views(results[static_cast<std::size_t>(position(c))]);
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
      if (has_seg) prefetch_ahead(e_end + kPrefetchEntries);
      const Contribution* c = index.entries.data() + e;
      std::size_t n = e_end - e;
      if (index.any_noisy) {  // every reporting client adds its row or its noise
        contrib.clear();
        for (const std::int64_t i : index.reporting) {
          if (e < e_end && position(index.entries[e]) == i)
            contrib.push_back(index.entries[e++]);
          else if (results[static_cast<std::size_t>(i)].enc.noisy_zeros)
            contrib.push_back({(static_cast<std::uint64_t>(row) << 32) | static_cast<std::uint64_t>(i), -1});
        }
        c = contrib.data();
        n = contrib.size();
      }
      const std::int64_t slot = index.any_noisy ? row : s;
      if (has_seg) ++s;
      current_row = row;
      if (tree.sum(c, n, 0, num_sampled, 0, add)) {
        if (unwritten < row) gap(unwritten, row);
        emit(row, slot, tree.values(), tree.bias());
        unwritten = row + 1;
      }
    }
    if (unwritten < hi) gap(unwritten, hi);
  });
}

// delta_out = the weighted sums / total_weight (float32; 0 for untouched rows, all 0 when
// nobody reports); with an in-place step, the model takes the step on the reduced rows instead
// and the number of rows it left non-finite is returned.
template <class Views>
std::int64_t write_mean(const Views& views, const std::vector<ClientResult>& results, const RowIndex& index,
                        const ModelView& model, double total_weight, int num_threads, float* delta_out,
                        float* delta_bias_out, const InPlaceStep& step = InPlaceStep()) {
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  if (step.item_factors != nullptr) {
    if (total_weight <= 0.0) return 0;  // nobody reports: the model stays as it is
    const double inv_total = 1.0 / total_weight;
    std::atomic<std::int64_t> nonfinite{0};
    reduce_rows(
        views, results, index, model, num_threads, [](std::int64_t, std::int64_t) {},
        [&](std::int64_t row, std::int64_t, const double* sum, double bias_sum) {
          bool ok = sgd_step_row(step.item_factors + row * K, sum, inv_total, step.lr, K);
          if (bias) ok = sgd_step_row(step.item_bias + row, &bias_sum, inv_total, step.lr, 1) && ok;
          if (!ok) nonfinite.fetch_add(1, std::memory_order_relaxed);
        });
    return nonfinite.load();
  }
  if (total_weight <= 0.0) {
    std::fill_n(delta_out, model.num_items * K, 0.0f);
    if (bias) std::fill_n(delta_bias_out, model.num_items, 0.0f);
    return 0;
  }
  const double inv_total = 1.0 / total_weight;
  reduce_rows(
      views, results, index, model, num_threads,
      [&](std::int64_t lo, std::int64_t hi) {  // untouched rows are 0, written once
        std::fill(delta_out + lo * K, delta_out + hi * K, 0.0f);
        if (bias) std::fill(delta_bias_out + lo, delta_bias_out + hi, 0.0f);
      },
      [&](std::int64_t row, std::int64_t, const double* sum, double bias_sum) {
        float* out = delta_out + row * K;
        for (std::int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(sum[k] * inv_total);
        if (bias) delta_bias_out[row] = static_cast<float>(bias_sum * inv_total);
      });
  return 0;
}

}  // namespace

RoundSummary train_round(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                         std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                         std::uint64_t round, int num_threads, float* delta_out,
                         float* delta_bias_out, ClientStats* stats_out, const UserState& users,
                         const UpdateCodec& codec, const InPlaceStep& step) {
  validate_config(config);
  check_inputs(model, data, clients, num_sampled, config);
  if (step.item_factors != nullptr && (step.item_factors != model.item_factors ||
                                       (model.has_bias() && step.item_bias != model.item_bias)))
    throw std::invalid_argument("an in-place step updates the model's own arrays");
  if (step.item_factors != nullptr && !(std::isfinite(step.lr) && step.lr > 0.0f))
    throw std::invalid_argument("the in-place step's lr must be finite and > 0");
  WorkerLease lease(model, resolve_threads(num_threads, num_sampled));
  const auto results = run_updates(lease, model, data, clients, num_sampled, config, seed, round, num_threads, users, codec);
  const auto views = [&](const ClientResult& r) { return view(lease, r, model.dim, model.has_bias()); };
  RowIndex index;
  RoundSummary summary = index_rows(views, results, model, stats_out, index);
  summary.nonfinite_rows = write_mean(views, results, index, model, summary.total_weight, num_threads,
                                      delta_out, delta_bias_out, step);
  return summary;
}

RoundSummary train_round_partial(const ModelView& model, const CsrView& data,
                                 const std::int64_t* clients, std::int64_t num_sampled,
                                 const ClientConfig& config, std::uint64_t seed, std::uint64_t round,
                                 int num_threads, PartialSums& out, ClientStats* stats_out,
                                 const UserState& users, const UpdateCodec& codec) {
  validate_config(config);
  check_inputs(model, data, clients, num_sampled, config);
  WorkerLease lease(model, resolve_threads(num_threads, num_sampled));
  const auto results = run_updates(lease, model, data, clients, num_sampled, config, seed, round, num_threads, users, codec);
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  const auto views = [&](const ClientResult& r) { return view(lease, r, K, bias); };
  RowIndex index;
  RoundSummary summary = index_rows(views, results, model, stats_out, index);
  // Every row (noise) or every touched row has a slot, filled in parallel; rows a subtree left
  // empty (all its contributions absent) are dropped afterwards.
  const std::int64_t slots = index.any_noisy ? model.num_items : index.num_segments();
  out.rows.assign(static_cast<std::size_t>(slots), -1);
  out.values.assign(static_cast<std::size_t>(slots * K), 0.0);
  out.bias.assign(bias ? static_cast<std::size_t>(slots) : 0, 0.0);
  out.touched.resize(static_cast<std::size_t>(index.num_segments()));
  for (std::int64_t s = 0; s < index.num_segments(); ++s)
    out.touched[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(index.row_of(s));
  if (index.reporting.empty()) return summary;
  reduce_rows(
      views, results, index, model, num_threads, [](std::int64_t, std::int64_t) {},
      [&](std::int64_t row, std::int64_t slot, const double* sum, double bias_sum) {
        out.rows[static_cast<std::size_t>(slot)] = static_cast<std::int32_t>(row);
        std::copy_n(sum, K, out.values.data() + slot * K);
        if (bias) out.bias[static_cast<std::size_t>(slot)] = bias_sum;
      });
  std::size_t kept = 0;
  for (std::size_t i = 0; i < out.rows.size(); ++i) {
    if (out.rows[i] < 0) continue;
    if (kept != i) {
      out.rows[kept] = out.rows[i];
      std::copy_n(out.values.data() + i * static_cast<std::size_t>(K), K, out.values.data() + kept * static_cast<std::size_t>(K));
      if (bias) out.bias[kept] = out.bias[i];
    }
    ++kept;
  }
  out.rows.resize(kept);
  out.values.resize(kept * static_cast<std::size_t>(K));
  if (bias) out.bias.resize(kept);
  return summary;
}

double reduce_updates(std::int64_t num_items, int dim, const std::int64_t* offsets,
                      std::int64_t num_clients, const std::int32_t* rows, const float* values,
                      const float* bias_values, const double* weights, int num_threads,
                      float* delta_out, float* delta_bias_out) {
  if (dim < 1 || num_items < 0 || num_clients < 0 || num_clients >= (std::int64_t{1} << 32))
    throw std::invalid_argument("reduce_updates: bad shape");
  if (offsets[0] != 0) throw std::invalid_argument("offsets must start at 0");
  std::vector<ClientResult> results(static_cast<std::size_t>(num_clients));
  for (std::int64_t i = 0; i < num_clients; ++i) {
    if (offsets[i + 1] < offsets[i]) throw std::invalid_argument("offsets must be non-decreasing");
    if (!(weights[i] >= 0.0) || !std::isfinite(weights[i]))
      throw std::invalid_argument("weights must be finite and >= 0");
    ClientResult& r = results[static_cast<std::size_t>(i)];
    r.offset = static_cast<std::size_t>(offsets[i]);
    r.nrows = static_cast<std::size_t>(offsets[i + 1] - offsets[i]);
    r.stats.weight = weights[i];
  }
  for (std::int64_t e = 0; e < offsets[num_clients]; ++e)
    if (rows[e] < 0 || rows[e] >= num_items)
      throw std::out_of_range("row " + std::to_string(rows[e]) + " is outside [0, " + std::to_string(num_items) + ")");
  ModelView shape;  // only the shape and has_bias() are read
  shape.num_items = num_items;
  shape.dim = dim;
  shape.item_bias = bias_values;
  const auto views = [&](const ClientResult& r) {
    return UpdateView{rows + r.offset, values + r.offset * static_cast<std::size_t>(dim),
                      bias_values ? bias_values + r.offset : nullptr};
  };
  std::vector<ClientStats> stats(static_cast<std::size_t>(num_clients));
  RowIndex index;
  const RoundSummary summary = index_rows(views, results, shape, stats.data(), index);
  write_mean(views, results, index, shape, summary.total_weight, num_threads, delta_out, delta_bias_out);
  return summary.total_weight;
}

SparseUpdates client_updates(const ModelView& model, const CsrView& data,
                             const std::int64_t* clients, std::int64_t num_sampled,
                             const ClientConfig& config, std::uint64_t seed, std::uint64_t round,
                             int num_threads, const UserState& users, const UpdateCodec& codec) {
  if (codec.quantizes(model.num_items, model.dim) && !codec.sparse && !codec.row_scaling)
    throw std::invalid_argument("a dense update quantized with one scale decodes to noise on every row; "
                                "client_updates returns touched rows only: use sparse or row scaling");
  validate_config(config);
  check_inputs(model, data, clients, num_sampled, config);
  WorkerLease lease(model, resolve_threads(num_threads, num_sampled));
  auto results = run_updates(lease, model, data, clients, num_sampled, config, seed, round, num_threads, users, codec);
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  SparseUpdates out;
  out.offsets.push_back(0);
  for (auto& r : results) {
    const UpdateView u = view(lease, r, K, bias);
    out.rows.insert(out.rows.end(), u.rows, u.rows + r.nrows);
    out.values.insert(out.values.end(), u.values, u.values + r.nrows * static_cast<std::size_t>(K));
    if (bias) out.bias_values.insert(out.bias_values.end(), u.bias, u.bias + r.nrows);
    out.offsets.push_back(static_cast<std::int64_t>(out.rows.size()));
    out.stats.push_back(r.stats);
  }
  return out;
}

void reconstruct_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                       std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                       std::uint64_t round, int num_threads, float* users_out,
                       float* user_bias_out) {
  validate_config(config);
  check_inputs(model, data, clients, num_sampled, config);
  const int threads = resolve_threads(num_threads, num_sampled);
  WorkerLease workers(model, threads);
  parallel_for(num_sampled, threads, [&](std::int64_t i, int tid) {
    ClientWorker& w = workers[static_cast<std::size_t>(tid)];
    w.split(data, clients[i], config, seed, round);
    w.reconstruct(config, seed, round, static_cast<std::int64_t>(data.stream_id(clients[i])));
    std::copy_n(w.user(), model.dim, users_out + i * model.dim);
    if (user_bias_out != nullptr) user_bias_out[i] = w.user_bias();
  });
}

void evaluate_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                    std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                    std::uint64_t round, int num_threads, EvalStats* stats_out, std::int64_t k,
                    float relevance_threshold, RankStats* rank_out, std::int64_t* top_out) {
  validate_config(config);
  check_inputs(model, data, clients, num_sampled, config);
  if (k < 0) throw std::invalid_argument("k must be >= 0");
  if (k > 0 && rank_out == nullptr) throw std::invalid_argument("ranking needs rank_out");
  if (std::isnan(relevance_threshold)) throw std::invalid_argument("relevance_threshold must not be NaN");
  const int threads = resolve_threads(num_threads, num_sampled);
  const std::int64_t width = std::min(k, std::max<std::int64_t>(model.num_items, 1));  // of top_out
  WorkerLease workers(model, threads);
  parallel_for(num_sampled, threads, [&](std::int64_t i, int tid) {
    ClientWorker& w = workers[static_cast<std::size_t>(tid)];
    w.split(data, clients[i], config, seed, round);
    w.reconstruct(config, seed, round, static_cast<std::int64_t>(data.stream_id(clients[i])));
    stats_out[i] = w.evaluate();
    if (k > 0) rank_out[i] = w.rank_query(k, relevance_threshold, top_out != nullptr ? top_out + i * width : nullptr);
  });
}

namespace {

// Inference reconstructs on every rating, with the streams of client 0 for every user.
ClientConfig inference_config(const ClientConfig& config) {
  ClientConfig c = config;
  c.split = SplitMode::Reuse;
  return c;
}

template <class PerUser>
void run_inference(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                   std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                   std::uint64_t round, int num_threads, PerUser&& per_user) {
  validate_config(config);
  check_inputs(model, data, clients, num_sampled, config);
  const ClientConfig all = inference_config(config);
  const int threads = resolve_threads(num_threads, num_sampled);
  WorkerLease workers(model, threads);
  parallel_for(num_sampled, threads, [&](std::int64_t i, int tid) {
    ClientWorker& w = workers[static_cast<std::size_t>(tid)];
    w.split(data, clients[i], all, seed, round, 0);
    w.reconstruct(all, seed, round, 0);
    per_user(w, i);
  });
}

}  // namespace

void infer_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                 std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                 std::uint64_t round, int num_threads, float* users_out, float* user_bias_out) {
  run_inference(model, data, clients, num_sampled, config, seed, round, num_threads,
                [&](ClientWorker& w, std::int64_t i) {
                  std::copy_n(w.user(), model.dim, users_out + i * model.dim);
                  if (user_bias_out != nullptr) user_bias_out[i] = w.user_bias();
                });
}

void recommend_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                     std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                     std::uint64_t round, int num_threads, std::int64_t k, bool exclude_seen,
                     std::int64_t* items_out, float* scores_out) {
  if (k < 1) throw std::invalid_argument("k must be >= 1");
  run_inference(model, data, clients, num_sampled, config, seed, round, num_threads,
                [&](ClientWorker& w, std::int64_t i) {
                  w.top_k(k, exclude_seen, items_out + i * k, scores_out + i * k);
                });
}

}  // namespace fedrecon
