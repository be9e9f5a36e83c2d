// Cohort kernels: one call processes many clients in parallel (std::thread, dynamic
// scheduling) and reduces their results in a fixed order, so the output is bit-identical for
// any thread count. All pointers are plain views; outputs are written, never read.
#pragma once

#include <cstdint>
#include <vector>

#include "fedrecon/codec.hpp"
#include "fedrecon/reduce.hpp"
#include "fedrecon/types.hpp"

namespace fedrecon {

/// Totals of one training round.
struct RoundSummary {
  double total_weight = 0.0;
  double loss_sum = 0.0;            // metrics over clients with finite updates
  std::int64_t num_examples = 0;
  std::int64_t num_correct = 0;
  std::int64_t num_reporting = 0;   // clients with weight > 0
  std::int64_t num_nonfinite = 0;   // clients whose update was not finite (zeroed, weight 0)
  std::int64_t rows_sent = 0;       // sum over reporting clients of touched rows
  std::int64_t rows_aggregated = 0; // distinct rows of V touched by reporting clients
  std::int64_t bytes_sent = 0;      // encoded updates of the reporting clients
  std::int64_t num_clipped = 0;     // reporting clients whose update DP clipping scaled down
  std::int64_t nonfinite_rows = 0;  // with an InPlaceStep: rows of V it left non-finite
};

/// Stored user embeddings for stateful baselines (FedAvg keeps u on the server). All pointers
/// are optional and index the sampled clients (num_sampled x dim, num_sampled). `users_out`
/// receives each client's final u (its old u again if its update was not finite).
struct UserState {
  const float* users_in = nullptr;
  const float* user_bias_in = nullptr;
  float* users_out = nullptr;
  float* user_bias_out = nullptr;
};

/// The fused FedRecon round: for each sampled client, reconstruct -> update -> encode (clip,
/// quantize: `codec`) -> weighted sum of the decoded deltas (reduce.hpp). Writes delta_out
/// (num_items x dim) = sum_i w_i D_i / sum_i w_i (0 for untouched rows, all 0 when no client
/// reports), delta_bias_out (num_items; only with biases) and stats_out[num_sampled]. With
/// step.item_factors set, the mean is applied to the model in place instead (delta_out and
/// delta_bias_out are not used and may be null). cohort.cpp says which configuration takes
/// which path (the scalar form of a client update, or rows). Throws std::invalid_argument /
/// std::out_of_range on bad input.
RoundSummary train_round(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                         std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                         std::uint64_t round, int num_threads, float* delta_out,
                         float* delta_bias_out, ClientStats* stats_out,
                         const UserState& users = UserState(), const UpdateCodec& codec = UpdateCodec(),
                         const InPlaceStep& step = InPlaceStep());

/// The noise of dense updates quantized with one scale per client: client i's untouched rows
/// decode to the quantization of zeros with scale (lo[i], step[i]) and key[i] (step 0: none),
/// under the scheme of `codec` (bits, hadamard). What client_updates reports, so a server can add
/// it without receiving num_items rows per client.
struct DenseNoise {
  const float* lo = nullptr;
  const float* step = nullptr;
  const std::uint64_t* key = nullptr;
  UpdateCodec codec;
};

/// The fused round's reduction of updates computed one client at a time (client_updates, other
/// frameworks): client i (cohort position i) sent rows[offsets[i]:offsets[i+1]] with values
/// (rows x dim) and, when bias_values is not null, item-bias values; weights[i] (0: did not
/// report); `noise` (optional) the noise of its dense quantized update. Writes the weighted
/// mean as train_round does, bit for bit, and returns the total weight (summed in cohort order).
double reduce_updates(std::int64_t num_items, int dim, const std::int64_t* offsets,
                      std::int64_t num_clients, const std::int32_t* rows, const float* values,
                      const float* bias_values, const double* weights, int num_threads,
                      float* delta_out, float* delta_bias_out, const DenseNoise* noise = nullptr);

/// Unfused form for frameworks that run clients one at a time: each client's sparse update
/// (clipped and quantized as `codec` says). Client k's rows are rows[offsets[k]:offsets[k+1]],
/// values the matching (rows x dim) block. A dense update quantized with one scale also puts
/// noise on every row the client did not touch: noise_lo/noise_step/noise_key describe it
/// (DenseNoise; step 0 for a client without), else they are empty.
struct SparseUpdates {
  std::vector<std::int64_t> offsets;
  std::vector<std::int32_t> rows;
  std::vector<float> values;
  std::vector<float> bias_values;  // empty without biases
  std::vector<ClientStats> stats;
  std::vector<float> noise_lo, noise_step;
  std::vector<std::uint64_t> noise_key;
};
SparseUpdates client_updates(const ModelView& model, const CsrView& data,
                             const std::int64_t* clients, std::int64_t num_sampled,
                             const ClientConfig& config, std::uint64_t seed, std::uint64_t round,
                             int num_threads, const UserState& users = UserState(),
                             const UpdateCodec& codec = UpdateCodec());

/// Reconstruct u (num_sampled x dim) and, with biases, b_u (num_sampled) from each client's
/// support set.
void reconstruct_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                       std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                       std::uint64_t round, int num_threads, float* users_out,
                       float* user_bias_out);

/// ReconEval: reconstruct on support, score every query rating once. With k > 0 each client
/// is also ranked (rank_out[num_sampled], RankStats): every item but its support items is
/// scored, and its top k are checked against its query items rated >= relevance_threshold
/// (-inf: every query item). k = 0 skips the ranking and its cost entirely. With `top_out`
/// (num_sampled x min(k, max(num_items, 1))) each client's top items are written too (padded
/// with -1), e.g. for catalogue coverage.
void evaluate_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                    std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                    std::uint64_t round, int num_threads, EvalStats* stats_out,
                    std::int64_t k = 0, float relevance_threshold = 4.0f,
                    RankStats* rank_out = nullptr, std::int64_t* top_out = nullptr);

/// Inference for users the model never saw: u (num_sampled x dim) and, with biases, b_u
/// (num_sampled) reconstructed from ALL of each user's ratings (config.split is ignored: the
/// support set is every rating, cut into batches in stored order, or reshuffled), V frozen.
/// Every user draws from the random streams of client 0 of (seed, round), so a user's result
/// depends only on its own ratings, never on its position in the batch.
void infer_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                 std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                 std::uint64_t round, int num_threads, float* users_out, float* user_bias_out);

/// Top-k recommendations: u reconstructed as infer_users does, every item scored by its
/// predicted rating, the user's rated items skipped when exclude_seen. Row i of items_out /
/// scores_out (num_sampled x k) holds the best k, best first, ties to the lower item index;
/// fewer candidates leave item -1 and score NaN in the remaining slots (NaN scores, from a
/// diverged reconstruction, are never recommended).
void recommend_users(const ModelView& model, const CsrView& data, const std::int64_t* clients,
                     std::int64_t num_sampled, const ClientConfig& config, std::uint64_t seed,
                     std::uint64_t round, int num_threads, std::int64_t k, bool exclude_seen,
                     std::int64_t* items_out, float* scores_out);

}  // namespace fedrecon
