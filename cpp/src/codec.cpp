#include "fedrecon/codec.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "fedrecon/wire.hpp"

namespace fedrecon {

namespace {

// Row r of a dense update (`src`: its dim values) quantized and decoded into out, exactly as the
// wire format's dense encode/decode would.
void roundtrip_row(const float* src, std::int64_t r, int dim, const QuantScheme& scheme,
                   const QuantGroup& group, float* out, CodecScratch& s) {
  const std::int64_t pc = scheme.hadamard ? next_pow2(dim) : dim;
  s.row.assign(static_cast<std::size_t>(pc), 0.0f);
  s.indices.resize(static_cast<std::size_t>(pc));
  std::copy_n(src, dim, s.row.data());
  if (scheme.hadamard) hadamard_forward(s.row.data(), pc, sign_seed(scheme.key, r));
  quantize_row(s.row.data(), pc, r, scheme, group, s.indices.data());
  for (std::int64_t j = 0; j < pc; ++j)
    s.row[static_cast<std::size_t>(j)] = dequantize(group, s.indices[static_cast<std::size_t>(j)]);
  if (scheme.hadamard) hadamard_inverse(s.row.data(), pc, sign_seed(scheme.key, r));
  std::copy_n(s.row.data(), dim, out);
}

// min/max of the (rotated, padded) values of the touched rows.
void row_range(const float* src, std::int64_t r, int dim, const QuantScheme& scheme, float& lo,
               float& hi, CodecScratch& s) {
  const std::int64_t pc = scheme.hadamard ? next_pow2(dim) : dim;
  s.row.assign(static_cast<std::size_t>(pc), 0.0f);
  std::copy_n(src, dim, s.row.data());
  if (scheme.hadamard) hadamard_forward(s.row.data(), pc, sign_seed(scheme.key, r));
  const auto mm = std::minmax_element(s.row.begin(), s.row.end());
  lo = std::min(lo, *mm.first);
  hi = std::max(hi, *mm.second);
}

// The dense codec's scale of a group; with the rotation, one whose grid could overflow the
// inverse transform is refused, as the wire format's encoder refuses it.
QuantGroup dense_group(float lo, float hi, const QuantScheme& scheme, int dim) {
  const QuantGroup g = make_group(lo, hi, scheme.bits);
  if (scheme.hadamard && !rotation_fits(g, scheme.bits, next_pow2(dim)))
    throw std::invalid_argument("update is too large: its Hadamard rotation overflows float32");
  return g;
}

}  // namespace

std::int64_t encode_update(const UpdateCodec& codec, std::int64_t num_items, int dim,
                           const std::int32_t* rows, std::int64_t n, float* values, float* bias,
                           std::uint64_t key, EncodedUpdate& enc, bool& clipped, CodecScratch& s) {
  const std::int64_t K = dim;
  clipped = false;
  if (codec.clip > 0.0) {
    double sq = 0.0;
    for (std::int64_t k = 0; k < n * K; ++k) sq += static_cast<double>(values[k]) * values[k];
    if (bias != nullptr)
      for (std::int64_t k = 0; k < n; ++k) sq += static_cast<double>(bias[k]) * bias[k];
    const double norm = std::sqrt(sq);
    if (norm > codec.clip) {
      const auto scale = static_cast<float>(codec.clip / norm);
      for (std::int64_t k = 0; k < n * K; ++k) values[k] *= scale;
      if (bias != nullptr)
        for (std::int64_t k = 0; k < n; ++k) bias[k] *= scale;
      clipped = true;
    }
  }

  enc = EncodedUpdate();
  enc.scheme.bits = std::max(codec.bits, kMinQuantBits);
  enc.scheme.row_scaling = codec.row_scaling;
  enc.scheme.hadamard = codec.hadamard;
  enc.scheme.key = key;
  const bool quantize = codec.quantizes(num_items, dim);
  const std::int64_t bias_bytes = bias != nullptr ? 4 * (codec.sparse ? n : num_items) : 0;
  if (!quantize) {
    // float32 values; sparse updates also send a 4-byte id per row.
    const std::int64_t factor_bytes = codec.sparse ? n * (4 + 4 * K) : 4 * num_items * K;
    return factor_bytes + bias_bytes;
  }

  const std::int64_t shape[2] = {num_items, K};
  if (codec.sparse) {
    // The n x dim block is the encoded array: quantize it as the sparse wire format does.
    s.row.resize(static_cast<std::size_t>(n * K));
    quantize_roundtrip(values, n, K, enc.scheme, s.row.data(), 1, "update");
    std::copy_n(s.row.data(), n * K, values);
    return static_cast<std::int64_t>(encoded_size(shape, 2, enc.scheme, n)) + bias_bytes;
  }

  // Dense: the encoded array is num_items x dim, zero outside the touched rows.
  if (codec.row_scaling) {
    for (std::int64_t k = 0; k < n; ++k) {
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      row_range(values + k * K, rows[k], dim, enc.scheme, lo, hi, s);
      roundtrip_row(values + k * K, rows[k], dim, enc.scheme, dense_group(lo, hi, enc.scheme, dim),
                    values + k * K, s);
    }
    // An untouched row is all zeros: its own scale is 0 and it decodes to exact zeros.
  } else {
    float lo = n < num_items ? 0.0f : std::numeric_limits<float>::infinity();
    float hi = n < num_items ? 0.0f : -std::numeric_limits<float>::infinity();
    for (std::int64_t k = 0; k < n; ++k) row_range(values + k * K, rows[k], dim, enc.scheme, lo, hi, s);
    if (n == 0 && num_items > 0) lo = hi = 0.0f;
    enc.group = dense_group(lo, hi, enc.scheme, dim);
    for (std::int64_t k = 0; k < n; ++k)
      roundtrip_row(values + k * K, rows[k], dim, enc.scheme, enc.group, values + k * K, s);
    if (n < num_items && enc.group.step != 0.0f) set_noisy_zeros(enc);
  }
  return static_cast<std::int64_t>(encoded_size(shape, 2, enc.scheme)) + bias_bytes;
}

void set_noisy_zeros(EncodedUpdate& enc) {
  const ZeroCode z = zero_code(enc.group, enc.scheme.bits);
  enc.noisy_zeros = true;
  enc.zero_low = dequantize(enc.group, z.low);
  enc.zero_high = dequantize(enc.group, z.high);
  enc.zero_threshold = z.threshold;
  enc.seed_prefix = row_seed_prefix(enc.scheme.key);
}

void decode_untouched_row(const EncodedUpdate& enc, std::int64_t r, int dim, float* out, CodecScratch& s) {
  if (!enc.noisy_zeros) {
    std::fill_n(out, dim, 0.0f);
    return;
  }
  const RowSeeds seeds = row_seeds(enc.seed_prefix, r);  // noise_seed and sign_seed of row r
  if (!enc.scheme.hadamard) {
    decode_zero_run(dim, seeds.noise, enc.zero_threshold, enc.zero_low, enc.zero_high, out);
    return;
  }
  // A rotated row of zeros is zeros (padding included): decode the quantized zeros of the padded
  // row, then rotate back. The forward rotation and the divisions of quantizing are skipped.
  const std::int64_t pc = next_pow2(dim);
  s.row.resize(static_cast<std::size_t>(pc));
  decode_zero_run(pc, seeds.noise, enc.zero_threshold, enc.zero_low, enc.zero_high, s.row.data());
  hadamard_inverse(s.row.data(), pc, seeds.sign);
  std::copy_n(s.row.data(), dim, out);
}

}  // namespace fedrecon
