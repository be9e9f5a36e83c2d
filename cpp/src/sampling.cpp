#include "fedrecon/sampling.hpp"

#include <algorithm>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "fedrecon/rng.hpp"

namespace fedrecon {

void sample_clients(std::int64_t num_clients, std::int64_t m, std::uint64_t seed,
                    std::uint64_t round, std::int64_t* out) {
  if (num_clients < 0 || m < 0) throw std::invalid_argument("num_clients and m must be >= 0");
  const std::int64_t n = std::min(m, num_clients);
  Rng rng(derive_seed(seed, round, 0, kStreamSample));
  // A partial Fisher-Yates shuffle of the virtual array a[x] = x: only the first n positions
  // are drawn. A small population is an array; a large one keeps only the displaced entries.
  if (num_clients <= std::max<std::int64_t>(8 * n, 1 << 16)) {
    std::vector<std::int64_t> a(static_cast<std::size_t>(num_clients));
    for (std::int64_t x = 0; x < num_clients; ++x) a[static_cast<std::size_t>(x)] = x;
    for (std::int64_t i = 0; i < n; ++i) {
      const auto j = i + static_cast<std::int64_t>(rng.below64(static_cast<std::uint64_t>(num_clients - i)));
      std::swap(a[static_cast<std::size_t>(i)], a[static_cast<std::size_t>(j)]);
      out[i] = a[static_cast<std::size_t>(i)];
    }
    return;
  }
  std::unordered_map<std::int64_t, std::int64_t> moved;
  moved.reserve(static_cast<std::size_t>(2 * n));
  const auto at = [&](std::int64_t x) {
    const auto it = moved.find(x);
    return it == moved.end() ? x : it->second;
  };
  for (std::int64_t i = 0; i < n; ++i) {
    const auto j = i + static_cast<std::int64_t>(rng.below64(static_cast<std::uint64_t>(num_clients - i)));
    const std::int64_t ai = at(i), aj = at(j);
    moved[j] = ai;
    out[i] = aj;
  }
}

}  // namespace fedrecon
