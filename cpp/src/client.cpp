#include "fedrecon/client.hpp"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fedrecon/cache.hpp"
#include "fedrecon/finite.hpp"
#include "fedrecon/rng.hpp"

namespace fedrecon {

namespace {

using VecMap = Eigen::Map<Eigen::VectorXf>;
using CVecMap = Eigen::Map<const Eigen::VectorXf>;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// Sets pos/off to positions[0, count) cut into batches of `batch` (off[0] = 0).
void cut_batches(const std::int64_t* positions, std::int64_t count, std::int64_t batch,
                 UninitVector<std::int64_t>& pos, UninitVector<std::int64_t>& off) {
  pos.assign(positions, positions + count);
  off.resize(static_cast<std::size_t>((count + batch - 1) / batch + 1));
  std::int64_t* o = off.data();
  *o++ = 0;
  for (std::int64_t k = batch; k < count; k += batch) *o++ = k;
  if (count > 0) *o = count;
}

// Rows are padded to a multiple of 8 floats and the hot loops are compiled for each padded size,
// so Eigen emits whole-register (AVX) dot products and axpys with no scalar tail; sizes above 128
// take the dynamic path. The zero padding never changes a result.
template <int P>
using Vec = Eigen::Matrix<float, P, 1>;

// Copies a dim-float row of V into a padded working row (stride padded_dim(dim)) and zeroes its
// padding. Inline vector moves: a memmove call per 200-byte row cost more than the copy.
inline void gather_padded(const float* src, int dim, float* dst) {
  Eigen::Map<Eigen::Matrix<float, 8, 1>>(dst + padded_dim(dim) - 8).setZero();
  Eigen::Map<Eigen::VectorXf>(dst, dim) = Eigen::Map<const Eigen::VectorXf>(src, dim);
}

template <int P, class F>
void with_padded(int p, F&& f) {
  if constexpr (P > 128) {
    f(std::integral_constant<int, Eigen::Dynamic>{});
  } else {
    if (p == P) return f(std::integral_constant<int, P>{});
    with_padded<P + 8>(p, std::forward<F>(f));
  }
}

// Number of steps of `epochs` passes over `batches` batches, capped by steps_max (> 0).
std::int64_t schedule_steps(std::int64_t batches, int epochs, std::int64_t steps_max) {
  std::int64_t steps = batches * std::max(0, epochs);
  if (steps_max > 0) steps = std::min(steps, steps_max);
  return steps;
}

// The SGD steps of an SGD reconstruction over the support rows (row k of the batches at
// rows[k], P floats: V's own rows or padded copies), cycling the batches; returns the examples
// seen. U and G are fixed-size locals or maps of the scratch.
struct SgdChain {
  const float* const* rows;
  const float* y;
  const std::int64_t* off;
  std::int64_t batches, steps, stride;
  float lr, l2x2;
  bool bias;

  template <class U, class G>
  std::int64_t run(U& u, G& g, float& bu_ref) const {
    using Row = Eigen::Map<const Vec<U::SizeAtCompileTime>>;
    float bu = bu_ref;
    std::int64_t examples = 0;
    const auto error = [&](std::int64_t k) {
      const float err = u.dot(Row(rows[k], stride)) - y[k];
      return bias ? err + bu : err;
    };
    for (std::int64_t s = 0, batch = 0; s < steps; ++s, batch = batch + 1 == batches ? 0 : batch + 1) {
      const std::int64_t lo = off[batch];
      const std::int64_t hi = off[batch + 1];
      // The gradient starts from the batch's first row, not from zero (0 + x == x up to the
      // sign of a zero): zeroing a local compiled to a memset call per step.
      float gb = error(lo);
      g = gb * Row(rows[lo], stride);
      for (std::int64_t k = lo + 1; k < hi; ++k) {
        const float err = error(k);
        g += err * Row(rows[k], stride);
        gb += err;
      }
      // Mean squared error of the batch: d/du = 2/m sum err v; L2 adds 2 * l2 * u.
      examples += hi - lo;
      const float scale = 2.0f / static_cast<float>(hi - lo);
      u -= lr * (scale * g + l2x2 * u);
      if (bias) bu -= lr * scale * gb;
    }
    bu_ref = bu;
    return examples;
  }
};

}  // namespace

void validate_config(const ClientConfig& c) {
  require(c.batch_size >= 1, "batch_size must be >= 1");
  require(c.support_fraction >= 0.0f && c.support_fraction <= 1.0f,
          "support_fraction must be in [0, 1]");
  require(c.init_scale >= 0.0f && std::isfinite(c.init_scale), "init_scale must be finite and >= 0");
  require(c.recon_epochs >= 0, "recon_epochs must be >= 0");
  require(c.update_epochs >= 0, "update_epochs must be >= 0");
  require(c.recon_lr >= 0.0f && std::isfinite(c.recon_lr), "recon_lr must be finite and >= 0");
  require(c.client_lr >= 0.0f && std::isfinite(c.client_lr), "client_lr must be finite and >= 0");
  require(c.recon_l2 >= 0.0f && std::isfinite(c.recon_l2), "recon_l2 must be finite and >= 0");
  require(c.update_l2 >= 0.0f && std::isfinite(c.update_l2), "update_l2 must be finite and >= 0");
  require(std::isfinite(c.ridge) && (c.recon != ReconMethod::Exact || c.ridge > 0.0f),
          "ridge must be finite and > 0 for exact reconstruction");
  const int split = static_cast<int>(c.split);
  require(split >= 0 && split <= 2, "split must be batches, random or reuse");
  const int recon = static_cast<int>(c.recon);
  require(recon >= 0 && recon <= 1, "recon must be sgd or exact");
  const int init = static_cast<int>(c.init);
  require(init >= 0 && init <= 1, "init must be uniform or zeros");
  const int weighting = static_cast<int>(c.weighting);
  require(weighting >= 0 && weighting <= 1, "weighting must be examples or uniform");
  for (const float x : c.user_default) require(std::isfinite(x), "user_default must be finite");
  require(std::isfinite(c.user_bias_default), "user_bias_default must be finite");
}

ClientWorker::ClientWorker(const ModelView& model)
    : model_(model),
      dim_(model.dim),
      pdim_(padded_dim(model.dim)),
      u_(static_cast<std::size_t>(padded_dim(model.dim)), 0.0f),
      grad_u_(static_cast<std::size_t>(padded_dim(model.dim)), 0.0f),
      item_to_local_(static_cast<std::size_t>(model.num_items), -1) {}

void ClientWorker::rebind(const ModelView& model) {
  if (model.dim != dim_) {
    dim_ = model.dim;
    pdim_ = padded_dim(model.dim);
    u_.assign(static_cast<std::size_t>(pdim_), 0.0f);
    grad_u_.assign(static_cast<std::size_t>(pdim_), 0.0f);
  }
  if (model.num_items != model_.num_items)
    item_to_local_.assign(static_cast<std::size_t>(model.num_items), -1);
  model_ = model;
}

void ClientWorker::split(const CsrView& data, std::int64_t client, const ClientConfig& config,
                         std::uint64_t seed, std::uint64_t round) {
  split(data, client, config, seed, round, data.stream_id(client));
}

void ClientWorker::split(const CsrView& data, std::int64_t client, const ClientConfig& config,
                         std::uint64_t seed, std::uint64_t round, std::uint64_t stream_client) {
  const std::int64_t begin = data.indptr[client];
  const std::int64_t n = data.indptr[client + 1] - begin;
  items_ = data.items + begin;
  ratings_ = data.ratings + begin;
  // One branch-free pass (it vectorises; a throw inside the loop kept it scalar, 2% of a round),
  // then the first bad id for the message. As unsigned 32-bit, a negative id is >= 2^31.
  const auto limit = static_cast<std::uint32_t>(std::min<std::int64_t>(model_.num_items, std::int64_t{1} << 31));
  std::uint32_t bad = 0;
  for (std::int64_t k = 0; k < n; ++k) bad |= static_cast<std::uint32_t>(static_cast<std::uint32_t>(items_[k]) >= limit);
  for (std::int64_t k = 0; bad && k < n; ++k) {
    if (items_[k] < 0 || items_[k] >= model_.num_items)
      throw std::out_of_range("item id " + std::to_string(items_[k]) + " of client " +
                              std::to_string(client) + " is outside [0, " +
                              std::to_string(model_.num_items) + ")");
  }

  perm_.resize(static_cast<std::size_t>(n));
  for (std::int64_t k = 0; k < n; ++k) perm_[static_cast<std::size_t>(k)] = k;
  if (config.reshuffle || config.split == SplitMode::Random) {
    // Fisher-Yates with the client's own stream: a pure function of (seed, round, client).
    // Position k = n-1 .. 1 swaps with Rng.below(k + 1), the draws taken up front (below_descending).
    if (n > 1) {
      draws_.resize(static_cast<std::size_t>(n - 1));
      below_descending(derive_seed(seed, round, stream_client, kStreamSplit), static_cast<std::uint64_t>(n), n - 1,
                       draws_.data());
      for (std::int64_t k = n - 1; k > 0; --k)
        std::swap(perm_[static_cast<std::size_t>(k)], perm_[draws_[static_cast<std::size_t>(n - 1 - k)]]);
    }
  }

  const std::int64_t b = config.batch_size;
  switch (config.split) {
    case SplitMode::Batches: {
      // TFF split_dataset: batch k of the (fixed-order) data goes to support if k is even.
      // Sized first and written in place (an append per batch of 5 was 5% of a round).
      const std::int64_t batches = (n + b - 1) / b;
      std::int64_t ns = 0;
      for (std::int64_t k = 0; k < batches; k += 2) ns += std::min(b, n - k * b);
      sup_pos_.resize(static_cast<std::size_t>(ns));
      qry_pos_.resize(static_cast<std::size_t>(n - ns));
      sup_off_.resize(static_cast<std::size_t>((batches + 1) / 2 + 1));
      qry_off_.resize(static_cast<std::size_t>(batches / 2 + 1));
      sup_off_[0] = qry_off_[0] = 0;
      std::int64_t* pos[2] = {sup_pos_.data(), qry_pos_.data()};
      std::int64_t* off[2] = {sup_off_.data() + 1, qry_off_.data() + 1};
      std::int64_t filled[2] = {0, 0};
      for (std::int64_t k = 0, batch = 0; k < n; k += b, ++batch) {
        const int set = static_cast<int>(batch % 2);
        const std::int64_t len = std::min(b, n - k);
        std::copy_n(perm_.data() + k, len, pos[set] + filled[set]);
        filled[set] += len;
        *off[set]++ = filled[set];
      }
      break;
    }
    case SplitMode::Random: {
      auto ns = static_cast<std::int64_t>(std::floor(config.support_fraction * static_cast<double>(n) + 0.5));
      if (n >= 2) ns = std::min(std::max<std::int64_t>(ns, 1), n - 1);  // both sets non-empty
      ns = std::min(ns, n);
      cut_batches(perm_.data(), ns, b, sup_pos_, sup_off_);
      cut_batches(perm_.data() + ns, n - ns, b, qry_pos_, qry_off_);
      break;
    }
    case SplitMode::Reuse:
      cut_batches(perm_.data(), n, b, sup_pos_, sup_off_);
      cut_batches(perm_.data(), n, b, qry_pos_, qry_off_);
      break;
  }
}

float ClientWorker::predict_row(const float* v, float item_bias) const {
  float p = CVecMap(u_.data(), dim_).dot(CVecMap(v, dim_)) + model_.global_mean;
  if (model_.has_bias()) p += bu_ + item_bias;
  return p;
}

void ClientWorker::reconstruct(const ClientConfig& config, std::uint64_t seed, std::uint64_t round,
                               std::int64_t client, const float* init_u, float init_bu) {
  // Reset the whole padded vector: a previous client's overflow (inf * 0 = NaN) must not leak
  // into this one through the padding.
  std::fill(u_.begin(), u_.end(), 0.0f);
  // The prefetch request is for this call only (the worker outlives the data it points into).
  const std::int32_t* next_items = next_items_;
  const std::int64_t next_n = next_n_;
  next_n_ = 0;
  VecMap u(u_.data(), dim_);
  bu_ = 0.0f;
  const bool bias = model_.has_bias();
  const std::int64_t K = dim_;
  const bool has_default = !config.user_default.empty();

  if (config.recon == ReconMethod::Exact) {
    // Ridge solution of the support set: (X^T X + ridge I) w = X^T (r - offsets), with
    // x = [v_i, 1] when the model has a user bias. Gram in float, solve in double.
    const std::int64_t D = K + (bias ? 1 : 0);
    Eigen::MatrixXd A = Eigen::MatrixXd::Identity(D, D) * static_cast<double>(config.ridge);
    Eigen::VectorXd rhs = Eigen::VectorXd::Zero(D);
    const std::int64_t ns = num_support();
    if (ns > 0) {
      Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> X(ns, D);
      Eigen::VectorXf y(ns);
      for (std::int64_t k = 0; k < ns; ++k) {
        const std::int64_t p = sup_pos_[static_cast<std::size_t>(k)];
        const std::int32_t item = items_[p];
        X.row(k).head(K) = CVecMap(model_.row(item), K).transpose();
        float target = ratings_[p] - model_.global_mean;
        if (bias) {
          X(k, K) = 1.0f;
          target -= model_.item_bias[item];
        }
        y[k] = target;
      }
      Eigen::MatrixXf G = Eigen::MatrixXf::Zero(D, D);
      G.selfadjointView<Eigen::Lower>().rankUpdate(X.transpose());
      A += G.selfadjointView<Eigen::Lower>().toDenseMatrix().cast<double>();
      rhs = (X.transpose() * y).cast<double>();
    }
    if (has_default) {  // the learned default is the prior mean: ridge * |w - default|^2
      for (std::int64_t k = 0; k < K; ++k) rhs[k] += static_cast<double>(config.ridge) * config.user_default[static_cast<std::size_t>(k)];
      if (bias) rhs[K] += static_cast<double>(config.ridge) * config.user_bias_default;
    }
    Eigen::LLT<Eigen::MatrixXd> llt(A);
    const Eigen::VectorXd w = llt.solve(rhs);
    u = w.head(K).cast<float>();
    if (bias) bu_ = static_cast<float>(w[K]);
    recon_examples_ = ns;
    return;
  }

  if (init_u != nullptr) {  // a stored embedding, then the learned default
    u = CVecMap(init_u, K);
    bu_ = init_bu;
  } else if (has_default) {
    u = CVecMap(config.user_default.data(), K);
    bu_ = config.user_bias_default;
  } else if (config.init == InitMode::Uniform) {
    Rng rng(derive_seed(seed, round, static_cast<std::uint64_t>(client), kStreamInit));
    for (std::int64_t k = 0; k < K; ++k) u[k] = (2.0f * rng.uniform01() - 1.0f) * config.init_scale;
  } else {
    u.setZero();
  }

  // The support rows and targets in batch order. Rows of V whose stride is already padded
  // (dim a multiple of 8, or train_rounds' padded copy) are read in place: gathering copies
  // cost more than the chain's first reads of the rows themselves (10% of a paper round on
  // one thread, measured). Other rows are gathered once into padded copies.
  const std::int64_t ns = num_support();
  const std::int64_t P = pdim_;
  const bool in_place = model_.stride() == P;
  if (!in_place) sup_rows_.resize(static_cast<std::size_t>(ns * P));
  sup_ptr_.resize(static_cast<std::size_t>(ns));
  sup_y_.resize(static_cast<std::size_t>(ns));
  // The branches on in_place and bias hoisted out of the per-rating loop: with them inside,
  // a round on one thread was 3% slower (six side-by-side pairs).
  const auto fill = [&](auto in_place_c, auto bias_c) {
    const float* V = model_.item_factors;
    const std::int64_t S = model_.stride();
    for (std::int64_t k = 0; k < ns; ++k) {
      const std::int64_t p = sup_pos_[static_cast<std::size_t>(k)];
      const std::int32_t item = items_[p];
      if constexpr (decltype(in_place_c)::value) {
        sup_ptr_[static_cast<std::size_t>(k)] = V + item * S;
      } else {
        gather_padded(V + item * S, dim_, sup_rows_.data() + k * P);
        sup_ptr_[static_cast<std::size_t>(k)] = sup_rows_.data() + k * P;
      }
      float y = ratings_[p] - model_.global_mean;
      if constexpr (decltype(bias_c)::value) y -= model_.item_bias[item];
      sup_y_[static_cast<std::size_t>(k)] = y;
    }
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (in_place)
    bias ? fill(Yes{}, Yes{}) : fill(Yes{}, No{});
  else
    bias ? fill(No{}, Yes{}) : fill(No{}, No{});
  for (std::int64_t k = 0; k < next_n; ++k)
    prefetch_bytes(model_.row(next_items[k]), static_cast<std::size_t>(K) * sizeof(float));
  with_padded<8>(pdim_, [&](auto pc) { reconstruct_sgd<decltype(pc)::value>(config); });
}

template <int P>
void ClientWorker::reconstruct_sgd(const ClientConfig& config) {
  const std::int64_t batches = static_cast<std::int64_t>(sup_off_.size()) - 1;
  const std::int64_t steps = schedule_steps(batches, config.recon_epochs, config.recon_steps_max);
  const SgdChain chain{sup_ptr_.data(), sup_y_.data(), sup_off_.data(), batches, steps,
                       pdim_, config.recon_lr, 2.0f * config.recon_l2, model_.has_bias()};
  Eigen::Map<Vec<P>> u(u_.data(), pdim_);
  if constexpr (P == Eigen::Dynamic) {
    Eigen::Map<Vec<P>> g(grad_u_.data(), pdim_);
    recon_examples_ = chain.run(u, g, bu_);
  } else {
    // Fixed-size locals cannot alias the members, so the compiler keeps g in registers (u in
    // its own stack slots); through the members every step stored and reloaded both.
    Vec<P> u_reg = u, g;
    recon_examples_ = chain.run(u_reg, g, bu_);
    u = u_reg;
  }
}

void ClientWorker::touched_rows(std::int64_t steps) {
  const std::int64_t batches = static_cast<std::int64_t>(qry_off_.size()) - 1;
  rows_.clear();
  const std::int64_t used = qry_off_[static_cast<std::size_t>(std::min(steps, batches))];
  qry_local_.resize(static_cast<std::size_t>(used));
  for (std::int64_t k = 0; k < used; ++k) {
    const std::int32_t item = items_[qry_pos_[static_cast<std::size_t>(k)]];
    std::int32_t& slot = item_to_local_[static_cast<std::size_t>(item)];
    if (slot < 0) {
      slot = static_cast<std::int32_t>(rows_.size());
      rows_.push_back(item);
    }
    qry_local_[static_cast<std::size_t>(k)] = slot;
  }
  for (std::int32_t item : rows_) item_to_local_[static_cast<std::size_t>(item)] = -1;
}

void ClientWorker::finish_update(const ClientConfig& config, std::int64_t steps, bool finite,
                                 ClientStats& stats) {
  stats.rows = static_cast<std::int64_t>(rows_.size());
  stats.recon_examples = recon_examples_;
  if (!finite || !std::isfinite(stats.loss_sum)) {
    // TFF semantics: a non-finite update is dropped.
    stats.status = kNonFinite;
    stats.weight = 0.0;
    stats.rows = 0;
    rows_.clear();
    local_bias_.clear();
  } else if (num_query() == 0 || steps == 0) {
    stats.status = kNoQuery;
    stats.weight = 0.0;
  } else {
    stats.weight = config.weighting == Weighting::Examples ? static_cast<double>(num_query()) : 1.0;
  }
}

ClientStats ClientWorker::update_compact(const ClientConfig& config) {
  ClientStats stats;
  const bool bias = model_.has_bias();
  const std::int64_t batches = static_cast<std::int64_t>(qry_off_.size()) - 1;
  const std::int64_t steps = schedule_steps(batches, config.update_epochs, config.update_steps_max);
  touched_rows(steps);
  const auto nrows = rows_.size();

  // u.v_j once per touched row (the only K-length work of the update), and |u|^2. The dot runs
  // over the padded size (u's padding is zero): on V's rows in place when their stride is
  // padded, else on a padded copy, so every path gets the same bits. A dynamic-size dot with
  // its scalar tail was half of this function.
  const CVecMap u(u_.data(), dim_);
  const float uu = u.squaredNorm();
  p0_.resize(nrows);
  with_padded<8>(pdim_, [&](auto pc) {
    using Row = Eigen::Map<const Vec<decltype(pc)::value>>;
    const Row up(u_.data(), pdim_);
    if (model_.stride() == pdim_) {
      for (std::size_t r = 0; r < nrows; ++r) p0_[r] = up.dot(Row(model_.row(rows_[r]), pdim_));
    } else {
      float* copy = grad_u_.data();  // pdim_ floats, free during the update
      for (std::size_t r = 0; r < nrows; ++r) {
        gather_padded(model_.row(rows_[r]), dim_, copy);
        p0_[r] = up.dot(Row(copy, pdim_));
      }
    }
  });
  beta_.assign(nrows, 0.0f);
  const float l2 = config.update_l2;
  gamma_.assign(l2 > 0.0f ? nrows : 0, 0.0f);
  local_bias_.resize(bias ? nrows : 0);
  for (std::size_t r = 0; r < nrows && bias; ++r) local_bias_[r] = model_.item_bias[rows_[r]];
  if (l2 > 0.0f) decayed_at_.assign(nrows, -1);
  // The L2 step multiplies a row by d = 1 - lr * 2 * l2: (1 + g) -> d (1 + g), beta -> d beta.
  const float d_minus_1 = -(config.client_lr * 2.0f * l2);
  const float d = 1.0f + d_minus_1;
  const float offset = model_.global_mean + (bias ? bu_ : 0.0f);

  for (std::int64_t s = 0, batch = 0; s < steps; ++s, batch = batch + 1 == batches ? 0 : batch + 1) {
    const std::int64_t lo = qry_off_[static_cast<std::size_t>(batch)];
    const std::int64_t hi = qry_off_[static_cast<std::size_t>(batch) + 1];
    err_.resize(static_cast<std::size_t>(hi - lo));
    // Errors, loss and accuracy at the pre-step values.
    for (std::int64_t k = lo; k < hi; ++k) {
      const auto l = static_cast<std::size_t>(qry_local_[static_cast<std::size_t>(k)]);
      float pred = (l2 > 0.0f ? (1.0f + gamma_[l]) * p0_[l] : p0_[l]) + beta_[l] * uu + offset;
      if (bias) pred += local_bias_[l];
      const float err = pred - ratings_[qry_pos_[static_cast<std::size_t>(k)]];
      err_[static_cast<std::size_t>(k - lo)] = err;
      stats.loss_sum += static_cast<double>(err) * err;
      stats.num_correct += std::fabs(err) <= 0.5f ? 1 : 0;
    }
    stats.num_examples += hi - lo;
    const float step_scale = config.client_lr * 2.0f / static_cast<float>(hi - lo);
    if (l2 > 0.0f) {  // once per distinct row and step, at its pre-step value
      for (std::int64_t k = lo; k < hi; ++k) {
        const auto l = static_cast<std::size_t>(qry_local_[static_cast<std::size_t>(k)]);
        if (decayed_at_[l] == s) continue;
        decayed_at_[l] = s;
        gamma_[l] += d_minus_1 * (1.0f + gamma_[l]);
        beta_[l] *= d;
      }
    }
    for (std::int64_t k = lo; k < hi; ++k) {
      const auto l = static_cast<std::size_t>(qry_local_[static_cast<std::size_t>(k)]);
      const float step = step_scale * err_[static_cast<std::size_t>(k - lo)];
      beta_[l] -= step;
      if (bias) local_bias_[l] -= step;
    }
  }

  // Finite scalars and u give a finite update.
  for (std::size_t r = 0; r < nrows && bias; ++r) local_bias_[r] -= model_.item_bias[rows_[r]];
  const bool finite = all_finite(beta_.data(), beta_.size()) && all_finite(gamma_.data(), gamma_.size()) &&
                      all_finite(local_bias_.data(), local_bias_.size()) && (nrows == 0 || std::isfinite(uu));
  finish_update(config, steps, finite, stats);
  if (stats.status == kNonFinite) {
    beta_.clear();
    gamma_.clear();
  }
  return stats;
}

double ClientWorker::compact_sq_norm() const {
  const CVecMap u(u_.data(), dim_);
  const double uu = static_cast<double>(u.squaredNorm());
  double sq = 0.0;
  for (std::size_t r = 0; r < rows_.size(); ++r) {
    const double b = beta_[r];
    sq += b * b * uu;
    if (!gamma_.empty() && gamma_[r] != 0.0f) {
      const CVecMap v(model_.row(rows_[r]), dim_);
      const double g = gamma_[r];
      sq += g * g * static_cast<double>(v.squaredNorm()) + 2.0 * g * b * static_cast<double>(p0_[r]);
    }
  }
  for (std::size_t r = 0; r < local_bias_.size(); ++r) sq += static_cast<double>(local_bias_[r]) * local_bias_[r];
  return std::max(sq, 0.0);
}

void ClientWorker::scale_compact(float s) {
  for (float& b : beta_) b *= s;
  for (float& g : gamma_) g *= s;
  for (float& b : local_bias_) b *= s;
}

ClientStats ClientWorker::update_joint(const ClientConfig& config, UninitVector<float>& delta_out) {
  ClientStats stats;
  const bool bias = model_.has_bias();
  const std::int64_t K = dim_;
  const std::int64_t batches = static_cast<std::int64_t>(qry_off_.size()) - 1;
  const std::int64_t steps = schedule_steps(batches, config.update_epochs, config.update_steps_max);

  // Gather the rows that the executed steps touch into a local copy W.
  touched_rows(steps);
  const std::int64_t nrows = static_cast<std::int64_t>(rows_.size());
  const std::int64_t P = pdim_;
  local_.resize(static_cast<std::size_t>(nrows * P));
  local_bias_.assign(static_cast<std::size_t>(bias ? nrows : 0), 0.0f);
  for (std::int64_t r = 0; r < nrows; ++r) {
    const std::int32_t item = rows_[static_cast<std::size_t>(r)];
    gather_padded(model_.row(item), dim_, local_.data() + r * P);
    if (bias) local_bias_[static_cast<std::size_t>(r)] = model_.item_bias[item];
  }
  decayed_at_.assign(static_cast<std::size_t>(nrows), -1);
  with_padded<8>(pdim_, [&](auto pc) { joint_steps<decltype(pc)::value>(config, steps, stats); });

  // The update is W - V over the touched rows, written straight into the caller's arena; a
  // non-finite update is dropped (TFF semantics). (x - x) is 0 for finite x and NaN otherwise,
  // so the element-wise sum of the probes tests every element (8 lanes, no reduction per row).
  const std::size_t begin = delta_out.size();
  delta_out.resize(begin + static_cast<std::size_t>(nrows * K));
  float* out = delta_out.data() + begin;
  Eigen::Matrix<float, 8, 1> probe = Eigen::Matrix<float, 8, 1>::Zero();
  float scalar_probe = 0.0f;  // the rows' tails past a multiple of 8, and the item biases
  for (std::int64_t r = 0; r < nrows; ++r) {
    const std::int64_t item = rows_[static_cast<std::size_t>(r)];
    const float* w = local_.data() + r * P;
    const float* v = model_.row(item);
    float* dlt = out + r * K;
    std::int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const Eigen::Matrix<float, 8, 1> x = Eigen::Map<const Eigen::Matrix<float, 8, 1>>(w + k) -
                                          Eigen::Map<const Eigen::Matrix<float, 8, 1>>(v + k);
      Eigen::Map<Eigen::Matrix<float, 8, 1>>(dlt + k) = x;
      probe += x - x;
    }
    for (; k < K; ++k) {
      dlt[k] = w[k] - v[k];
      scalar_probe += dlt[k] - dlt[k];
    }
    if (bias) {
      float& b = local_bias_[static_cast<std::size_t>(r)];
      b -= model_.item_bias[item];
      scalar_probe += b - b;
    }
  }
  finish_update(config, steps, probe.sum() + scalar_probe == 0.0f, stats);
  if (stats.weight <= 0.0) delta_out.resize(begin);  // nothing to report
  return stats;
}

template <int P>
void ClientWorker::joint_steps(const ClientConfig& config, std::int64_t steps, ClientStats& stats) {
  using Row = Eigen::Map<Vec<P>>;
  const std::int64_t K = pdim_;  // row stride of the padded local copy
  const bool bias = model_.has_bias();
  const std::int64_t batches = static_cast<std::int64_t>(qry_off_.size()) - 1;
  Eigen::Map<Vec<P>> u(u_.data(), pdim_);
  Eigen::Map<Vec<P>> gu(grad_u_.data(), pdim_);
  const float l2 = config.update_l2;
  for (std::int64_t s = 0, batch = 0; s < steps; ++s, batch = batch + 1 == batches ? 0 : batch + 1) {
    const std::int64_t lo = qry_off_[static_cast<std::size_t>(batch)];
    const std::int64_t hi = qry_off_[static_cast<std::size_t>(batch) + 1];
    const std::int64_t m = hi - lo;
    err_.resize(static_cast<std::size_t>(m));
    // Forward pass at the pre-step values: errors, metrics, and u's gradient.
    gu.setZero();
    float gbu = 0.0f;
    for (std::int64_t k = lo; k < hi; ++k) {
      const std::int64_t p = qry_pos_[static_cast<std::size_t>(k)];
      const std::int32_t l = qry_local_[static_cast<std::size_t>(k)];
      const Row w(local_.data() + l * K, pdim_);
      float pred = u.dot(w) + model_.global_mean;
      if (bias) pred += bu_ + local_bias_[static_cast<std::size_t>(l)];
      const float err = pred - ratings_[p];
      err_[static_cast<std::size_t>(k - lo)] = err;
      stats.loss_sum += static_cast<double>(err) * err;
      stats.num_correct += std::fabs(err) <= 0.5f ? 1 : 0;
      gu += err * w;
      gbu += err;
    }
    stats.num_examples += m;
    const float scale = 2.0f / static_cast<float>(m);
    if (l2 > 0.0f) {
      // The L2 gradient is taken once per distinct row, at its pre-step value.
      const float decay = 1.0f - config.client_lr * 2.0f * l2;
      for (std::int64_t k = lo; k < hi; ++k) {
        const std::int32_t l = qry_local_[static_cast<std::size_t>(k)];
        if (decayed_at_[static_cast<std::size_t>(l)] == s) continue;
        decayed_at_[static_cast<std::size_t>(l)] = s;
        Row(local_.data() + l * K, pdim_) *= decay;
      }
    }
    for (std::int64_t k = lo; k < hi; ++k) {
      const std::int32_t l = qry_local_[static_cast<std::size_t>(k)];
      const float step = config.client_lr * scale * err_[static_cast<std::size_t>(k - lo)];
      Row(local_.data() + l * K, pdim_) -= step * u;
      if (bias) local_bias_[static_cast<std::size_t>(l)] -= step;
    }
    u -= config.client_lr * (scale * gu + (2.0f * l2) * u);
    if (bias) bu_ -= config.client_lr * scale * gbu;
  }
}

EvalStats ClientWorker::evaluate() const {
  EvalStats stats;
  const bool bias = model_.has_bias();
  for (const std::int64_t p : qry_pos_) {
    const std::int32_t item = items_[p];
    const float err = predict_row(model_.row(item),
                                  bias ? model_.item_bias[item] : 0.0f) - ratings_[p];
    stats.sq_err_sum += static_cast<double>(err) * err;
    stats.abs_err_sum += std::fabs(static_cast<double>(err));
    stats.num_correct += std::fabs(err) <= 0.5f ? 1 : 0;
  }
  stats.num_examples = num_query();
  return stats;
}

std::int64_t ClientWorker::top_k(std::int64_t k, bool skip_support, std::int64_t* items_out,
                                 float* scores_out) {
  if (k < 1) throw std::invalid_argument("k must be >= 1");
  excluded_.clear();
  if (skip_support) {
    for (const std::int64_t p : sup_pos_) excluded_.push_back(items_[p]);
    std::sort(excluded_.begin(), excluded_.end());
    excluded_.erase(std::unique(excluded_.begin(), excluded_.end()), excluded_.end());
  }
  // A min-heap of the best k so far: its front is the worst kept item. Items arrive in
  // increasing index order, so an equal score never displaces a kept item (lower index wins).
  auto better = [](const Scored& a, const Scored& b) {
    return a.score > b.score || (a.score == b.score && a.item < b.item);
  };
  heap_.clear();
  const bool bias = model_.has_bias();
  for (std::int64_t i = 0; i < model_.num_items; ++i) {
    // The prediction of evaluate(), so ranking and rating metrics see the same numbers.
    const float score = predict_row(model_.row(i), bias ? model_.item_bias[i] : 0.0f);
    const bool full = static_cast<std::int64_t>(heap_.size()) == k;
    // Once k items are kept, most items fail this one comparison (NaN always does).
    if (full ? !(score > heap_.front().score) : std::isnan(score)) continue;
    if (std::binary_search(excluded_.begin(), excluded_.end(), i)) continue;
    if (full) {
      std::pop_heap(heap_.begin(), heap_.end(), better);
      heap_.back() = {score, i};
    } else {
      heap_.push_back({score, i});
    }
    std::push_heap(heap_.begin(), heap_.end(), better);
  }
  std::sort(heap_.begin(), heap_.end(), better);
  const auto found = static_cast<std::int64_t>(heap_.size());
  for (std::int64_t r = 0; r < found; ++r) {
    items_out[r] = heap_[static_cast<std::size_t>(r)].item;
    scores_out[r] = heap_[static_cast<std::size_t>(r)].score;
  }
  std::fill(items_out + found, items_out + k, std::int64_t{-1});
  std::fill(scores_out + found, scores_out + k, std::numeric_limits<float>::quiet_NaN());
  return found;
}

RankStats ClientWorker::rank_query(std::int64_t k, float relevance_threshold, std::int64_t* top_out) {
  // At most num_items items can be ranked, so a larger k only changes the scratch size (and
  // num_relevant <= num_items keeps the ideal DCG below the same): rank with the smaller one.
  const std::int64_t ranked = std::min(k, std::max<std::int64_t>(model_.num_items, 1));
  top_items_.resize(static_cast<std::size_t>(ranked));
  top_scores_.resize(static_cast<std::size_t>(ranked));
  const std::int64_t found = top_k(ranked, true, top_items_.data(), top_scores_.data());
  if (top_out != nullptr) std::copy_n(top_items_.data(), ranked, top_out);  // padded with -1
  // Relevant: distinct liked query items that are candidates (excluded_ holds the support).
  relevant_.clear();
  for (const std::int64_t p : qry_pos_)
    if (ratings_[p] >= relevance_threshold) relevant_.push_back(items_[p]);
  std::sort(relevant_.begin(), relevant_.end());
  relevant_.erase(std::unique(relevant_.begin(), relevant_.end()), relevant_.end());
  relevant_.erase(std::remove_if(relevant_.begin(), relevant_.end(),
                                 [&](std::int32_t item) {
                                   return std::binary_search(excluded_.begin(), excluded_.end(), item);
                                 }),
                  relevant_.end());
  RankStats stats;
  stats.num_relevant = static_cast<std::int64_t>(relevant_.size());
  if (stats.num_relevant == 0) {
    stats.ndcg = stats.ap = stats.rr = std::numeric_limits<double>::quiet_NaN();
    return stats;
  }
  // Binary gains: rank r (0-based) is worth 1 / log2(r + 2); the ideal list puts a relevant
  // item at each of the first min(k, num_relevant) ranks.
  // Average precision adds precision@(r + 1) at each hit; the reciprocal rank is the first hit's.
  double dcg = 0.0, idcg = 0.0, precision_sum = 0.0;
  for (std::int64_t r = 0; r < found; ++r) {
    if (std::binary_search(relevant_.begin(), relevant_.end(), top_items_[static_cast<std::size_t>(r)])) {
      stats.hits += 1;
      dcg += 1.0 / std::log2(static_cast<double>(r + 2));
      precision_sum += static_cast<double>(stats.hits) / static_cast<double>(r + 1);
      if (stats.hits == 1) stats.rr = 1.0 / static_cast<double>(r + 1);
    }
  }
  const std::int64_t ideal = std::min(k, stats.num_relevant);
  for (std::int64_t r = 0; r < ideal; ++r) idcg += 1.0 / std::log2(static_cast<double>(r + 2));
  stats.ndcg = dcg / idcg;
  stats.ap = precision_sum / static_cast<double>(ideal);
  return stats;
}

}  // namespace fedrecon
