#include "fedrecon/centralized.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace fedrecon {

namespace {
using VecMap = Eigen::Map<Eigen::VectorXf>;
using CVecMap = Eigen::Map<const Eigen::VectorXf>;
}  // namespace

double mf_sgd_epoch(const MfTables& t, const std::int64_t* users, const std::int32_t* items,
                    const float* ratings, std::int64_t n, const MfSgdConfig& config) {
  if (t.dim < 1) throw std::invalid_argument("dim must be >= 1");
  if (config.batch_size < 1) throw std::invalid_argument("batch_size must be >= 1");
  if (!(config.lr >= 0.0f) || !(config.l2 >= 0.0f)) throw std::invalid_argument("lr and l2 must be >= 0");
  if ((t.user_bias == nullptr) != (t.item_bias == nullptr))
    throw std::invalid_argument("user_bias and item_bias must be given together");
  for (std::int64_t j = 0; j < n; ++j) {
    if (users[j] < 0 || users[j] >= t.num_users)
      throw std::out_of_range("user id " + std::to_string(users[j]) + " is outside the user table");
    if (items[j] < 0 || items[j] >= t.num_items)
      throw std::out_of_range("item id " + std::to_string(items[j]) + " is outside the item table");
  }
  const std::int64_t K = t.dim;
  const bool bias = t.user_bias != nullptr;
  const std::int64_t B = std::max<std::int64_t>(1, std::min<std::int64_t>(config.batch_size, n));
  // Pre-step copies of the batch's rows, so repeated users/items in a batch see the same values.
  std::vector<float> u0(static_cast<std::size_t>(B * K)), v0(static_cast<std::size_t>(B * K));
  std::vector<float> err(static_cast<std::size_t>(B));
  std::vector<std::int64_t> user_stamp, item_stamp;
  if (config.l2 > 0.0f) {
    user_stamp.assign(static_cast<std::size_t>(t.num_users), -1);
    item_stamp.assign(static_cast<std::size_t>(t.num_items), -1);
  }
  double sse = 0.0;
  for (std::int64_t lo = 0; lo < n; lo += B) {
    const std::int64_t m = std::min(B, n - lo);
    for (std::int64_t j = 0; j < m; ++j) {
      const std::int64_t a = users[lo + j];
      const std::int64_t b = items[lo + j];
      VecMap(u0.data() + j * K, K) = CVecMap(t.users + a * K, K);
      VecMap(v0.data() + j * K, K) = CVecMap(t.items + b * K, K);
      float p = CVecMap(u0.data() + j * K, K).dot(CVecMap(v0.data() + j * K, K)) + t.global_mean;
      if (bias) p += t.user_bias[a] + t.item_bias[b];
      err[static_cast<std::size_t>(j)] = p - ratings[lo + j];
      sse += static_cast<double>(err[static_cast<std::size_t>(j)]) * err[static_cast<std::size_t>(j)];
    }
    if (config.l2 > 0.0f) {
      // L2 once per distinct row, at its pre-step value (decay before the data gradient).
      const float decay = 1.0f - config.lr * 2.0f * config.l2;
      for (std::int64_t j = 0; j < m; ++j) {
        const std::int64_t a = users[lo + j];
        const std::int64_t b = items[lo + j];
        if (user_stamp[static_cast<std::size_t>(a)] != lo) {
          user_stamp[static_cast<std::size_t>(a)] = lo;
          VecMap(t.users + a * K, K) *= decay;
        }
        if (item_stamp[static_cast<std::size_t>(b)] != lo) {
          item_stamp[static_cast<std::size_t>(b)] = lo;
          VecMap(t.items + b * K, K) *= decay;
        }
      }
    }
    const float scale = config.lr * 2.0f / static_cast<float>(m);
    for (std::int64_t j = 0; j < m; ++j) {
      const std::int64_t a = users[lo + j];
      const std::int64_t b = items[lo + j];
      const float g = scale * err[static_cast<std::size_t>(j)];
      VecMap(t.users + a * K, K) -= g * CVecMap(v0.data() + j * K, K);
      VecMap(t.items + b * K, K) -= g * CVecMap(u0.data() + j * K, K);
      if (bias) {
        t.user_bias[a] -= g;
        t.item_bias[b] -= g;
      }
    }
  }
  return sse;
}

}  // namespace fedrecon
