// One FedRecon client: split its ratings, reconstruct its local embedding u with V frozen,
// then train the rows of V its query set touches. A ClientWorker holds per-thread scratch, so
// the inner loops never allocate once its buffers have grown to the largest client.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "fedrecon/types.hpp"

namespace fedrecon {

/// An allocator whose resize leaves new elements uninitialised. For buffers that are written in
/// full right after they are sized (gathered rows, a client's update appended to its arena):
/// vector::resize would zero-fill them first, doubling the memory traffic.
template <class T>
struct NoInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoInitAllocator<U>;
  };
  NoInitAllocator() = default;
  template <class U>
  NoInitAllocator(const NoInitAllocator<U>&) noexcept {}
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) == 0)
      ::new (static_cast<void*>(p)) U;
    else
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <class T>
using UninitVector = std::vector<T, NoInitAllocator<T>>;

/// Throws std::invalid_argument for an unusable configuration (non-positive batch size,
/// negative learning rates, Exact reconstruction without a positive ridge, ...).
void validate_config(const ClientConfig& config);

class ClientWorker {
 public:
  explicit ClientWorker(const ModelView& model);

  /// Points a (cached) worker at this call's model, resizing its scratch if the shape changed.
  void rebind(const ModelView& model);

  /// Splits client `client` of `data` into support and query batches (stream kStreamSplit of
  /// (seed, round, client)). Throws std::out_of_range for an item id outside the model.
  void split(const CsrView& data, std::int64_t client, const ClientConfig& config,
             std::uint64_t seed, std::uint64_t round);
  /// The same with the random streams of client `stream_client` (inference keys every user
  /// alike, so a user's result does not depend on its position in the batch).
  void split(const CsrView& data, std::int64_t client, const ClientConfig& config,
             std::uint64_t seed, std::uint64_t round, std::uint64_t stream_client);

  /// Reconstructs u (and b_u when the model has biases) on the support set, V frozen. SGD starts
  /// from `init_u` (dim floats) and `init_bu` when init_u is given (stateful baselines), else
  /// from config.init.
  void reconstruct(const ClientConfig& config, std::uint64_t seed, std::uint64_t round,
                   std::int64_t client, const float* init_u = nullptr, float init_bu = 0.0f);

  /// Client update on the query set with u frozen (config.joint false), in the scalar form the
  /// model gives it: plain SGD moves a touched row v_j only within span{v_j, u}, so after any
  /// number of steps v_j' = (1 + g_j) v_j + beta_j u (g_j = 0 without L2) and its prediction is
  /// (1 + g_j) u.v_j + beta_j |u|^2. Each row costs one dot product; each rating a few scalar
  /// operations. rows()/beta()/gamma()/bias_delta() then hold the update (materialize_rows()
  /// turns it into rows). A non-finite update keeps no rows and gets weight 0.
  ClientStats update_compact(const ClientConfig& config);

  /// Client update with u trained too (config.joint): SGD on a local copy of the touched rows.
  /// Appends the update V_final - V_initial over the touched rows (rows().size() x dim) to
  /// `delta_out`, the caller's arena, so it is written once; bias_delta() holds the item-bias
  /// deltas. A non-finite update appends nothing and gets weight 0.
  ClientStats update_joint(const ClientConfig& config, UninitVector<float>& delta_out);

  /// Squared L2 norm (float64) of the scalar-form update, from its scalars: per row
  /// g^2 |v|^2 + 2 g beta u.v + beta^2 |u|^2, plus the item-bias deltas squared.
  double compact_sq_norm() const;
  /// Scales the scalar-form update by s (DP clipping): g, beta and the bias deltas.
  void scale_compact(float s);

  /// Squared error and rating accuracy of the reconstructed u on the whole query set.
  EvalStats evaluate() const;

  /// The k items with the highest predicted rating (as evaluate() predicts) for the
  /// reconstructed u, best first, ties to the lower item index. Support items are skipped when
  /// `skip_support`, NaN scores are never ranked. Writes k entries, padding with item -1 and
  /// score NaN when fewer items qualify; returns the number of items that qualified (<= k).
  std::int64_t top_k(std::int64_t k, bool skip_support, std::int64_t* items_out, float* scores_out);

  /// Ranking metrics of the top k over the candidates (all items but the support set) against
  /// the query items rated >= relevance_threshold (RankStats). With `top_out` also writes the
  /// top items there: min(k, max(num_items, 1)) entries, best first, padded with -1.
  RankStats rank_query(std::int64_t k, float relevance_threshold, std::int64_t* top_out = nullptr);

  /// Rows of V to request from memory while the next SGD reconstruction's chain runs (its
  /// latency leaves the memory system idle): the item ids of the client taken next. Used once.
  void prefetch_during_chain(const std::int32_t* items, std::int64_t n) {
    next_items_ = items;
    next_n_ = n;
  }

  const std::vector<std::int32_t>& rows() const { return rows_; }
  const float* bias_delta() const { return local_bias_.data(); }
  const float* beta() const { return beta_.data(); }
  /// g_j of the scalar form, or nullptr when every g_j is 0 (no L2).
  const float* gamma() const { return gamma_.empty() ? nullptr : gamma_.data(); }
  const float* user() const { return u_.data(); }
  float user_bias() const { return bu_; }
  std::int64_t num_support() const { return static_cast<std::int64_t>(sup_pos_.size()); }
  std::int64_t num_query() const { return static_cast<std::int64_t>(qry_pos_.size()); }

 private:
  float predict_row(const float* v, float item_bias) const;
  // The hot loops, compiled for each padded size P (a multiple of 8 up to 128, so every row
  // is whole AVX vectors) and a dynamic fallback.
  template <int P>
  void reconstruct_sgd(const ClientConfig& config);
  template <int P>
  void joint_steps(const ClientConfig& config, std::int64_t steps, ClientStats& stats);
  // Gathers the distinct rows the first `steps` query steps touch into rows_ / qry_local_.
  void touched_rows(std::int64_t steps);
  // Weight and status of an update, once its rows are final (finite: all of it is finite).
  void finish_update(const ClientConfig& config, std::int64_t steps, bool finite, ClientStats& stats);

  ModelView model_;
  const std::int32_t* next_items_ = nullptr;
  std::int64_t next_n_ = 0;
  int dim_;
  int pdim_;  // dim rounded up to a multiple of 8: the stride of the padded working rows
  // The current client: its entries in the CSR arrays, and positions relative to `base_`.
  const std::int32_t* items_ = nullptr;
  const float* ratings_ = nullptr;
  // Written in full whenever they are sized (the split), so never zero-filled first.
  UninitVector<std::int64_t> perm_;
  UninitVector<std::uint32_t> draws_;  // the shuffle's draws
  UninitVector<std::int64_t> sup_pos_, sup_off_;  // support positions, cut into batches
  UninitVector<std::int64_t> qry_pos_, qry_off_;  // query positions, cut into batches
  // The support rows in batch order (pointers into V when its rows are padded, else into the
  // padded copies gathered in sup_rows_) and their targets r - global_mean - b_i.
  UninitVector<float> sup_rows_, sup_y_;
  std::vector<const float*> sup_ptr_;
  // Local embedding and its gradient (padded; the padding stays zero).
  std::vector<float> u_, grad_u_;
  float bu_ = 0.0f;
  std::int64_t recon_examples_ = 0;
  // Touched rows of V: global ids, a local copy W (then W - W0; joint only), per-query-position
  // local row; the scalar form's u.v_j, beta_j, g_j; the item-bias deltas.
  std::vector<std::int32_t> rows_;
  UninitVector<float> local_;  // padded
  std::vector<float> p0_, beta_, gamma_;
  std::vector<float> local_bias_;
  std::vector<std::int32_t> qry_local_;
  std::vector<std::int32_t> item_to_local_;  // num_items, -1 when absent; reset after use
  std::vector<std::int64_t> decayed_at_;      // L2 decay once per row per step
  std::vector<float> err_;
  std::vector<float> gram_, rhs_;
  // Ranking scratch: excluded items (sorted), the running top k, relevant query items (sorted).
  struct Scored {
    float score;
    std::int64_t item;
  };
  std::vector<std::int32_t> excluded_, relevant_;
  std::vector<Scored> heap_;
  std::vector<std::int64_t> top_items_;
  std::vector<float> top_scores_;
};

}  // namespace fedrecon
