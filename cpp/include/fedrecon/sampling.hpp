// Client sampling: which clients a round trains, a pure function of (seed, round). The training
// loop in C++, the per-round Python path, the functional API, Ray and Flower all call this one
// function, so every route trains the same cohorts. No Python here.
#pragma once

#include <cstdint>

namespace fedrecon {

/// Writes min(m, num_clients) distinct client indices in [0, num_clients) to out, in a uniformly
/// random order: the first min(m, num_clients) entries of a Fisher-Yates shuffle of
/// 0..num_clients-1 drawn from stream kStreamSample of (seed, round, 0); position i swaps with
/// i + below(num_clients - i). Memory: O(m) (displaced entries live in a small hash table when
/// the population is large). Throws std::invalid_argument for negative sizes.
void sample_clients(std::int64_t num_clients, std::int64_t m, std::uint64_t seed,
                    std::uint64_t round, std::int64_t* out);

}  // namespace fedrecon
