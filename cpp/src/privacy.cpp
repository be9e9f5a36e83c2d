#include "fedrecon/privacy.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "fedrecon/parallel.hpp"
#include "fedrecon/rng.hpp"

#include "fedrecon/strict_fp.hpp"

namespace fedrecon {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// SplitMix64's increment (as in rng.hpp): output j of Rng(key) is mix64(key + j * kGamma), so
// any position of the stream is reachable in O(1).
constexpr std::uint64_t kGamma = 0x9E3779B97F4A7C15ULL;
constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr double k2Pow53Inv = 1.0 / 9007199254740992.0;

// Values per block of the squared norm; fixed, so the summation order never depends on threads.
constexpr std::int64_t kNormBlock = 4096;
// Coordinates per task when generating noise alone.
constexpr std::int64_t kNoiseBlock = 1 << 14;

double block_squared_norm(const float* x, std::int64_t n) {
  // Four independent lanes: a fixed order, yet not one long dependency chain.
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  std::int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const double a = x[j], b = x[j + 1], c = x[j + 2], d = x[j + 3];
    s0 += a * a;
    s1 += b * b;
    s2 += c * c;
    s3 += d * d;
  }
  for (; j < n; ++j) {
    const double a = x[j];
    s0 += a * a;
  }
  return (s0 + s1) + (s2 + s3);
}

void check_clip(double clip) {
  if (!std::isfinite(clip) || !(clip > 0.0)) fail("clip must be finite and > 0; got " + std::to_string(clip));
}

// Per-client norms of many slices, parallel over (client, block) pairs; each norm sums its
// block partials in block order, exactly as squared_norm does.
void slice_squared_norms(const float* const* data, const std::int64_t* sizes, std::int64_t n,
                         double* out, int num_threads) {
  std::vector<std::int64_t> first(static_cast<std::size_t>(n) + 1, 0);
  for (std::int64_t i = 0; i < n; ++i)
    first[static_cast<std::size_t>(i) + 1] =
        first[static_cast<std::size_t>(i)] + (sizes[i] + kNormBlock - 1) / kNormBlock;
  const std::int64_t tasks = first[static_cast<std::size_t>(n)];
  std::vector<double> partial(static_cast<std::size_t>(tasks));
  std::vector<std::int64_t> owner(static_cast<std::size_t>(tasks));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t t = first[static_cast<std::size_t>(i)]; t < first[static_cast<std::size_t>(i) + 1]; ++t)
      owner[static_cast<std::size_t>(t)] = i;
  parallel_for(tasks, resolve_threads(num_threads, tasks), [&](std::int64_t t, int) {
    const std::int64_t i = owner[static_cast<std::size_t>(t)];
    const std::int64_t lo = (t - first[static_cast<std::size_t>(i)]) * kNormBlock;
    partial[static_cast<std::size_t>(t)] = block_squared_norm(data[i] + lo, std::min(kNormBlock, sizes[i] - lo));
  });
  for (std::int64_t i = 0; i < n; ++i) {
    double sq = 0.0;
    for (std::int64_t t = first[static_cast<std::size_t>(i)]; t < first[static_cast<std::size_t>(i) + 1]; ++t)
      sq += partial[static_cast<std::size_t>(t)];
    out[i] = sq;
  }
}

void slice_norms(const float* const* data, const std::int64_t* sizes, std::int64_t n,
                 double* norms_out, int num_threads) {
  slice_squared_norms(data, sizes, n, norms_out, num_threads);
  for (std::int64_t i = 0; i < n; ++i) norms_out[i] = std::sqrt(norms_out[i]);
}

}  // namespace

std::uint64_t noise_key(std::uint64_t seed, std::uint64_t round) {
  return derive_seed(seed, round, 0, kStreamPrivacy);
}

void add_gaussian_noise(std::uint64_t key, double stddev, std::int64_t first, std::int64_t count,
                        double* x) {
  // Pair p = g / 2 uses stream outputs 2p and 2p + 1; Box–Muller turns them into two normals
  // (cos and sin of the same angle, which the compiler fuses into one sincos call).
  const auto pair = [key](std::int64_t g, double& z0, double& z1) {
    const std::uint64_t p = static_cast<std::uint64_t>(g) >> 1;
    const std::uint64_t a = mix64(key + 2 * p * kGamma);
    const std::uint64_t b = mix64(key + (2 * p + 1) * kGamma);
    const double u1 = static_cast<double>(a >> 11) * k2Pow53Inv;  // [0, 1): 1 - u1 in (0, 1]
    const double u2 = static_cast<double>(b >> 11) * k2Pow53Inv;
    const double radius = std::sqrt(-2.0 * std::log(1.0 - u1));
    const double angle = kTwoPi * u2;
    z0 = radius * std::cos(angle);
    z1 = radius * std::sin(angle);
  };
  const std::int64_t end = first + count;
  std::int64_t g = first;
  double z0, z1;
  if (g < end && (g & 1) != 0) {  // a block that starts on the second half of a pair
    pair(g, z0, z1);
    x[0] += stddev * z1;
    ++g;
  }
  for (; g + 1 < end; g += 2) {
    pair(g, z0, z1);
    x[g - first] += stddev * z0;
    x[g + 1 - first] += stddev * z1;
  }
  if (g < end) {
    pair(g, z0, z1);
    x[g - first] += stddev * z0;
  }
}

void gaussian_noise(std::uint64_t key, double stddev, std::int64_t size, double* out, int num_threads) {
  if (size < 0) fail("size must be >= 0");
  if (!std::isfinite(stddev) || stddev < 0.0) fail("std must be finite and >= 0");
  const std::int64_t num_blocks = (size + kNoiseBlock - 1) / kNoiseBlock;
  parallel_for(num_blocks, resolve_threads(num_threads, num_blocks), [&](std::int64_t b, int) {
    const std::int64_t lo = b * kNoiseBlock, len = std::min(kNoiseBlock, size - lo);
    std::fill_n(out + lo, len, 0.0);
    add_gaussian_noise(key, stddev, lo, len, out + lo);
  });
}

double squared_norm(const float* x, std::int64_t n, int num_threads) {
  if (n < 0) fail("size must be >= 0");
  double sq = 0.0;
  slice_squared_norms(&x, &n, 1, &sq, num_threads);
  return sq;
}

double clip_by_norm(const float* x, std::int64_t n, double clip, float* out, int num_threads) {
  check_clip(clip);
  double norm = 0.0;
  slice_norms(&x, &n, 1, &norm, num_threads);
  if (!std::isfinite(norm)) fail("update must be finite (found NaN or infinity)");
  const double c = clip_factor(norm, clip);
  for (std::int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(c * static_cast<double>(x[j]));
  return norm;
}

void check_dp_params(const DpParams& p, double denominator) {
  check_clip(p.clip);
  if (!std::isfinite(p.noise_multiplier) || p.noise_multiplier < 0.0)
    fail("noise_multiplier must be finite and >= 0; got " + std::to_string(p.noise_multiplier));
  if (!std::isfinite(p.clip * p.noise_multiplier)) fail("clip * noise_multiplier must be finite");
  if (!std::isfinite(denominator) || !(denominator > 0.0))
    fail("expected_weight must be finite and > 0; got " + std::to_string(denominator));
}

void check_dp_weight(double w, const char* name) {
  // w <= 1 keeps the sensitivity of the sum at clip, which is what makes z the noise multiplier.
  if (!std::isfinite(w) || w < 0.0 || w > 1.0)
    fail(std::string(name) + " must lie in [0, 1] for DP (cap them, e.g. min(n_i / n_cap, 1)); got " +
         std::to_string(w));
}

namespace {

Finalize dp_finalize(const DpParams& p, double denominator) {
  Finalize f;
  f.scale = 1.0 / denominator;
  f.noise_std = p.clip * p.noise_multiplier;
  f.noise_key = noise_key(p.seed, p.round);
  return f;
}

// Coefficients w_i * min(1, C / ||x_i||) and the summary, from norms already computed.
DpSummary clip_coefs(const double* weights, const double* norms, std::int64_t n, const DpParams& p,
                     std::vector<double>& coefs, const char* values_name) {
  DpSummary s;
  coefs.resize(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(norms[i])) fail(std::string(values_name) + " must be finite (found NaN or infinity)");
    coefs[static_cast<std::size_t>(i)] = weights[i] * clip_factor(norms[i], p.clip);
    s.num_clipped += norms[i] > p.clip ? 1 : 0;
    s.total_weight += weights[i];
  }
  s.num_updates = n;
  s.noise_std = p.clip * p.noise_multiplier;
  return s;
}

}  // namespace

template <class Out>
DpSummary dp_sum_dense(const float* const* updates, const double* weights, std::int64_t n,
                       std::int64_t size, const DpParams& p, double denominator, Out* out,
                       double* norms_out, int num_threads) {
  check_dp_params(p, denominator);
  if (n < 0 || size < 0) fail("updates must have a non-negative shape");
  for (std::int64_t i = 0; i < n; ++i) check_dp_weight(weights[i], "weights");
  const std::vector<std::int64_t> sizes(static_cast<std::size_t>(n), size);
  slice_norms(updates, sizes.data(), n, norms_out, num_threads);
  std::vector<double> coefs;
  const DpSummary s = clip_coefs(weights, norms_out, n, p, coefs, "updates");
  weighted_sum_dense(updates, coefs.data(), n, size, dp_finalize(p, denominator), out, num_threads);
  return s;
}

template <class Out>
DpSummary dp_sum_sparse(const SparseRows& updates, const double* weights, std::int64_t num_rows,
                        const DpParams& p, double denominator, Out* out, double* norms_out,
                        int num_threads) {
  check_dp_params(p, denominator);
  check_sparse_rows(updates, num_rows);
  const std::int64_t n = updates.num_clients;
  for (std::int64_t i = 0; i < n; ++i) check_dp_weight(weights[i], "weights");
  // A sparse update is clipped over the values it sends (a repeated row counts twice).
  std::vector<const float*> data(static_cast<std::size_t>(n));
  std::vector<std::int64_t> sizes(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    data[static_cast<std::size_t>(i)] = updates.values + updates.offsets[i] * updates.dim;
    sizes[static_cast<std::size_t>(i)] = (updates.offsets[i + 1] - updates.offsets[i]) * updates.dim;
  }
  slice_norms(data.data(), sizes.data(), n, norms_out, num_threads);
  std::vector<double> coefs;
  const DpSummary s = clip_coefs(weights, norms_out, n, p, coefs, "values");
  weighted_sum_sparse(updates, coefs.data(), num_rows, dp_finalize(p, denominator), out, num_threads);
  return s;
}

// ---------------------------------------------------------------------------------------------
// GaussianSum

GaussianSum::GaussianSum(std::int64_t num_rows, std::int64_t dim, const DpParams& p)
    : sum_(num_rows, dim), params_(p) {
  check_dp_params(p, 1.0);
}

double GaussianSum::add_dense(const float* x, double weight, int num_threads) {
  check_dp_weight(weight, "weight");
  const std::int64_t size = sum_.num_rows() * sum_.dim();
  double norm = 0.0;
  slice_norms(&x, &size, 1, &norm, num_threads);
  if (!std::isfinite(norm)) fail("update must be finite (found NaN or infinity)");
  sum_.add_dense(x, weight * clip_factor(norm, params_.clip), weight, num_threads);
  num_clipped_ += norm > params_.clip ? 1 : 0;
  return norm;
}

double GaussianSum::add_sparse(const std::int32_t* rows, const float* values, std::int64_t n,
                               double weight, int num_threads) {
  check_dp_weight(weight, "weight");
  if (n < 0) fail("rows must have a non-negative length");
  const std::int64_t size = n * sum_.dim();
  double norm = 0.0;
  slice_norms(&values, &size, 1, &norm, num_threads);
  if (!std::isfinite(norm)) fail("values must be finite (found NaN or infinity)");
  sum_.add_sparse(rows, values, n, weight * clip_factor(norm, params_.clip), weight);
  num_clipped_ += norm > params_.clip ? 1 : 0;
  return norm;
}

template <class Out>
void GaussianSum::finalize(double denominator, Out* out, int num_threads) const {
  check_dp_params(params_, denominator);
  sum_.finalize(dp_finalize(params_, denominator), out, num_threads);
}

void GaussianSum::reset() {
  sum_.reset();
  num_clipped_ = 0;
}

DpSummary GaussianSum::summary() const {
  DpSummary s;
  s.num_updates = sum_.num_updates();
  s.num_clipped = num_clipped_;
  s.total_weight = sum_.total_weight();
  s.noise_std = params_.clip * params_.noise_multiplier;
  return s;
}

#define FEDRECON_PRIVACY_INSTANTIATE(Out)                                                        \
  template DpSummary dp_sum_dense<Out>(const float* const*, const double*, std::int64_t,         \
                                       std::int64_t, const DpParams&, double, Out*, double*, int); \
  template DpSummary dp_sum_sparse<Out>(const SparseRows&, const double*, std::int64_t,          \
                                        const DpParams&, double, Out*, double*, int);            \
  template void GaussianSum::finalize<Out>(double, Out*, int) const;
FEDRECON_PRIVACY_INSTANTIATE(float)
FEDRECON_PRIVACY_INSTANTIATE(double)
#undef FEDRECON_PRIVACY_INSTANTIATE

}  // namespace fedrecon
