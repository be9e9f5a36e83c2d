// Centralized matrix factorization (the paper's "Centralized" baseline): user and item
// embeddings trained together on one server by minibatch SGD over all ratings.
#pragma once

#include <cstdint>

namespace fedrecon {

/// Factor tables updated in place. Biases are optional (both or neither).
struct MfTables {
  float* users = nullptr;      // num_users x dim
  float* user_bias = nullptr;  // num_users, or nullptr
  std::int64_t num_users = 0;
  float* items = nullptr;      // num_items x dim
  float* item_bias = nullptr;  // num_items, or nullptr
  std::int64_t num_items = 0;
  int dim = 0;
  float global_mean = 0.0f;
};

struct MfSgdConfig {
  int batch_size = 5;
  float lr = 0.1f;
  float l2 = 0.0f;  // batch loss += l2 * (|u|^2 + |v|^2) over the distinct rows in the batch
};

/// One pass of minibatch SGD over `n` ratings in the given order (the caller shuffles). Per
/// batch the loss is the mean squared error; gradients are taken at the pre-step values, summed
/// over repeated rows, and applied once. Serial, so the result is deterministic. Returns the sum
/// of squared errors of the pre-step predictions. Throws std::invalid_argument /
/// std::out_of_range on bad sizes or ids.
double mf_sgd_epoch(const MfTables& tables, const std::int64_t* users, const std::int32_t* items,
                    const float* ratings, std::int64_t n, const MfSgdConfig& config);

}  // namespace fedrecon
