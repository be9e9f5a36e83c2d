// Plain views and configuration shared by the FedRecon kernels. No Python here.
#pragma once

#include <cstdint>
#include <vector>

namespace fedrecon {

/// Ratings of many clients in CSR form: client c owns entries [indptr[c], indptr[c+1]).
/// The order of a client's entries is meaningful: it is the fixed (seeded) order in which
/// TFF-style `split_dataset` cuts batches.
struct CsrView {
  const std::int64_t* indptr = nullptr;  // num_clients + 1, non-decreasing, indptr[0] == 0
  const std::int32_t* items = nullptr;   // nnz item ids in [0, num_items)
  const float* ratings = nullptr;        // nnz ratings
  std::int64_t num_clients = 0;
  std::int64_t nnz = 0;
  // Optional (num_clients): the id that keys client c's random streams (seed, round, id);
  // nullptr keys each client by its row c. Lets a caller holding one client's ratings run it
  // with the streams of any client id without a CSR of that many rows.
  const std::int64_t* stream_ids = nullptr;
  std::uint64_t stream_id(std::int64_t c) const {
    return static_cast<std::uint64_t>(stream_ids != nullptr ? stream_ids[c] : c);
  }
};

/// dim rounded up to a multiple of 8 floats: the row length of the kernels' whole-vector rows
/// (padded working rows, a padded model's stride, the reduction's cohort of u's).
inline int padded_dim(int dim) { return (dim + 7) / 8 * 8; }

/// The global model: item factors V (num_items x dim, row-major), optional item biases and a
/// global mean. With item biases the model also reconstructs a local user bias:
///   r_hat = u . v_i + global_mean [+ b_u + b_i].
/// Rows are `stride()` floats apart: `dim` (a NumPy array's layout), or dim rounded up to a
/// multiple of 8 with zeros in columns [dim, stride), which train_rounds uses so that the
/// clients read whole-vector rows of V in place instead of gathering padded copies.
struct ModelView {
  const float* item_factors = nullptr;
  const float* item_bias = nullptr;  // nullptr: a model without biases
  float global_mean = 0.0f;
  std::int64_t num_items = 0;
  int dim = 0;
  std::int64_t row_stride = 0;  // 0: dim
  bool has_bias() const { return item_bias != nullptr; }
  std::int64_t stride() const { return row_stride > 0 ? row_stride : dim; }
  const float* row(std::int64_t i) const { return item_factors + i * stride(); }
};

/// How a client's ratings are divided into a support set (reconstruction) and a query set
/// (global update / evaluation).
enum class SplitMode : int {
  Batches = 0,  // TFF split_dataset: even batches support, odd batches query
  Random = 1,   // disjoint random split with a support fraction, new each round
  Reuse = 2,    // both sets are all ratings (paper Appendix D)
};
enum class ReconMethod : int { Sgd = 0, Exact = 1 };
enum class InitMode : int { Uniform = 0, Zeros = 1 };
enum class Weighting : int { Examples = 0, Uniform = 1 };

/// Everything a client does in one round. Step caps <= 0 mean "no cap".
struct ClientConfig {
  int batch_size = 5;
  SplitMode split = SplitMode::Batches;
  float support_fraction = 0.5f;  // SplitMode::Random only
  bool reshuffle = false;         // permute the client's ratings anew every round

  ReconMethod recon = ReconMethod::Sgd;
  InitMode init = InitMode::Uniform;
  float init_scale = 0.05f;  // u ~ U(-init_scale, init_scale)
  int recon_epochs = 1;
  std::int64_t recon_steps_max = 0;
  float recon_lr = 0.1f;
  float recon_l2 = 0.0f;  // SGD: batch loss += recon_l2 * |u|^2
  float ridge = 1.0f;     // Exact: u = (V_s^T V_s + ridge I)^-1 V_s^T (r_s - offsets)

  int update_epochs = 1;
  std::int64_t update_steps_max = 0;
  float client_lr = 0.1f;
  float update_l2 = 0.0f;  // batch loss += update_l2 * |rows of V in the batch|^2
  bool joint = false;      // also train u (and b_u) during the client update

  Weighting weighting = Weighting::Examples;

  // A learned global default for u (empty: none). Reconstruction starts from it (SGD) or
  // shrinks toward it (exact: ridge * |u - default|^2), and a user without support data keeps it.
  std::vector<float> user_default;
  float user_bias_default = 0.0f;
};

/// Per-client outcome of a training round.
enum ClientStatus : std::int8_t { kOk = 0, kNonFinite = 1, kNoQuery = 2 };

struct ClientStats {
  double weight = 0.0;       // aggregation weight (0 for non-finite or empty clients)
  double loss_sum = 0.0;     // sum of squared errors over query batches (pre-step predictions)
  std::int64_t num_examples = 0;  // query examples processed by the update steps
  std::int64_t num_correct = 0;   // of those, |r - r_hat| <= 0.5
  std::int64_t rows = 0;          // rows of V the update touched
  std::int64_t recon_examples = 0;  // support examples processed by reconstruction
  std::int64_t bytes = 0;           // size of the encoded update the client sends (reporting only)
  std::int8_t clipped = 0;          // 1 if DP clipping scaled the update down
  std::int8_t status = kOk;
};

/// Per-client outcome of reconstruction evaluation (ReconEval).
struct EvalStats {
  double sq_err_sum = 0.0;
  double abs_err_sum = 0.0;  // for MAE
  std::int64_t num_examples = 0;
  std::int64_t num_correct = 0;
};

/// Per-client ranking outcome of ReconEval at cut-off k. Candidates are all items except the
/// client's support items; the relevant items are the distinct query items rated at least the
/// relevance threshold that are candidates (an item also in the support set can never be hit).
struct RankStats {
  std::int64_t num_relevant = 0;
  std::int64_t hits = 0;  // relevant items among the top k
  double ndcg = 0.0;      // binary gains, IDCG over min(k, num_relevant) ranks; NaN if none relevant
  double ap = 0.0;        // average precision: sum of precision@r at each hit r, / min(k, num_relevant)
  double rr = 0.0;        // reciprocal rank of the first hit (0 without a hit in the top k)
};

}  // namespace fedrecon
