// What a client sends in a round (DESIGN §1.4-§1.6): its update, optionally clipped to an L2
// norm (DP-FedAvg) and quantized (stochastic rounding, optional Hadamard rotation), as touched
// rows only or as a dense num_items x dim delta. The simulation aggregates exactly the values
// the wire format would decode to, and counts the bytes it would take.
#pragma once

#include <cstdint>
#include <vector>

#include "fedrecon/quantize.hpp"

namespace fedrecon {

struct UpdateCodec {
  int bits = 0;                // 0: float32; else 1..16 bits per value of the item factors
  bool row_scaling = false;    // one scale per row instead of one per client update
  bool hadamard = false;       // randomized Hadamard rotation of each row before quantizing
  bool sparse = true;          // touched rows only (row ids + values); else a dense delta
  std::int64_t threshold = 0;  // item factors with fewer elements than this stay float32
  double clip = 0.0;           // > 0: scale the update (factors and biases) to L2 norm <= clip
  bool quantizes(std::int64_t num_items, int dim) const {
    return bits > 0 && num_items * dim >= threshold;
  }
};

/// Per-thread buffers of the codec.
struct CodecScratch {
  std::vector<float> row;
  std::vector<std::uint32_t> indices;
};

/// How one client's update was encoded: enough to decode rows it did not touch.
struct EncodedUpdate {
  QuantScheme scheme;
  QuantGroup group;            // the update's scale (per-tensor scaling)
  bool noisy_zeros = false;    // dense, quantized, one scale: untouched rows decode to noise
  // With noisy_zeros: the two values a zero decodes to, and the draw from which it takes the
  // higher (ZeroCode), found once per client so that untouched rows cost one draw per two values.
  float zero_low = 0.0f, zero_high = 0.0f;
  std::uint32_t zero_threshold = 0;
  std::uint64_t seed_prefix = 0;  // row_seed_prefix(scheme.key)
};

/// Clips and quantizes one client's update in place: `values` holds its n touched rows (n x dim,
/// global row ids `rows`), `bias` their item-bias deltas (or nullptr). Returns the bytes the
/// client sends; sets `clipped` when clipping scaled the update down.
std::int64_t encode_update(const UpdateCodec& codec, std::int64_t num_items, int dim,
                           const std::int32_t* rows, std::int64_t n, float* values, float* bias,
                           std::uint64_t key, EncodedUpdate& enc, bool& clipped, CodecScratch& scratch);

/// Marks `enc` (scheme and group set) as a dense update whose untouched rows decode to noise,
/// and prepares that decoding (its ZeroCode and row-seed prefix). encode_update calls it; so does
/// a caller that rebuilds an update from its scale and key alone (reduce_updates' DenseNoise).
void set_noisy_zeros(EncodedUpdate& enc);

/// The decoded value (dim floats) of row r of a dense update that did not touch it: what
/// quantizing and decoding its zeros gives, computed from the ZeroCode of encode_update.
void decode_untouched_row(const EncodedUpdate& enc, std::int64_t r, int dim, float* out,
                          CodecScratch& scratch);

}  // namespace fedrecon
