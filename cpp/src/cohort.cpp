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

#include "fedrecon/cache.hpp"
#include "fedrecon/client.hpp"
#include "fedrecon/parallel.hpp"
#include "fedrecon/reduce.hpp"
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

// A call's per-thread storage of the reporting clients' updates; results refer to them by
// offset, so nothing is allocated per client once the arenas have grown. A call stores either
// materialised rows (values) or the scalar form (beta, gamma), never both.
struct Arena {
  std::vector<std::int32_t> rows;
  UninitVector<float> values;
  std::vector<float> beta, gamma, bias;
  std::vector<std::int32_t> chunks;  // the scalar form's bucket bounds by reduction chunk
  void clear() {
    rows.clear();
    values.clear();
    beta.clear();
    gamma.clear();
    bias.clear();
    chunks.clear();
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
    static std::mutex& m = fork_safe_mutex();  // a fork() mid-lease must not leave it held
    return m;
  }
  static std::vector<std::unique_ptr<Slot>>& free_list() {
    static auto* list = new std::vector<std::unique_ptr<Slot>>();  // leaked: no exit-order issues
    return *list;
  }
  std::vector<std::unique_ptr<Slot>> slots_;
};

// One client's outcome, kept until the ordered reduction.
struct ClientResult {
  int arena = 0;            // thread whose arena holds the update
  std::size_t offset = 0;   // first row in that arena
  std::size_t nrows = 0;
  std::size_t chunk_offset = 0;  // its bucket bounds in the arena's chunks (scalar form, several chunks)
  ClientStats stats;
  EncodedUpdate enc;
};

// Which path a configuration takes:
// - u frozen during the client update (config.joint false; every preset but the FedAvg
//   baselines): the scalar form of ClientWorker::update_compact, clipped on its scalars. The
//   reduction reads the scalars and the cohort's u's directly, unless the codec quantizes or the
//   caller wants rows (client_updates): then the rows are materialised (materialize_row) into
//   the arena and encoded there.
// - joint training of u and V: rows of a local copy of V (update_joint), clipped and encoded as
//   rows.
struct CohortUpdates {
  std::vector<ClientResult> results;
  std::vector<float> users;  // scalar form: each client's u (num_sampled x dim)
  bool materialised = true;
  bool bucketed = false;     // the scalar form's rows are bucketed by reduction chunk

  // The reduction's view of client i's update.
  UpdateRef ref(const WorkerLease& lease, std::size_t i, const ModelView& model) const {
    const ClientResult& r = results[i];
    const Arena& a = lease.arena(static_cast<std::size_t>(r.arena));
    UpdateRef u;
    u.rows = a.rows.data() + r.offset;
    u.nrows = static_cast<std::int64_t>(r.nrows);
    if (materialised) {
      u.values = a.values.data() + r.offset * static_cast<std::size_t>(model.dim);
    } else {
      u.beta = a.beta.data() + r.offset;
      u.gamma = a.gamma.empty() ? nullptr : a.gamma.data() + r.offset;
      u.user = users.data() + i * static_cast<std::size_t>(model.dim);
      if (bucketed) u.chunk_start = a.chunks.data() + r.chunk_offset;
    }
    u.bias = model.has_bias() ? a.bias.data() + r.offset : nullptr;
    u.weight = r.stats.weight;
    u.enc = &r.enc;
    return u;
  }
  std::vector<UpdateRef> refs(const WorkerLease& lease, const ModelView& model) const {
    std::vector<UpdateRef> out(results.size());
    for (std::size_t i = 0; i < results.size(); ++i)
      if (results[i].stats.weight > 0.0) out[i] = ref(lease, i, model);
    return out;
  }
};

CohortUpdates run_updates(WorkerLease& workers, const ModelView& model, const CsrView& data,
                          const std::int64_t* clients, std::int64_t n, const ClientConfig& config,
                          std::uint64_t seed, std::uint64_t round, int num_threads,
                          const UserState& users, const UpdateCodec& codec, bool want_rows) {
  // The caller has validated config and inputs (before leasing workers sized by the model).
  if (codec.bits != 0) check_bits(codec.bits);
  if (!(codec.clip >= 0.0) || codec.threshold < 0) throw std::invalid_argument("clip and threshold must be >= 0");
  const int threads = resolve_threads(num_threads, n);
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  // A table this large does not stay in a core's caches from one client to the next: the next
  // client's rows are requested while the current client's SGD chain runs (measured: 1 M x 64
  // rounds ~30% faster; on a table that fits, the requests only cost time).
  const bool large_table = model.num_items * K * static_cast<std::int64_t>(sizeof(float)) > kLargeTableBytes;
  CohortUpdates out;
  out.results.resize(static_cast<std::size_t>(n));
  const bool compact = !config.joint;
  out.materialised = !compact || want_rows || codec.quantizes(model.num_items, model.dim);
  if (compact && !out.materialised) out.users.resize(static_cast<std::size_t>(n * K));
  // The fused round's scalar form is stored bucketed by the reduction's chunks, so each chunk
  // takes its rows without scanning every client's (a counting sort over a few buckets here,
  // in the parallel client phase).
  const ReduceChunks chunks(model.num_items, num_threads);
  out.bucketed = compact && !out.materialised && chunks.count > 1;
  // The scalar form is clipped before it is encoded.
  UpdateCodec encoding = codec;
  if (compact) encoding.clip = 0.0;
  struct ThreadScratch {
    CodecScratch codec;
    std::vector<std::int32_t> place;
  };
  std::vector<ThreadScratch> scratch(static_cast<std::size_t>(threads));
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
    // The clients taken next (by this thread or another) are cold in cache: request their
    // ratings now, while this one computes.
    if (const std::int64_t next = j + threads; next < n) {
      const std::int64_t nc = clients[order.empty() ? next : order[static_cast<std::size_t>(next)]];
      const std::int64_t b = data.indptr[nc], len = data.indptr[nc + 1] - b;
      prefetch_bytes(data.items + b, static_cast<std::size_t>(len) * sizeof(std::int32_t));
      prefetch_bytes(data.ratings + b, static_cast<std::size_t>(len) * sizeof(float));
      if (large_table) w.prefetch_during_chain(data.items + b, len);
    }
    w.split(data, c, config, seed, round);
    const float* init_u = users.users_in ? users.users_in + i * K : nullptr;
    const float init_bu = users.user_bias_in ? users.user_bias_in[i] : 0.0f;
    w.reconstruct(config, seed, round, static_cast<std::int64_t>(data.stream_id(c)), init_u, init_bu);
    ClientResult& res = out.results[static_cast<std::size_t>(i)];
    Arena& a = workers.arena(static_cast<std::size_t>(tid));
    bool clipped = false;
    if (compact) {
      res.stats = w.update_compact(config);
      if (res.stats.weight > 0.0 && codec.clip > 0.0) {
        const double norm = std::sqrt(w.compact_sq_norm());
        if (norm > codec.clip) {
          w.scale_compact(static_cast<float>(codec.clip / norm));
          clipped = true;
        }
      }
    } else {
      res.stats = w.update_joint(config, a.values);  // appends the update's rows, if it reports
    }
    if (users.users_out != nullptr) {
      // A diverged client keeps its stored embedding.
      const bool keep = res.stats.status == kNonFinite && init_u != nullptr;
      std::copy_n(keep ? init_u : w.user(), K, users.users_out + i * K);
      if (users.user_bias_out != nullptr) users.user_bias_out[i] = keep ? init_bu : w.user_bias();
    }
    if (res.stats.weight <= 0.0) return;
    const std::size_t nrows = w.rows().size();
    res.arena = tid;
    res.offset = a.rows.size();
    res.nrows = nrows;
    a.rows.insert(a.rows.end(), w.rows().begin(), w.rows().end());
    if (bias) a.bias.insert(a.bias.end(), w.bias_delta(), w.bias_delta() + nrows);
    if (compact && out.materialised) {
      a.values.resize(a.values.size() + nrows * static_cast<std::size_t>(K));
      float* dst = a.values.data() + res.offset * static_cast<std::size_t>(K);
      for (std::size_t r = 0; r < nrows; ++r)
        materialize_row(w.gamma() != nullptr ? w.gamma()[r] : 0.0f, w.beta()[r],
                        model.row(w.rows()[r]), w.user(),
                        model.dim, dst + r * static_cast<std::size_t>(K));
    } else if (compact) {
      a.beta.resize(a.beta.size() + nrows);
      if (w.gamma() != nullptr) a.gamma.resize(a.gamma.size() + nrows);
      std::copy_n(w.user(), K, out.users.data() + i * K);
      if (!out.bucketed) {
        std::copy_n(w.beta(), nrows, a.beta.data() + res.offset);
        if (w.gamma() != nullptr) std::copy_n(w.gamma(), nrows, a.gamma.data() + res.offset);
      } else {
        // Rows, scalars and bias deltas rewritten in chunk order (stable within a chunk).
        res.chunk_offset = a.chunks.size();
        a.chunks.resize(a.chunks.size() + static_cast<std::size_t>(chunks.count) + 1, 0);
        std::int32_t* bounds = a.chunks.data() + res.chunk_offset;
        const std::int32_t* rows = w.rows().data();
        for (std::size_t r = 0; r < nrows; ++r) ++bounds[chunks.of(rows[r]) + 1];
        for (std::int64_t b = 0; b < chunks.count; ++b) bounds[b + 1] += bounds[b];
        std::vector<std::int32_t>& place = scratch[static_cast<std::size_t>(tid)].place;
        place.assign(bounds, bounds + chunks.count);
        for (std::size_t r = 0; r < nrows; ++r) {
          const std::size_t to = res.offset + static_cast<std::size_t>(place[static_cast<std::size_t>(chunks.of(rows[r]))]++);
          a.rows[to] = rows[r];
          a.beta[to] = w.beta()[r];
          if (w.gamma() != nullptr) a.gamma[to] = w.gamma()[r];
          if (bias) a.bias[to] = w.bias_delta()[r];
        }
      }
    }
    bool encode_clipped = false;
    res.stats.bytes = encode_update(encoding, model.num_items, model.dim, a.rows.data() + res.offset,
                                    static_cast<std::int64_t>(nrows),
                                    out.materialised ? a.values.data() + res.offset * static_cast<std::size_t>(K) : nullptr,
                                    bias ? a.bias.data() + res.offset : nullptr,
                                    derive_seed(seed, round, data.stream_id(c), kStreamQuant),
                                    res.enc, encode_clipped, scratch[static_cast<std::size_t>(tid)].codec);
    res.stats.clipped = (clipped || encode_clipped) ? 1 : 0;
  });
  return out;
}

// Copies the per-client stats out and totals them in cohort order.
RoundSummary summarize(const std::vector<ClientResult>& results, ClientStats* stats_out) {
  RoundSummary summary;
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
  }
  return summary;
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
  if (step.item_factors != nullptr && step.velocity != nullptr &&
      (!(step.momentum >= 0.0f && step.momentum < 1.0f) || (model.has_bias() && step.velocity_bias == nullptr)))
    throw std::invalid_argument("the in-place step's momentum must be in [0, 1), with a bias velocity for a biased model");
  WorkerLease lease(model, resolve_threads(num_threads, num_sampled));
  const CohortUpdates updates =
      run_updates(lease, model, data, clients, num_sampled, config, seed, round, num_threads, users, codec, false);
  RoundSummary summary = summarize(updates.results, stats_out);
  const ReduceResult r = reduce_mean(model, updates.refs(lease, model), summary.total_weight, num_threads,
                                     delta_out, delta_bias_out, step);
  summary.rows_aggregated = r.rows_aggregated;
  summary.nonfinite_rows = r.nonfinite_rows;
  return summary;
}

double reduce_updates(std::int64_t num_items, int dim, const std::int64_t* offsets,
                      std::int64_t num_clients, const std::int32_t* rows, const float* values,
                      const float* bias_values, const double* weights, int num_threads,
                      float* delta_out, float* delta_bias_out, const DenseNoise* noise) {
  if (dim < 1 || num_items < 0 || num_clients < 0 || num_clients >= (std::int64_t{1} << 32))
    throw std::invalid_argument("reduce_updates: bad shape");
  if (offsets[0] != 0) throw std::invalid_argument("offsets must start at 0");
  std::vector<UpdateRef> refs(static_cast<std::size_t>(num_clients));
  std::vector<EncodedUpdate> encs(noise != nullptr ? static_cast<std::size_t>(num_clients) : 0);
  if (noise != nullptr && noise->codec.bits != 0) check_bits(noise->codec.bits);
  double total = 0.0;
  for (std::int64_t i = 0; i < num_clients; ++i) {
    if (offsets[i + 1] < offsets[i]) throw std::invalid_argument("offsets must be non-decreasing");
    if (!(weights[i] >= 0.0) || !std::isfinite(weights[i]))
      throw std::invalid_argument("weights must be finite and >= 0");
    UpdateRef& r = refs[static_cast<std::size_t>(i)];
    r.rows = rows + offsets[i];
    r.nrows = offsets[i + 1] - offsets[i];
    r.values = values + offsets[i] * dim;
    r.bias = bias_values != nullptr ? bias_values + offsets[i] : nullptr;
    r.weight = weights[i];
    if (r.weight > 0.0) total += r.weight;
    if (noise != nullptr && noise->step[i] != 0.0f) {
      if (noise->codec.bits == 0 || !std::isfinite(noise->lo[i]) || !(noise->step[i] > 0.0f) ||
          !std::isfinite(noise->step[i]))
        throw std::invalid_argument("noise needs quantizing bits and finite scales with step > 0");
      EncodedUpdate& e = encs[static_cast<std::size_t>(i)];
      e.scheme.bits = noise->codec.bits;
      e.scheme.hadamard = noise->codec.hadamard;
      e.scheme.key = noise->key[i];
      e.group = {noise->lo[i], noise->step[i]};
      set_noisy_zeros(e);
      r.enc = &e;
    }
  }
  for (std::int64_t e = 0; e < offsets[num_clients]; ++e)
    if (rows[e] < 0 || rows[e] >= num_items)
      throw std::out_of_range("row " + std::to_string(rows[e]) + " is outside [0, " + std::to_string(num_items) + ")");
  ModelView shape;  // only the shape and has_bias() are read
  shape.num_items = num_items;
  shape.dim = dim;
  shape.item_bias = bias_values;
  reduce_mean(shape, refs, total, num_threads, delta_out, delta_bias_out);
  return total;
}

SparseUpdates client_updates(const ModelView& model, const CsrView& data,
                             const std::int64_t* clients, std::int64_t num_sampled,
                             const ClientConfig& config, std::uint64_t seed, std::uint64_t round,
                             int num_threads, const UserState& users, const UpdateCodec& codec) {
  validate_config(config);
  check_inputs(model, data, clients, num_sampled, config);
  WorkerLease lease(model, resolve_threads(num_threads, num_sampled));
  const CohortUpdates updates =
      run_updates(lease, model, data, clients, num_sampled, config, seed, round, num_threads, users, codec, true);
  const std::int64_t K = model.dim;
  const bool bias = model.has_bias();
  SparseUpdates out;
  out.offsets.push_back(0);
  const bool noisy = codec.quantizes(model.num_items, model.dim) && !codec.sparse && !codec.row_scaling;
  for (std::size_t i = 0; i < updates.results.size(); ++i) {
    const ClientResult& r = updates.results[i];
    if (noisy) {
      const bool has = r.stats.weight > 0.0 && r.enc.noisy_zeros;
      out.noise_lo.push_back(has ? r.enc.group.lo : 0.0f);
      out.noise_step.push_back(has ? r.enc.group.step : 0.0f);
      out.noise_key.push_back(has ? r.enc.scheme.key : 0);
    }
    if (r.stats.weight > 0.0) {
      const UpdateRef u = updates.ref(lease, i, model);
      out.rows.insert(out.rows.end(), u.rows, u.rows + r.nrows);
      out.values.insert(out.values.end(), u.values, u.values + r.nrows * static_cast<std::size_t>(K));
      if (bias) out.bias_values.insert(out.bias_values.end(), u.bias, u.bias + r.nrows);
    }
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
