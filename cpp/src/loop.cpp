#include "fedrecon/loop.hpp"

#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>

#include "fedrecon/sampling.hpp"

namespace fedrecon {

namespace {

// Tables up to this size are padded for the loop; for a larger one the copy costs more memory
// than its gathers cost time (its rows come from DRAM either way).
constexpr std::int64_t kPadBytes = std::int64_t{64} << 20;

// Rows of dim floats (V, the momentum's velocity) padded to `stride` floats with zeros past dim
// for the duration of a train_rounds call, so that the clients read V's rows in place
// (ModelView::stride); written back to the caller's array when the loop returns or throws.
class PaddedRows {
 public:
  PaddedRows(float* rows, std::int64_t n, int dim, std::int64_t stride)
      : rows_(rows), n_(n), dim_(dim), stride_(stride), padded_(static_cast<std::size_t>(n * stride), 0.0f) {
    for (std::int64_t i = 0; i < n; ++i) std::copy_n(rows + i * dim, dim, padded_.data() + i * stride);
  }
  PaddedRows(const PaddedRows&) = delete;
  PaddedRows& operator=(const PaddedRows&) = delete;
  ~PaddedRows() {
    for (std::int64_t i = 0; i < n_; ++i) std::copy_n(padded_.data() + i * stride_, dim_, rows_ + i * dim_);
  }
  float* data() { return padded_.data(); }

 private:
  float* rows_;
  std::int64_t n_;
  int dim_;
  std::int64_t stride_;
  std::vector<float> padded_;
};

std::vector<RoundRecord> run_rounds(const ModelView& model, const CsrView& data, const ClientConfig& config,
                                    const UpdateCodec& codec, std::uint64_t seed, std::uint64_t first_round,
                                    std::int64_t num_rounds, std::int64_t clients_per_round, InPlaceStep step,
                                    int num_threads) {
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

}  // namespace

std::vector<RoundRecord> train_rounds(const ModelView& model, const CsrView& data,
                                      const ClientConfig& config, const UpdateCodec& codec,
                                      std::uint64_t seed, std::uint64_t first_round,
                                      std::int64_t num_rounds, std::int64_t clients_per_round,
                                      InPlaceStep step, int num_threads) {
  if (num_rounds < 0 || clients_per_round < 1)
    throw std::invalid_argument("num_rounds must be >= 0 and clients_per_round >= 1");
  const std::int64_t P = padded_dim(model.dim);
  const bool pad = model.stride() == model.dim && P != model.dim && num_rounds > 0 &&
                   model.num_items * P * static_cast<std::int64_t>(sizeof(float)) <= kPadBytes;
  if (!pad)
    return run_rounds(model, data, config, codec, seed, first_round, num_rounds, clients_per_round, step, num_threads);
  // Written back also when a round throws: the caller's arrays then hold the rounds that
  // completed, as when the loop runs on them directly.
  PaddedRows rows(const_cast<float*>(model.item_factors), model.num_items, model.dim, P);
  std::unique_ptr<PaddedRows> velocity;
  if (step.velocity != nullptr) {
    velocity = std::make_unique<PaddedRows>(step.velocity, model.num_items, model.dim, P);
    step.velocity = velocity->data();
  }
  ModelView padded = model;
  padded.item_factors = rows.data();
  padded.row_stride = P;
  return run_rounds(padded, data, config, codec, seed, first_round, num_rounds, clients_per_round, step, num_threads);
}

}  // namespace fedrecon
