// The training loop in C++: rounds of sampling, the fused round and the server SGD step, with
// no Python between them. For the configurations that need no per-round work outside the
// native code (plain server SGD, no DP noise, no learned user default); the Python trainer
// runs everything else round by round. No Python here.
#pragma once

#include <cstdint>
#include <vector>

#include "fedrecon/cohort.hpp"

namespace fedrecon {

/// What one round of train_rounds did.
struct RoundRecord {
  RoundSummary summary;
  std::int64_t num_sampled = 0;
  double seconds = 0.0;  // wall time: sampling, clients, reduction and the step
};

/// Runs rounds first_round .. first_round + num_rounds - 1 on `model`, whose arrays it updates
/// in place: each round samples min(clients_per_round, data.num_clients) clients
/// (sample_clients(seed, round)), runs train_round on them and takes the server step `step`
/// (InPlaceStep: SGD, or SGD with momentum; its model pointers are set here to the model's
/// arrays) - exactly what a Python loop of those calls gives, bit for bit.
/// Stops after a round that diverged (every sampled client's update was non-finite, or the
/// step left a row non-finite: RoundSummary says which) and returns the records of the rounds
/// run. Throws what train_round throws.
/// When dim is not a multiple of 8, the rounds run on a copy of V (and of the velocity) with
/// rows padded to whole vectors, written back when the call returns (tables up to 64 MiB): the
/// clients then read V's rows in place. The arithmetic, and so every bit, is the same.
std::vector<RoundRecord> train_rounds(const ModelView& model, const CsrView& data,
                                      const ClientConfig& config, const UpdateCodec& codec,
                                      std::uint64_t seed, std::uint64_t first_round,
                                      std::int64_t num_rounds, std::int64_t clients_per_round,
                                      InPlaceStep step, int num_threads);

}  // namespace fedrecon
