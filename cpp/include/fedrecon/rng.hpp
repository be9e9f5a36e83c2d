// Counter-based random streams: every random number depends only on (seed, round, client,
// stream), never on threads or scheduling. The generator is fully specified (SplitMix64) so
// NumPy can reproduce it exactly; std::*_distribution is avoided (implementation-defined).
#pragma once

#include <cstdint>

namespace fedrecon {

enum Stream : std::uint64_t {
  kStreamSplit = 0,   // support/query split and per-round reshuffles
  kStreamInit = 1,    // initial user embedding
  kStreamQuant = 2,   // quantization noise
  kStreamSample = 3,  // client sampling (sampling.hpp)
  kStreamData = 4,    // per-user data shuffles and user splits (Python)
  kStreamModelInit = 5,   // initial global model (Python)
  kStreamUserTable = 6,   // stored user embeddings of the baselines (Python)
  kStreamItemTable = 7,   // centralized baseline's item table (Python)
  kStreamEpochOrder = 8,  // centralized baseline's epoch shuffles (Python)
  kStreamPrivacy = 10,    // DP-FedAvg Gaussian noise
  kStreamPoisson = 11,    // Poisson client sampling (Python)
  kStreamClipCount = 12,  // noise on adaptive clipping's unclipped count (Python)
};

inline std::uint64_t splitmix64_next(std::uint64_t& state) {
  state += 0x9E3779B97F4A7C15ULL;
  std::uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline std::uint64_t mix64(std::uint64_t x) { return splitmix64_next(x); }

/// The seed of one random stream: a hash of (seed, round, client, stream).
inline std::uint64_t derive_seed(std::uint64_t seed, std::uint64_t round, std::uint64_t client,
                                 std::uint64_t stream) {
  std::uint64_t h = mix64(seed);
  h = mix64(h ^ round);
  h = mix64(h ^ client);
  return mix64(h ^ stream);
}

/// The high 64 bits of the 128-bit product a * b.
inline std::uint64_t mul_hi(std::uint64_t a, std::uint64_t b) {
#if defined(__SIZEOF_INT128__)
  return static_cast<std::uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else
  const std::uint64_t a_lo = a & 0xffffffffu, a_hi = a >> 32, b_lo = b & 0xffffffffu, b_hi = b >> 32;
  const std::uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const std::uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xffffffffu) + lo_hi;
  return (hi_lo >> 32) + (cross >> 32) + hi_hi;
#endif
}

/// The first n draws of Rng(seed).below(m_t) with descending bounds m_t = first_bound - t:
/// out[t] is the t-th draw. Draw t is a pure function of seed + (t + 1) * gamma, so the loop
/// vectorises where the target has 64-bit vector multiplies (AVX-512); the draws are the same
/// either way. (Fisher-Yates of first_bound elements takes first_bound - 1 of them.)
inline void below_descending(std::uint64_t seed, std::uint64_t first_bound, std::int64_t n, std::uint32_t* out) {
  for (std::int64_t t = 0; t < n; ++t) {
    std::uint64_t z = seed + static_cast<std::uint64_t>(t + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    out[t] = static_cast<std::uint32_t>(((z >> 32) * (first_bound - static_cast<std::uint64_t>(t))) >> 32);
  }
}

class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() { return splitmix64_next(state_); }
  /// Uniform in [0, 1) with 24 random bits (exact in float32).
  float uniform01() { return static_cast<float>(next() >> 40) * 0x1p-24f; }
  /// Uniform integer in [0, n) for n < 2^32 (multiply-shift; bias below 2^-32 * n).
  std::uint64_t below(std::uint64_t n) { return ((next() >> 32) * n) >> 32; }
  /// Uniform integer in [0, n) for any n >= 1: the high 64 bits of next() * n (multiply-shift;
  /// bias below 2^-64 * n).
  std::uint64_t below64(std::uint64_t n) { return mul_hi(next(), n); }

 private:
  std::uint64_t state_;
};

}  // namespace fedrecon
