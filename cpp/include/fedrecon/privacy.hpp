// Differential privacy for aggregated client updates: DP-FedAvg's Gaussian mechanism
// (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
// ICLR 2018).
//
// Each client update x_i is clipped to L2 norm C (x_i * min(1, C / ||x_i||); a sparse update is
// clipped over the values it sends), weighted by w_i in [0, 1], summed in float64, and every
// coordinate of the summed table receives independent Gaussian noise N(0, (z C)²). Since
// adding or removing one client changes the sum by at most w_i C <= C, z is the noise
// multiplier of the Gaussian mechanism with sensitivity C. The result may be scaled by
// 1 / denominator; McMahan et al.'s fixed-denominator estimator uses the *expected* total
// weight of a round (q W), a public constant, so the division costs no privacy.
//
// Noise is a pure function of (seed, round, coordinate), never of threads (see
// add_gaussian_noise). Errors: std::invalid_argument, naming the Python argument.
#pragma once

#include "fedrecon/rng.hpp"

#include <cstdint>

#include "fedrecon/aggregate.hpp"

namespace fedrecon {

/// Key of the noise stream of one round: derive_seed(seed, round, 0, kStreamPrivacy).
std::uint64_t noise_key(std::uint64_t seed, std::uint64_t round);

/// x[j] += stddev * z_{first + j} for j < count. z_g is standard normal and depends only on
/// (key, g): coordinates pair up as p = g / 2, and pair p takes the SplitMix64 outputs
/// a = mix64(key + 2p·γ), b = mix64(key + (2p+1)·γ) (γ = 0x9E3779B97F4A7C15, i.e. outputs 2p
/// and 2p+1 of the stream Rng(key)), u1 = (a >> 11)·2⁻⁵³, u2 = (b >> 11)·2⁻⁵³, and Box–Muller
/// z_{2p} = r cos θ, z_{2p+1} = r sin θ with r = sqrt(-2 ln(1 - u1)), θ = 2π u2 (in float64).
/// Any block of coordinates can therefore be generated independently.
void add_gaussian_noise(std::uint64_t key, double stddev, std::int64_t first, std::int64_t count,
                        double* x);

/// Writes the first `size` noise coordinates (stddev * z_g, float64) of the stream `key`.
/// Parallel over blocks; identical for any num_threads.
void gaussian_noise(std::uint64_t key, double stddev, std::int64_t size, double* out, int num_threads);

/// Σ x_j² in float64 with a fixed summation order (blocks of 4096 values, four lanes each,
/// block sums added in order), so the value is identical for any num_threads. Non-finite
/// inputs give a non-finite result.
double squared_norm(const float* x, std::int64_t n, int num_threads);

/// min(1, clip / norm); 1 for norm == 0.
inline double clip_factor(double norm, double clip) { return norm > clip ? clip / norm : 1.0; }

/// out = x * clip_factor(||x||, clip) (float32, rounded once). Returns ||x|| (float64).
/// Throws std::invalid_argument for clip <= 0 or a non-finite x (naming `update`).
double clip_by_norm(const float* x, std::int64_t n, double clip, float* out, int num_threads);

/// Parameters of the Gaussian mechanism: clip C > 0, noise multiplier z >= 0, seed and round
/// of the noise stream.
struct DpParams {
  double clip = 1.0;
  double noise_multiplier = 0.0;
  std::uint64_t seed = 0;
  std::uint64_t round = 0;
};

/// What a DP aggregation reports.
struct DpSummary {
  std::int64_t num_updates = 0;
  std::int64_t num_clipped = 0;  // updates with ||x|| > clip
  double total_weight = 0.0;     // Σ w_i (before clipping)
  double noise_std = 0.0;        // z * C, per coordinate of the sum
};

/// Checks clip (finite, > 0), noise_multiplier (finite, >= 0), denominator (finite, > 0).
void check_dp_params(const DpParams& p, double denominator);

/// DP batch, dense: out = (Σ_i w_i clip(x_i) + N(0, (zC)²)) / denominator over `size`
/// coordinates; norms_out[i] = ||x_i|| before clipping. Weights must lie in [0, 1].
/// Accumulation as weighted_sum_dense with coefficients w_i * clip_factor_i.
template <class Out>
DpSummary dp_sum_dense(const float* const* updates, const double* weights, std::int64_t n,
                       std::int64_t size, const DpParams& p, double denominator, Out* out,
                       double* norms_out, int num_threads);

/// DP batch, sparse rows into a (num_rows x dim) table; noise on every coordinate of the table.
template <class Out>
DpSummary dp_sum_sparse(const SparseRows& updates, const double* weights, std::int64_t num_rows,
                        const DpParams& p, double denominator, Out* out, double* norms_out,
                        int num_threads);

/// Streaming DP sum: clip each update as it arrives, accumulate w_i * clip(x_i) in a
/// WeightedSum, add the noise at finalize. Bit-identical to dp_sum_dense / dp_sum_sparse for
/// the same updates in the same order. Not thread-safe (one call at a time per object).
class GaussianSum {
 public:
  GaussianSum(std::int64_t num_rows, std::int64_t dim, const DpParams& p);

  /// Clips and adds a dense update (num_rows * dim floats); returns its norm before clipping.
  double add_dense(const float* x, double weight, int num_threads);
  /// Clips (over `values`) and adds a sparse update; returns its norm before clipping.
  double add_sparse(const std::int32_t* rows, const float* values, std::int64_t n, double weight,
                    int num_threads);
  /// out (num_rows * dim) = (clipped weighted sum + noise) / denominator.
  template <class Out>
  void finalize(double denominator, Out* out, int num_threads) const;
  void reset();

  DpSummary summary() const;
  const DpParams& params() const { return params_; }
  const WeightedSum& sum() const { return sum_; }

 private:
  WeightedSum sum_;
  DpParams params_;
  std::int64_t num_clipped_ = 0;
};

/// Checks a DP weight: finite and in [0, 1] (naming `weight`/`weights`).
void check_dp_weight(double w, const char* name);

extern template DpSummary dp_sum_dense<float>(const float* const*, const double*, std::int64_t,
                                              std::int64_t, const DpParams&, double, float*,
                                              double*, int);
extern template DpSummary dp_sum_dense<double>(const float* const*, const double*, std::int64_t,
                                               std::int64_t, const DpParams&, double, double*,
                                               double*, int);
extern template DpSummary dp_sum_sparse<float>(const SparseRows&, const double*, std::int64_t,
                                               const DpParams&, double, float*, double*, int);
extern template DpSummary dp_sum_sparse<double>(const SparseRows&, const double*, std::int64_t,
                                                const DpParams&, double, double*, double*, int);
extern template void GaussianSum::finalize<float>(double, float*, int) const;
extern template void GaussianSum::finalize<double>(double, double*, int) const;

}  // namespace fedrecon
