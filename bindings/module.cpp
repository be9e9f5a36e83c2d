// The only file that knows pybind11: array checks, GIL release, conversions. No math here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "fedrecon/centralized.hpp"
#include "fedrecon/cohort.hpp"
#include "fedrecon/cpu.hpp"
#include "fedrecon/loop.hpp"
#include "fedrecon/parallel.hpp"
#include "fedrecon/sampling.hpp"
#include "fedrecon/rng.hpp"

namespace py = pybind11;
using namespace pybind11::literals;
using fedrecon::ClientConfig;

namespace {

using fedrecon_bindings::Array;
using fedrecon_bindings::fail;

fedrecon::ModelView model_view(const Array<float>& item_factors,
                               const std::optional<Array<float>>& item_bias, float global_mean) {
  if (item_factors.ndim() != 2) fail("item_factors must be 2-D (num_items, dim)");
  if (item_factors.shape(1) < 1) fail("item_factors must have dim >= 1 columns");
  fedrecon::ModelView m;
  m.item_factors = item_factors.data();
  m.num_items = item_factors.shape(0);
  m.dim = static_cast<int>(item_factors.shape(1));
  m.global_mean = global_mean;
  if (item_bias) {
    if (item_bias->ndim() != 1 || item_bias->shape(0) != m.num_items)
      fail("item_bias must have shape (num_items,) matching item_factors");
    m.item_bias = item_bias->data();
  }
  return m;
}

using OptionalIds = std::optional<Array<std::int64_t>>;

fedrecon::CsrView csr_view(const Array<std::int64_t>& indptr, const Array<std::int32_t>& items,
                           const Array<float>& ratings, const OptionalIds& stream_ids = std::nullopt) {
  if (indptr.ndim() != 1 || indptr.shape(0) < 1) fail("indptr must be 1-D with num_clients + 1 entries");
  if (items.ndim() != 1 || ratings.ndim() != 1 || items.shape(0) != ratings.shape(0))
    fail("items and ratings must be 1-D arrays of the same length");
  fedrecon::CsrView d;
  d.indptr = indptr.data();
  d.items = items.data();
  d.ratings = ratings.data();
  d.num_clients = indptr.shape(0) - 1;
  d.nnz = items.shape(0);
  if (stream_ids) {
    if (stream_ids->ndim() != 1 || stream_ids->shape(0) != d.num_clients)
      fail("stream_ids must have one entry per client (len(indptr) - 1)");
    d.stream_ids = stream_ids->data();
  }
  return d;
}

const std::int64_t* client_ids(const Array<std::int64_t>& clients) {
  if (clients.ndim() != 1) fail("clients must be a 1-D array of client indices");
  return clients.data();
}

// Stored user embeddings of stateful baselines: inputs checked, outputs allocated.
struct UserArrays {
  fedrecon::UserState state;
  std::optional<Array<float>> users_out, user_bias_out;
};

UserArrays user_arrays(const std::optional<Array<float>>& users, const std::optional<Array<float>>& user_bias,
                       const fedrecon::ModelView& model, py::ssize_t n) {
  UserArrays out;
  if (!users) {
    if (user_bias) fail("user_bias needs users");
    return out;
  }
  if (users->ndim() != 2 || users->shape(0) != n || users->shape(1) != model.dim)
    fail("users must have shape (number of clients, dim)");
  if (model.has_bias() != static_cast<bool>(user_bias))
    fail("user_bias must be given exactly when item_bias is");
  if (user_bias && (user_bias->ndim() != 1 || user_bias->shape(0) != n))
    fail("user_bias must have shape (number of clients,)");
  out.state.users_in = users->data();
  out.users_out.emplace(std::vector<py::ssize_t>{n, static_cast<py::ssize_t>(model.dim)});
  out.state.users_out = out.users_out->mutable_data();
  if (user_bias) {
    out.state.user_bias_in = user_bias->data();
    out.user_bias_out.emplace(n);
    out.state.user_bias_out = out.user_bias_out->mutable_data();
  }
  return out;
}

py::object or_none(const std::optional<Array<float>>& a) { return a ? py::object(*a) : py::object(py::none()); }

template <class T>
Array<T> column(const std::vector<fedrecon::ClientStats>& s, T fedrecon::ClientStats::*field) {
  Array<T> out(static_cast<py::ssize_t>(s.size()));
  auto* p = out.mutable_data();
  for (std::size_t i = 0; i < s.size(); ++i) p[i] = s[i].*field;
  return out;
}

py::dict stats_dict(const std::vector<fedrecon::ClientStats>& s) {
  return py::dict("weight"_a = column(s, &fedrecon::ClientStats::weight),
                  "loss_sum"_a = column(s, &fedrecon::ClientStats::loss_sum),
                  "num_examples"_a = column(s, &fedrecon::ClientStats::num_examples),
                  "num_correct"_a = column(s, &fedrecon::ClientStats::num_correct),
                  "rows"_a = column(s, &fedrecon::ClientStats::rows),
                  "recon_examples"_a = column(s, &fedrecon::ClientStats::recon_examples),
                  "bytes"_a = column(s, &fedrecon::ClientStats::bytes),
                  "clipped"_a = column(s, &fedrecon::ClientStats::clipped),
                  "status"_a = column(s, &fedrecon::ClientStats::status));
}

// What the update kernels (train_round, client_updates) share.
struct UpdateCall {
  fedrecon::UpdateCodec codec;
  fedrecon::ModelView model;
  fedrecon::CsrView data;
  const std::int64_t* ids;
  py::ssize_t n;
  UserArrays users;
};

UpdateCall update_call(const Array<float>& item_factors, const std::optional<Array<float>>& item_bias,
                       float global_mean, const Array<std::int64_t>& indptr,
                       const Array<std::int32_t>& items, const Array<float>& ratings,
                       const Array<std::int64_t>& clients, const std::optional<Array<float>>& users,
                       const std::optional<Array<float>>& user_bias, const fedrecon::UpdateCodec& codec,
                       const OptionalIds& stream_ids) {
  UpdateCall c{codec, model_view(item_factors, item_bias, global_mean), csr_view(indptr, items, ratings, stream_ids),
               client_ids(clients), clients.shape(0), {}};
  c.users = user_arrays(users, user_bias, c.model, c.n);
  return c;
}

py::dict summary_dict(const fedrecon::RoundSummary& s) {
  return py::dict("total_weight"_a = s.total_weight, "loss_sum"_a = s.loss_sum,
                  "num_examples"_a = s.num_examples, "num_correct"_a = s.num_correct,
                  "num_reporting"_a = s.num_reporting, "num_nonfinite"_a = s.num_nonfinite,
                  "rows_sent"_a = s.rows_sent, "rows_aggregated"_a = s.rows_aggregated,
                  "bytes_sent"_a = s.bytes_sent, "num_clipped"_a = s.num_clipped);
}

// The server step a native round takes in place: SGD at lr, or with `velocity` SGD with
// momentum (the optimizer state's velocity arrays, updated in place). Validated here.
fedrecon::InPlaceStep in_place_step(const Array<float>& item_factors, const std::optional<Array<float>>& item_bias,
                                    const char* lr_name, double lr, double momentum, bool nesterov,
                                    const std::optional<Array<float>>& velocity,
                                    const std::optional<Array<float>>& velocity_bias) {
  if (!(std::isfinite(lr) && static_cast<float>(lr) > 0.0f && lr <= 3.4028234663852886e38))
    fail(std::string(lr_name) + " must be a finite float32 > 0 (at least 1.4e-45)");
  if (!item_factors.writeable() || (item_bias && !item_bias->writeable()))
    fail("the in-place step updates item_factors and item_bias: they must be writeable");
  fedrecon::InPlaceStep step;
  step.item_factors = const_cast<float*>(item_factors.data());
  step.item_bias = item_bias ? const_cast<float*>(item_bias->data()) : nullptr;
  step.lr = static_cast<float>(lr);
  if (!velocity) {
    if (velocity_bias) fail("velocity_bias needs velocity");
    return step;
  }
  if (!(momentum >= 0.0 && momentum < 1.0)) fail("momentum must be in [0, 1)");
  if (velocity->ndim() != 2 || velocity->shape(0) != item_factors.shape(0) || velocity->shape(1) != item_factors.shape(1))
    fail("velocity must have the shape of item_factors");
  if (!velocity->writeable()) fail("velocity is updated in place: it must be writeable");
  if (item_bias.has_value() != velocity_bias.has_value())
    fail("velocity_bias must be given exactly when item_bias is");
  if (velocity_bias && (velocity_bias->ndim() != 1 || velocity_bias->shape(0) != item_bias->shape(0) ||
                        !velocity_bias->writeable()))
    fail("velocity_bias must be a writeable array with the shape of item_bias");
  step.velocity = const_cast<float*>(velocity->data());
  step.velocity_bias = velocity_bias ? const_cast<float*>(velocity_bias->data()) : nullptr;
  step.momentum = static_cast<float>(momentum);
  step.nesterov = nesterov;
  return step;
}

py::tuple train_round(const Array<float>& item_factors, const std::optional<Array<float>>& item_bias,
                      float global_mean, const Array<std::int64_t>& indptr,
                      const Array<std::int32_t>& items, const Array<float>& ratings,
                      const Array<std::int64_t>& clients, const ClientConfig& config,
                      std::uint64_t seed, std::uint64_t round, int num_threads,
                      const std::optional<Array<float>>& users,
                      const std::optional<Array<float>>& user_bias, const fedrecon::UpdateCodec& codec,
                      const OptionalIds& stream_ids, double apply_lr, double momentum, bool nesterov,
                      const std::optional<Array<float>>& velocity,
                      const std::optional<Array<float>>& velocity_bias) {
  auto c = update_call(item_factors, item_bias, global_mean, indptr, items, ratings, clients, users,
                       user_bias, codec, stream_ids);
  const auto& model = c.model;
  const auto n = c.n;
  // apply_lr > 0: the server step in place on the model's arrays, no dense delta.
  fedrecon::InPlaceStep step;
  std::optional<Array<float>> delta, delta_bias;
  if (apply_lr != 0.0) {
    step = in_place_step(item_factors, item_bias, "apply_lr", apply_lr, momentum, nesterov, velocity, velocity_bias);
  } else {
    if (velocity || velocity_bias) fail("velocity needs apply_lr (the step in place)");
    delta.emplace(std::vector<py::ssize_t>{model.num_items, static_cast<py::ssize_t>(model.dim)});
    if (model.has_bias()) delta_bias.emplace(model.num_items);
  }
  float* delta_ptr = delta ? delta->mutable_data() : nullptr;
  float* delta_bias_ptr = delta_bias ? delta_bias->mutable_data() : nullptr;
  std::vector<fedrecon::ClientStats> stats(static_cast<std::size_t>(n));
  fedrecon::RoundSummary s;
  {
    py::gil_scoped_release release;
    s = fedrecon::train_round(model, c.data, c.ids, n, config, seed, round, num_threads, delta_ptr,
                              delta_bias_ptr, stats.data(), c.users.state, c.codec, step);
  }
  py::dict summary = summary_dict(s);
  if (step.item_factors != nullptr) summary["nonfinite_rows"] = s.nonfinite_rows;
  return py::make_tuple(or_none(delta), or_none(delta_bias), stats_dict(stats), summary,
                        or_none(c.users.users_out), or_none(c.users.user_bias_out));
}

py::tuple reduce_updates(const Array<std::int32_t>& rows, const Array<float>& values,
                         const std::optional<Array<float>>& bias_values, const Array<std::int64_t>& offsets,
                         const Array<double>& weights, std::int64_t num_items, int num_threads,
                         const std::optional<Array<float>>& noise_lo, const std::optional<Array<float>>& noise_step,
                         const std::optional<Array<std::uint64_t>>& noise_key, const fedrecon::UpdateCodec& codec) {
  if (values.ndim() != 2 || values.shape(1) < 1) fail("values must be 2-D (entries, dim)");
  if (rows.ndim() != 1 || rows.shape(0) != values.shape(0)) fail("rows must have one entry per row of values");
  if (bias_values && (bias_values->ndim() != 1 || bias_values->shape(0) != rows.shape(0)))
    fail("bias_values must have one entry per row of values");
  if (offsets.ndim() != 1 || offsets.shape(0) < 1) fail("offsets must be 1-D with num_clients + 1 entries");
  const auto n = offsets.shape(0) - 1;
  if (weights.ndim() != 1 || weights.shape(0) != n) fail("weights must have one entry per client");
  if (offsets.at(n) != rows.shape(0)) fail("offsets must end at the number of rows");
  if (num_items < 0) fail("num_items must be >= 0");
  const bool any_noise = noise_lo || noise_step || noise_key;
  if (any_noise && !(noise_lo && noise_step && noise_key))
    fail("noise_lo, noise_step and noise_key go together");
  if (any_noise && (noise_lo->ndim() != 1 || noise_lo->shape(0) != n || noise_step->ndim() != 1 ||
                    noise_step->shape(0) != n || noise_key->ndim() != 1 || noise_key->shape(0) != n))
    fail("noise_lo, noise_step and noise_key must have one entry per client");
  fedrecon::DenseNoise noise;
  if (any_noise) {
    noise.lo = noise_lo->data();
    noise.step = noise_step->data();
    noise.key = noise_key->data();
    noise.codec = codec;
  }
  const int dim = static_cast<int>(values.shape(1));
  Array<float> delta({static_cast<py::ssize_t>(num_items), static_cast<py::ssize_t>(dim)});
  std::optional<Array<float>> delta_bias;
  if (bias_values) delta_bias.emplace(static_cast<py::ssize_t>(num_items));
  float* d = delta.mutable_data();
  float* db = delta_bias ? delta_bias->mutable_data() : nullptr;
  const float* bv = bias_values ? bias_values->data() : nullptr;
  double total;
  {
    py::gil_scoped_release release;
    total = fedrecon::reduce_updates(num_items, dim, offsets.data(), n, rows.data(), values.data(), bv,
                                     weights.data(), num_threads, d, db, any_noise ? &noise : nullptr);
  }
  return py::make_tuple(delta, or_none(delta_bias), total);
}

// A NumPy array that takes over a result vector's buffer (no copy, so nothing large is copied
// or page-faulted while the GIL is held); the capsule frees it with the array.
template <class T>
Array<T> owned_array(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  if (v.empty()) return Array<T>(shape);
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return Array<T>(shape, heap->data(), owner);
}

py::dict client_updates(const Array<float>& item_factors, const std::optional<Array<float>>& item_bias,
                        float global_mean, const Array<std::int64_t>& indptr,
                        const Array<std::int32_t>& items, const Array<float>& ratings,
                        const Array<std::int64_t>& clients, const ClientConfig& config,
                        std::uint64_t seed, std::uint64_t round, int num_threads,
                        const std::optional<Array<float>>& users,
                        const std::optional<Array<float>>& user_bias, const fedrecon::UpdateCodec& codec,
                        const OptionalIds& stream_ids) {
  auto c = update_call(item_factors, item_bias, global_mean, indptr, items, ratings, clients, users,
                       user_bias, codec, stream_ids);
  const auto& model = c.model;
  const auto n = c.n;
  fedrecon::SparseUpdates u;
  {
    py::gil_scoped_release release;
    u = fedrecon::client_updates(model, c.data, c.ids, n, config, seed, round, num_threads, c.users.state, c.codec);
  }
  const auto nrows = static_cast<py::ssize_t>(u.rows.size());
  Array<float> values = owned_array(std::move(u.values), {nrows, static_cast<py::ssize_t>(model.dim)});
  py::object bias = py::none();
  if (model.has_bias()) bias = owned_array(std::move(u.bias_values), {nrows});
  py::object noise = py::none();
  if (!u.noise_key.empty()) {
    const auto m = static_cast<py::ssize_t>(u.noise_key.size());
    noise = py::dict("lo"_a = Array<float>(m, u.noise_lo.data()), "step"_a = Array<float>(m, u.noise_step.data()),
                     "key"_a = Array<std::uint64_t>(m, u.noise_key.data()));
  }
  const auto noffsets = static_cast<py::ssize_t>(u.offsets.size());
  return py::dict("offsets"_a = owned_array(std::move(u.offsets), {noffsets}),
                  "rows"_a = owned_array(std::move(u.rows), {nrows}), "values"_a = values,
                  "bias_values"_a = bias, "stats"_a = stats_dict(u.stats), "noise"_a = noise,
                  "users"_a = or_none(c.users.users_out), "user_bias"_a = or_none(c.users.user_bias_out));
}

// reconstruct_users (support set) and infer_users (all ratings): (users, user_bias or None).
using UsersKernel = void (*)(const fedrecon::ModelView&, const fedrecon::CsrView&, const std::int64_t*,
                             std::int64_t, const ClientConfig&, std::uint64_t, std::uint64_t, int,
                             float*, float*);
template <UsersKernel Kernel>
py::tuple users_of(const Array<float>& item_factors, const std::optional<Array<float>>& item_bias,
                   float global_mean, const Array<std::int64_t>& indptr,
                   const Array<std::int32_t>& items, const Array<float>& ratings,
                   const Array<std::int64_t>& clients, const ClientConfig& config,
                   std::uint64_t seed, std::uint64_t round, int num_threads, const OptionalIds& stream_ids) {
  const auto model = model_view(item_factors, item_bias, global_mean);
  const auto data = csr_view(indptr, items, ratings, stream_ids);
  const auto* ids = client_ids(clients);
  const auto n = clients.shape(0);
  Array<float> users({n, static_cast<py::ssize_t>(model.dim)});
  std::optional<Array<float>> user_bias;
  if (model.has_bias()) user_bias.emplace(n);
  float* users_ptr = users.mutable_data();
  float* bias_ptr = user_bias ? user_bias->mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    Kernel(model, data, ids, n, config, seed, round, num_threads, users_ptr, bias_ptr);
  }
  return py::make_tuple(users, or_none(user_bias));
}

py::dict evaluate_users(const Array<float>& item_factors, const std::optional<Array<float>>& item_bias,
                        float global_mean, const Array<std::int64_t>& indptr,
                        const Array<std::int32_t>& items, const Array<float>& ratings,
                        const Array<std::int64_t>& clients, const ClientConfig& config,
                        std::uint64_t seed, std::uint64_t round, int num_threads, std::int64_t k,
                        float relevance_threshold, const OptionalIds& stream_ids) {
  const auto model = model_view(item_factors, item_bias, global_mean);
  const auto data = csr_view(indptr, items, ratings, stream_ids);
  const auto* ids = client_ids(clients);
  const auto n = clients.shape(0);
  if (k < 0) fail("k must be >= 0 (0: no ranking metrics)");
  if (std::isnan(relevance_threshold)) fail("relevance_threshold must not be NaN");
  std::vector<fedrecon::EvalStats> stats(static_cast<std::size_t>(n));
  std::vector<fedrecon::RankStats> ranks(static_cast<std::size_t>(k > 0 ? n : 0));
  // Each client's top items (for catalogue coverage): no more columns than items.
  const std::int64_t width = std::min<std::int64_t>(k, std::max<std::int64_t>(model.num_items, 1));
  Array<std::int64_t> top({k > 0 ? n : 0, static_cast<py::ssize_t>(k > 0 ? width : 0)});
  {
    py::gil_scoped_release release;
    fedrecon::evaluate_users(model, data, ids, n, config, seed, round, num_threads, stats.data(), k,
                             relevance_threshold, k > 0 ? ranks.data() : nullptr,
                             k > 0 ? top.mutable_data() : nullptr);
  }
  Array<double> sq(n), abs_err(n);
  Array<std::int64_t> count(n), correct(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    sq.mutable_data()[i] = stats[static_cast<std::size_t>(i)].sq_err_sum;
    abs_err.mutable_data()[i] = stats[static_cast<std::size_t>(i)].abs_err_sum;
    count.mutable_data()[i] = stats[static_cast<std::size_t>(i)].num_examples;
    correct.mutable_data()[i] = stats[static_cast<std::size_t>(i)].num_correct;
  }
  py::dict out("sq_err_sum"_a = sq, "abs_err_sum"_a = abs_err, "num_examples"_a = count,
               "num_correct"_a = correct);
  if (k > 0) {
    Array<std::int64_t> relevant(n), hits(n);
    Array<double> ndcg(n), ap(n), rr(n);
    for (py::ssize_t i = 0; i < n; ++i) {
      const auto& r = ranks[static_cast<std::size_t>(i)];
      relevant.mutable_data()[i] = r.num_relevant;
      hits.mutable_data()[i] = r.hits;
      ndcg.mutable_data()[i] = r.ndcg;
      ap.mutable_data()[i] = r.ap;
      rr.mutable_data()[i] = r.rr;
    }
    out["num_relevant"] = relevant;
    out["hits"] = hits;
    out["ndcg"] = ndcg;
    out["ap"] = ap;
    out["rr"] = rr;
    out["top_items"] = top;
  }
  return out;
}

py::tuple recommend_users(const Array<float>& item_factors, const std::optional<Array<float>>& item_bias,
                          float global_mean, const Array<std::int64_t>& indptr,
                          const Array<std::int32_t>& items, const Array<float>& ratings,
                          const Array<std::int64_t>& clients, const ClientConfig& config,
                          std::uint64_t seed, std::uint64_t round, int num_threads, std::int64_t k,
                          bool exclude_seen) {
  const auto model = model_view(item_factors, item_bias, global_mean);
  const auto data = csr_view(indptr, items, ratings);
  const auto* ids = client_ids(clients);
  const auto n = clients.shape(0);
  if (k < 1) fail("k must be >= 1");
  Array<std::int64_t> top({n, static_cast<py::ssize_t>(k)});
  Array<float> scores({n, static_cast<py::ssize_t>(k)});
  std::int64_t* top_ptr = top.mutable_data();
  float* scores_ptr = scores.mutable_data();
  {
    py::gil_scoped_release release;
    fedrecon::recommend_users(model, data, ids, n, config, seed, round, num_threads, k, exclude_seen,
                              top_ptr, scores_ptr);
  }
  return py::make_tuple(top, scores);
}

Array<std::int64_t> sample_clients(std::int64_t num_clients, std::int64_t m, std::uint64_t seed,
                                   std::uint64_t round) {
  if (num_clients < 0 || m < 0) fail("num_clients and clients_per_round must be >= 0");
  Array<std::int64_t> out(static_cast<py::ssize_t>(std::min(num_clients, m)));
  std::int64_t* p = out.mutable_data();
  {
    py::gil_scoped_release release;
    fedrecon::sample_clients(num_clients, m, seed, round, p);
  }
  return out;
}

// The native training loop: the model's arrays are updated in place; one column per field of
// the rounds' records.
py::dict train_rounds(Array<float>& item_factors, std::optional<Array<float>>& item_bias, float global_mean,
                      const Array<std::int64_t>& indptr, const Array<std::int32_t>& items,
                      const Array<float>& ratings, const ClientConfig& config,
                      const fedrecon::UpdateCodec& codec, std::uint64_t seed, std::uint64_t first_round,
                      std::int64_t num_rounds, std::int64_t clients_per_round, double lr, int num_threads,
                      double momentum, bool nesterov, const std::optional<Array<float>>& velocity,
                      const std::optional<Array<float>>& velocity_bias) {
  const auto model = model_view(item_factors, item_bias, global_mean);
  const auto data = csr_view(indptr, items, ratings);
  const fedrecon::InPlaceStep step = in_place_step(item_factors, item_bias, "lr", lr, momentum, nesterov, velocity, velocity_bias);
  if (num_rounds < 0) fail("num_rounds must be >= 0");
  if (clients_per_round < 1) fail("clients_per_round must be >= 1");
  std::vector<fedrecon::RoundRecord> records;
  {
    py::gil_scoped_release release;
    records = fedrecon::train_rounds(model, data, config, codec, seed, first_round, num_rounds,
                                     clients_per_round, step, num_threads);
  }
  const auto n = static_cast<py::ssize_t>(records.size());
  const auto col = [&](auto get) {
    using T = decltype(get(records[0]));
    Array<T> out(n);
    for (py::ssize_t i = 0; i < n; ++i) out.mutable_data()[i] = get(records[static_cast<std::size_t>(i)]);
    return out;
  };
  using R = fedrecon::RoundRecord;
  return py::dict(
      "clients"_a = col([](const R& r) { return r.num_sampled; }),
      "seconds"_a = col([](const R& r) { return r.seconds; }),
      "total_weight"_a = col([](const R& r) { return r.summary.total_weight; }),
      "loss_sum"_a = col([](const R& r) { return r.summary.loss_sum; }),
      "num_examples"_a = col([](const R& r) { return r.summary.num_examples; }),
      "num_correct"_a = col([](const R& r) { return r.summary.num_correct; }),
      "num_reporting"_a = col([](const R& r) { return r.summary.num_reporting; }),
      "num_nonfinite"_a = col([](const R& r) { return r.summary.num_nonfinite; }),
      "rows_sent"_a = col([](const R& r) { return r.summary.rows_sent; }),
      "rows_aggregated"_a = col([](const R& r) { return r.summary.rows_aggregated; }),
      "bytes_sent"_a = col([](const R& r) { return r.summary.bytes_sent; }),
      "num_clipped"_a = col([](const R& r) { return r.summary.num_clipped; }),
      "nonfinite_rows"_a = col([](const R& r) { return r.summary.nonfinite_rows; }));
}

double mf_sgd_epoch(Array<float>& users, std::optional<Array<float>>& user_bias, Array<float>& items,
                    std::optional<Array<float>>& item_bias, float global_mean,
                    const Array<std::int64_t>& user_ids, const Array<std::int32_t>& item_ids,
                    const Array<float>& ratings, int batch_size, float lr, float l2) {
  if (users.ndim() != 2 || items.ndim() != 2 || users.shape(1) != items.shape(1))
    fail("users and items must be 2-D with the same number of columns");
  if (user_ids.ndim() != 1 || item_ids.ndim() != 1 || ratings.ndim() != 1 ||
      user_ids.shape(0) != ratings.shape(0) || item_ids.shape(0) != ratings.shape(0))
    fail("user_ids, item_ids and ratings must be 1-D arrays of the same length");
  if (static_cast<bool>(user_bias) != static_cast<bool>(item_bias))
    fail("user_bias and item_bias must be given together");
  if (user_bias && (user_bias->ndim() != 1 || user_bias->shape(0) != users.shape(0)))
    fail("user_bias must have shape (num_users,)");
  if (item_bias && (item_bias->ndim() != 1 || item_bias->shape(0) != items.shape(0)))
    fail("item_bias must have shape (num_items,)");
  fedrecon::MfTables t;
  t.users = users.mutable_data();
  t.num_users = users.shape(0);
  t.items = items.mutable_data();
  t.num_items = items.shape(0);
  t.dim = static_cast<int>(users.shape(1));
  t.global_mean = global_mean;
  if (user_bias) {
    t.user_bias = user_bias->mutable_data();
    t.item_bias = item_bias->mutable_data();
  }
  fedrecon::MfSgdConfig config;
  config.batch_size = batch_size;
  config.lr = lr;
  config.l2 = l2;
  py::gil_scoped_release release;
  return fedrecon::mf_sgd_epoch(t, user_ids.data(), item_ids.data(), ratings.data(), ratings.shape(0), config);
}

template <class Enum>
void enum_property(py::class_<ClientConfig>& cls, const char* name, Enum ClientConfig::*field) {
  cls.def_property(
      name, [field](const ClientConfig& c) { return static_cast<int>(c.*field); },
      [field](ClientConfig& c, int v) { c.*field = static_cast<Enum>(v); });
}

}  // namespace

PYBIND11_MODULE(FEDRECON_MODULE, m) {
  m.doc() = "fedrecon_fast native kernels (private: use the fedrecon_fast package API)";
  m.attr("__version__") = FEDRECON_VERSION;
  // Runtime dispatch (fedrecon_fast._native): what this module was compiled for, and what the CPU runs.
  m.attr("TARGET") = fedrecon::compiled_target();
  m.attr("TARGET_FLAGS") = fedrecon::compiled_flags();
#if defined(__clang__)
  m.attr("COMPILER") = "clang " __clang_version__;
#elif defined(__GNUC__)
  m.attr("COMPILER") = "gcc " __VERSION__;
#else
  m.attr("COMPILER") = "unknown";
#endif
  m.def("cpu_supports", &fedrecon::cpu_supports, "target"_a);
  m.def("cpu_features", &fedrecon::cpu_features);

  // module_local: every dispatched module registers its own types (several may be loaded).
  py::class_<ClientConfig> cfg(m, "ClientConfig", py::module_local());
  cfg.def(py::init<>())
      .def_readwrite("batch_size", &ClientConfig::batch_size)
      .def_readwrite("support_fraction", &ClientConfig::support_fraction)
      .def_readwrite("reshuffle", &ClientConfig::reshuffle)
      .def_readwrite("init_scale", &ClientConfig::init_scale)
      .def_readwrite("recon_epochs", &ClientConfig::recon_epochs)
      .def_readwrite("recon_steps_max", &ClientConfig::recon_steps_max)
      .def_readwrite("recon_lr", &ClientConfig::recon_lr)
      .def_readwrite("recon_l2", &ClientConfig::recon_l2)
      .def_readwrite("ridge", &ClientConfig::ridge)
      .def_readwrite("update_epochs", &ClientConfig::update_epochs)
      .def_readwrite("update_steps_max", &ClientConfig::update_steps_max)
      .def_readwrite("client_lr", &ClientConfig::client_lr)
      .def_readwrite("update_l2", &ClientConfig::update_l2)
      .def_readwrite("joint", &ClientConfig::joint)
      .def_readwrite("user_default", &ClientConfig::user_default)
      .def_readwrite("user_bias_default", &ClientConfig::user_bias_default);
  enum_property(cfg, "split", &ClientConfig::split);
  enum_property(cfg, "recon", &ClientConfig::recon);
  enum_property(cfg, "init", &ClientConfig::init);
  enum_property(cfg, "weighting", &ClientConfig::weighting);

  py::class_<fedrecon::UpdateCodec>(m, "UpdateCodec", py::module_local())
      .def(py::init<>())
      .def_readwrite("bits", &fedrecon::UpdateCodec::bits)
      .def_readwrite("row_scaling", &fedrecon::UpdateCodec::row_scaling)
      .def_readwrite("hadamard", &fedrecon::UpdateCodec::hadamard)
      .def_readwrite("sparse", &fedrecon::UpdateCodec::sparse)
      .def_readwrite("threshold", &fedrecon::UpdateCodec::threshold)
      .def_readwrite("clip", &fedrecon::UpdateCodec::clip);

  m.def("derive_seed", &fedrecon::derive_seed, "seed"_a, "round"_a, "client"_a, "stream"_a);
  m.def("sample_clients", &sample_clients, "num_clients"_a, "clients_per_round"_a, "seed"_a, "round"_a);
  m.def("max_threads", &fedrecon::max_threads, "Most threads one call uses (4 x the hardware threads).");

#define FEDRECON_COHORT_ARGS                                                                     \
  "item_factors"_a.noconvert(), "item_bias"_a.noconvert().none(true), "global_mean"_a,           \
      "indptr"_a.noconvert(), "items"_a.noconvert(), "ratings"_a.noconvert(),                    \
      "clients"_a.noconvert(), "config"_a, "seed"_a, "round"_a, "num_threads"_a
#define FEDRECON_UPDATE_ARGS                                                                     \
  "users"_a.noconvert().none(true) = py::none(), "user_bias"_a.noconvert().none(true) = py::none(), \
      "codec"_a = fedrecon::UpdateCodec()
#define FEDRECON_STREAM_IDS "stream_ids"_a.noconvert().none(true) = py::none()
#define FEDRECON_MOMENTUM_ARGS                                                                   \
  "momentum"_a = 0.0, "nesterov"_a = false, "velocity"_a.noconvert().none(true) = py::none(),    \
      "velocity_bias"_a.noconvert().none(true) = py::none()
  m.def("train_round", &train_round, FEDRECON_COHORT_ARGS, FEDRECON_UPDATE_ARGS, FEDRECON_STREAM_IDS,
        "apply_lr"_a = 0.0, FEDRECON_MOMENTUM_ARGS);
  m.def("train_rounds", &train_rounds, "item_factors"_a.noconvert(), "item_bias"_a.noconvert().none(true),
        "global_mean"_a, "indptr"_a.noconvert(), "items"_a.noconvert(), "ratings"_a.noconvert(), "config"_a,
        "codec"_a, "seed"_a, "first_round"_a, "num_rounds"_a, "clients_per_round"_a, "lr"_a, "num_threads"_a,
        FEDRECON_MOMENTUM_ARGS);
  m.def("client_updates", &client_updates, FEDRECON_COHORT_ARGS, FEDRECON_UPDATE_ARGS, FEDRECON_STREAM_IDS);
  m.def("reduce_updates", &reduce_updates, "rows"_a.noconvert(), "values"_a.noconvert(),
        "bias_values"_a.noconvert().none(true), "offsets"_a.noconvert(), "weights"_a.noconvert(),
        "num_items"_a, "num_threads"_a, "noise_lo"_a.noconvert().none(true) = py::none(),
        "noise_step"_a.noconvert().none(true) = py::none(), "noise_key"_a.noconvert().none(true) = py::none(),
        "codec"_a = fedrecon::UpdateCodec());
#undef FEDRECON_UPDATE_ARGS
  m.def("reconstruct_users", &users_of<fedrecon::reconstruct_users>, FEDRECON_COHORT_ARGS, FEDRECON_STREAM_IDS);
  m.def("evaluate_users", &evaluate_users, FEDRECON_COHORT_ARGS, "k"_a = 0, "relevance_threshold"_a = 4.0f,
        FEDRECON_STREAM_IDS);
  m.def("infer_users", &users_of<fedrecon::infer_users>, FEDRECON_COHORT_ARGS, FEDRECON_STREAM_IDS);
  m.def("recommend_users", &recommend_users, FEDRECON_COHORT_ARGS, "k"_a, "exclude_seen"_a = true);
#undef FEDRECON_COHORT_ARGS
#undef FEDRECON_STREAM_IDS

  bind_compression(m);
  bind_aggregation(m);

  m.def("mf_sgd_epoch", &mf_sgd_epoch, "users"_a.noconvert(), "user_bias"_a.noconvert().none(true),
        "items"_a.noconvert(), "item_bias"_a.noconvert().none(true), "global_mean"_a,
        "user_ids"_a.noconvert(), "item_ids"_a.noconvert(), "ratings"_a.noconvert(), "batch_size"_a,
        "lr"_a, "l2"_a);
}
