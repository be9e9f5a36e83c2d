#include "fedrecon/loop.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "fedrecon/sampling.hpp"

namespace fedrecon {

std::vector<RoundRecord> train_rounds(const ModelView& model, const CsrView& data,
                                      const ClientConfig& config, const UpdateCodec& codec,
                                      std::uint64_t seed, std::uint64_t first_round,
                                      std::int64_t num_rounds, std::int64_t clients_per_round,
                                      InPlaceStep step, int num_threads) {
  if (num_rounds < 0 || clients_per_round < 1)
    throw std::invalid_argument("num_rounds must be >= 0 and clients_per_round >= 1");
  step.item_factors = const_cast<float*>(model.item_factors);
  step.item_bias = const_cast<float*>(model.item_bias);
  const std::int64_t m = std::min(clients_per_round, data.num_clients);
  std::vector<std::int64_t> clients(static_cast<std::size_t>(m));
  std::vector<ClientStats> stats(static_cast<std::size_t>(m));
  std::vector<RoundRecord> records;
  records.reserve(static_cast<std::size_t>(num_rounds));
  for (std::int64_t k = 0; k < num_rounds; ++k) {
    const auto start = std::chrono::steady_clock::now();
    const std::uint64_t round = first_round + static_cast<std::uint64_t>(k);
    sample_clients(data.num_clients, m, seed, round, clients.data());
    RoundRecord r;
    r.num_sampled = m;
    r.summary = train_round(model, data, clients.data(), m, config, seed, round, num_threads, nullptr,
                            nullptr, stats.data(), UserState(), codec, step);
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    records.push_back(r);
    const bool all_nonfinite = r.summary.num_reporting == 0 && r.summary.num_nonfinite > 0;
    if (all_nonfinite || r.summary.nonfinite_rows > 0) break;
  }
  return records;
}

}  // namespace fedrecon
