#include "fedrecon/cohort.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "fedrecon/client.hpp"
#include "fedrecon/parallel.hpp"
#include "fedrecon/rng.hpp"

namespace fedrecon {

namespace {

void check_inputs(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                  std::int64_t num_sampled) {
  if (model.dim < 1) throw std::invalid_argument("dim must be >= 1");
  if (model.num_items < 0) throw std::invalid_argument("num_items must be >= 0");
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
  std::vector<float> values, bias;
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
    for (auto& s : slots_)
      if (free_list().size() < 64) free_list().push_back(std::move(s));
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
  parallel_for(n, threads, [&](std::int64_t i, int tid) {
    ClientWorker& w = workers[static_cast<std::size_t>(tid)];
    const std::int64_t c = clients[i];
    w.split(data, c, config, seed, round);
    const float* init_u = users.users_in ? users.users_in + i * K : nullptr;
    const float init_bu = users.user_bias_in ? users.user_bias_in[i] : 0.0f;
    w.reconstruct(config, seed, round, c, init_u, init_bu);
    ClientResult& out = results[static_cast<std::size_t>(i)];
    out.stats = w.update(config);
    if (users.users_out != nullptr) {
      // A diverged client keeps its stored embedding.
      const bool keep = out.stats.status == kNonFinite && init_u != nullptr;
      std::copy_n(keep ? init_u : w.user(), K, users.users_out + i * K);
      if (users.user_bias_out != nullptr) users.user_bias_out[i] = keep ? init_bu : w.user_bias();
    }
    if (out.stats.weight > 0.0) {
      const std::size_t nrows = w.rows().size();
      Arena& a = workers.arena(static_cast<std::size_t>(tid));
      out.arena = tid;
      out.offset = a.rows.size();
      out.nrows = nrows;
      a.rows.insert(a.rows.end(), w.rows().begin(), w.rows().end());
      a.values.insert(a.values.end(), w.delta(), w.delta() + nrows * static_cast<std::size_t>(K));
      if (model.has_bias()) a.bias.insert(a.bias.end(), w.bias_delta(), w.bias_delta() + nrows);
      bool clipped = false;
      out.stats.bytes = encode_update(codec, model.num_items, model.dim, a.rows.data() + out.offset,
                                      static_cast<std::int64_t>(nrows), a.values.data() + out.offset * static_cast<std::size_t>(K),
                                      model.has_bias() ? a.bias.data() + out.offset : nullptr,
                                      derive_seed(seed, round, static_cast<std::uint64_t>(c), kStreamQuant),
                                      out.enc, clipped, scratch[static_cast<std::size_t>(tid)]);
      out.stats.clipped = clipped ? 1 : 0;
    }
  });
  return results;
}

}  // namespace

RoundSummary train_round(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                         std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                         std::uint64_t round, int num_threads, float* delta_out,
                         float* delta_bias_out, ClientStats* stats_out, const UserState& users,
                         const UpdateCodec& codec) {
  validate_config(config);
  check_inputs(model, data, clients, num_sampled);
  WorkerLease lease(model, resolve_threads(num_threads, num_sampled));
  const auto results = run_updates(lease, model, data, clients, num_sampled, config, seed, round, num_threads, users, codec);
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();

  RoundSummary summary;
  struct Entry {
    std::uint64_t key;  // (row << 32) | client position: rows grouped, clients in order
    std::int32_t local;
  };
  std::vector<Entry> entries;
  std::vector<std::int64_t> reporting;  // cohort positions of the reporting clients, in order
  bool any_noisy = false;                // a dense quantized update: every row gets noise
  for (std::int64_t i = 0; i < num_sampled; ++i) {
    const ClientResult& r = results[static_cast<std::size_t>(i)];
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
    reporting.push_back(i);
    any_noisy = any_noisy || r.enc.noisy_zeros;
    const std::int32_t* rows = view(lease, r, K, bias).rows;
    for (std::size_t l = 0; l < r.nrows; ++l)
      entries.push_back({(static_cast<std::uint64_t>(rows[l]) << 32) | static_cast<std::uint64_t>(i),
                         static_cast<std::int32_t>(l)});
  }
  if (summary.total_weight <= 0.0) {
    std::fill_n(delta_out, model.num_items * K, 0.0f);
    if (bias) std::fill_n(delta_bias_out, model.num_items, 0.0f);
    return summary;
  }
  // Counting sort by row: entries were appended in cohort order and the scatter is stable, so
  // each row's clients stay in cohort order. Linear in rows + entries.
  {
    std::vector<std::int64_t> start(static_cast<std::size_t>(model.num_items) + 1, 0);
    for (const Entry& e : entries) ++start[static_cast<std::size_t>(e.key >> 32) + 1];
    for (std::size_t r = 1; r < start.size(); ++r) start[r] += start[r - 1];
    std::vector<Entry> sorted(entries.size());
    for (const Entry& e : entries) sorted[static_cast<std::size_t>(start[static_cast<std::size_t>(e.key >> 32)]++)] = e;
    entries.swap(sorted);
  }

  // Segments of equal row; each row sums its clients in cohort order (float64), so the
  // reduction is parallel across rows yet independent of the thread count. With a dense
  // quantized update in the cohort every row is visited: rows a client did not touch decode to
  // its quantization noise around zero.
  std::vector<std::size_t> seg{0};
  for (std::size_t e = 1; e < entries.size(); ++e)
    if ((entries[e].key >> 32) != (entries[e - 1].key >> 32)) seg.push_back(e);
  seg.push_back(entries.size());
  if (entries.empty()) seg.assign(1, 0);
  const std::int64_t num_segments = static_cast<std::int64_t>(seg.size()) - 1;
  summary.rows_aggregated = num_segments;
  auto row_of = [&](std::int64_t s) {
    return static_cast<std::int64_t>(entries[seg[static_cast<std::size_t>(s)]].key >> 32);
  };
  // Parallel over blocks of consecutive rows: a block zero-fills its rows of the output, then
  // sums the clients of each of its touched rows (or, with noise, of every row).
  const std::int64_t rows_per_block = 256;
  const std::int64_t num_blocks = (model.num_items + rows_per_block - 1) / rows_per_block;
  const double inv_total = 1.0 / summary.total_weight;
  const int threads = resolve_threads(num_threads, num_blocks);
  std::vector<CodecScratch> scratch(static_cast<std::size_t>(threads));
  parallel_for(num_blocks, threads, [&](std::int64_t b, int tid) {
    const std::int64_t lo = b * rows_per_block, hi = std::min(model.num_items, lo + rows_per_block);
    std::fill(delta_out + lo * K, delta_out + hi * K, 0.0f);
    if (bias) std::fill(delta_bias_out + lo, delta_bias_out + hi, 0.0f);
    std::vector<double> acc(static_cast<std::size_t>(K));
    std::vector<float> noise(static_cast<std::size_t>(K));
    Eigen::Map<Eigen::VectorXd> acc_v(acc.data(), K);
    CodecScratch& cs = scratch[static_cast<std::size_t>(tid)];
    // The first segment at or after row `lo`.
    std::int64_t s = 0, z = num_segments;
    while (s < z) {
      const std::int64_t mid = (s + z) / 2;
      if (row_of(mid) < lo) s = mid + 1; else z = mid;
    }
    auto add = [&](const ClientResult& r, const float* x) {
      acc_v += r.stats.weight * Eigen::Map<const Eigen::VectorXf>(x, K).cast<double>();
    };
    for (std::int64_t row = lo; row < hi; ++row) {
      const bool has_seg = s < num_segments && row_of(s) == row;
      if (!has_seg && !any_noisy) {
        if (s >= num_segments || row_of(s) >= hi) break;  // no more touched rows in this block
        row = row_of(s) - 1;  // jump to the next touched row
        continue;
      }
      std::size_t e = has_seg ? seg[static_cast<std::size_t>(s)] : 0;
      const std::size_t e_end = has_seg ? seg[static_cast<std::size_t>(s) + 1] : 0;
      acc_v.setZero();
      double acc_bias = 0.0;
      auto add_entry = [&](std::size_t entry) {
        const ClientResult& r = results[entries[entry].key & 0xffffffffULL];
        const UpdateView u = view(lease, r, K, bias);
        add(r, u.values + static_cast<std::int64_t>(entries[entry].local) * K);
        if (bias) acc_bias += r.stats.weight * u.bias[entries[entry].local];
      };
      if (!any_noisy) {
        for (; e < e_end; ++e) add_entry(e);
      } else {
        for (const std::int64_t i : reporting) {
          if (e < e_end && static_cast<std::int64_t>(entries[e].key & 0xffffffffULL) == i) {
            add_entry(e++);
          } else if (results[static_cast<std::size_t>(i)].enc.noisy_zeros) {
            decode_untouched_row(results[static_cast<std::size_t>(i)].enc, row, model.dim, noise.data(), cs);
            add(results[static_cast<std::size_t>(i)], noise.data());
          }
        }
      }
      if (has_seg) ++s;
      Eigen::Map<Eigen::VectorXf>(delta_out + row * K, K) = (acc_v * inv_total).cast<float>();
      if (bias) delta_bias_out[row] = static_cast<float>(acc_bias * inv_total);
    }
  });
  return summary;
}

SparseUpdates client_updates(const ModelView& model, const CsrView& data,
                             const std::int64_t* clients, std::int64_t num_sampled,
                             const ClientConfig& config, std::uint64_t seed, std::uint64_t round,
                             int num_threads, const UserState& users, const UpdateCodec& codec) {
  if (codec.quantizes(model.num_items, model.dim) && !codec.sparse && !codec.row_scaling)
    throw std::invalid_argument("a dense update quantized with one scale decodes to noise on every row; "
                                "client_updates returns touched rows only: use sparse or row scaling");
  validate_config(config);
  check_inputs(model, data, clients, num_sampled);
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
  check_inputs(model, data, clients, num_sampled);
  const int threads = resolve_threads(num_threads, num_sampled);
  WorkerLease workers(model, threads);
  parallel_for(num_sampled, threads, [&](std::int64_t i, int tid) {
    ClientWorker& w = workers[static_cast<std::size_t>(tid)];
    w.split(data, clients[i], config, seed, round);
    w.reconstruct(config, seed, round, clients[i]);
    std::copy_n(w.user(), model.dim, users_out + i * model.dim);
    if (user_bias_out != nullptr) user_bias_out[i] = w.user_bias();
  });
}

void evaluate_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                    std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                    std::uint64_t round, int num_threads, EvalStats* stats_out, std::int64_t k,
                    float relevance_threshold, RankStats* rank_out) {
  validate_config(config);
  check_inputs(model, data, clients, num_sampled);
  if (k < 0) throw std::invalid_argument("k must be >= 0");
  if (k > 0 && rank_out == nullptr) throw std::invalid_argument("ranking needs rank_out");
  if (std::isnan(relevance_threshold)) throw std::invalid_argument("relevance_threshold must not be NaN");
  const int threads = resolve_threads(num_threads, num_sampled);
  WorkerLease workers(model, threads);
  parallel_for(num_sampled, threads, [&](std::int64_t i, int tid) {
    ClientWorker& w = workers[static_cast<std::size_t>(tid)];
    w.split(data, clients[i], config, seed, round);
    w.reconstruct(config, seed, round, clients[i]);
    stats_out[i] = w.evaluate();
    if (k > 0) rank_out[i] = w.rank_query(k, relevance_threshold);
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
  check_inputs(model, data, clients, num_sampled);
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
