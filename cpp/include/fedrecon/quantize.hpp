// Stochastic uniform quantization to b bits (1..16) with an optional randomized Hadamard
// rotation. No Python here.
//
// An array is viewed as `rows x cols` (the last axis is `cols`; a 1-D array is one row, a 0-d
// array one value). With the rotation every row is zero-padded to `padded_cols`, the next power
// of two, multiplied by random signs and transformed by the orthonormal fast Walsh-Hadamard
// transform; without it `padded_cols == cols`. The `rows x padded_cols` values are then split into
// scale groups (the whole array, or one per row) with lo = min, hi = max, L = 2^b - 1 levels and
// step = (hi - lo) / L, rounded up to float32 so that lo + L*step >= hi. Each value gets
//   index = min(floor((x - lo) / step + u), L),  u ~ U[0, 1) (24 random bits),
// in double precision; it decodes to float32(lo + index * step). So E[decoded] = x up to 2^-24
// of a step, and |decoded - x| <= step (plus the float32 rounding of the decoded value).
//
// Random numbers are counter-based (rng.hpp): `key = derive_seed(seed, round, client,
// kStreamQuant)`; row r uses the stream Rng(noise_seed(key, r)) for its rounding noise, value j
// taking 24 bits of output j / 2 (bits 40..63 for even j, bits 16..39 for odd j: u = those bits
// * 2^-24), and Rng(sign_seed(key, r)) for its signs, value j taking bit j % 64 of output j / 64
// (bit set: negative). Results therefore never depend on the thread count.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "fedrecon/rng.hpp"

namespace fedrecon {

constexpr int kMinQuantBits = 1;
constexpr int kMaxQuantBits = 16;

/// How to quantize one array.
struct QuantScheme {
  int bits = 8;
  bool row_scaling = false;  // one (lo, step) per row instead of one for the whole array
  bool hadamard = false;     // randomized Hadamard rotation of every row before quantizing
  std::uint64_t key = 0;     // derive_seed(seed, round, client, kStreamQuant)
};

/// The scale of one group: values decode to lo + index * step.
struct QuantGroup {
  float lo = 0.0f;
  float step = 0.0f;
};

/// The rows x cols view of an array and the quantized matrix derived from it.
struct QuantLayout {
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t padded_cols = 0;  // next power of two >= cols with the rotation, else cols
  std::int64_t num_values = 0;   // rows * padded_cols: the number of encoded indices
  std::int64_t num_groups = 0;   // 0 without values, else rows (row scaling) or 1
};

/// Work split of the kernels: blocks of kQuantBlock values (a multiple of 8, so that a block of
/// packed indices starts on a byte boundary).
constexpr std::int64_t kQuantBlock = 16384;

/// Largest number of encoded values an array may have (keeps every size computation exact).
constexpr std::int64_t kMaxQuantValues = std::int64_t{1} << 56;

/// Throws std::invalid_argument unless 1 <= bits <= 16.
void check_bits(int bits);
/// Smallest power of two >= n (0 for n == 0).
std::int64_t next_pow2(std::int64_t n);
/// Validates the scheme and sizes; throws std::invalid_argument when they are too large.
QuantLayout quant_layout(std::int64_t rows, std::int64_t cols, const QuantScheme& scheme);
/// rows x cols of an array of the given shape (ndim 0..8).
void shape_rows_cols(const std::int64_t* shape, int ndim, std::int64_t& rows, std::int64_t& cols);

/// Seeds of the per-row random streams.
std::uint64_t noise_seed(std::uint64_t key, std::int64_t row);
std::uint64_t sign_seed(std::uint64_t key, std::int64_t row);

/// The same seeds in two steps, for callers that visit many rows of one key: the key's part
/// once (derive_seed's seed and round steps), then each row's noise and sign seeds from it.
struct RowSeeds {
  std::uint64_t noise = 0;
  std::uint64_t sign = 0;
};
inline std::uint64_t row_seed_prefix(std::uint64_t key) { return mix64(mix64(key) ^ 0U); }
inline RowSeeds row_seeds(std::uint64_t prefix, std::int64_t row) {
  const std::uint64_t h = mix64(prefix ^ static_cast<std::uint64_t>(row));
  return RowSeeds{mix64(h ^ 0U), mix64(h ^ 1U)};
}

/// The scale of a group whose values lie in [lo, hi]; throws std::invalid_argument if the
/// decoded range would not be finite in float32.
QuantGroup make_group(float lo, float hi, int bits);

/// Whether every value of the group's grid stays finite through an (inverse) Hadamard transform
/// of n values: the unnormalized transform's partial sums reach n * max|grid value|.
bool rotation_fits(const QuantGroup& g, int bits, std::int64_t n);

inline float dequantize(const QuantGroup& g, std::uint32_t index) {
  // index * step is exact in double (16 x 24 bits), so this is one rounding to double and one
  // to float32 on every platform, with or without fused multiply-add.
  return static_cast<float>(static_cast<double>(g.lo) +
                            static_cast<double>(index) * static_cast<double>(g.step));
}

/// What a zero (a row of a dense update that the client did not touch) quantizes to in a group:
/// stochastic rounding leaves only two indices, `low` when the value's 24 random bits are below
/// `threshold` and `high` otherwise (threshold 2^24: always `low`). Found once per group by a
/// binary search over the 2^24 draws with the quantizer's own arithmetic, so it is exact.
struct ZeroCode {
  std::uint32_t low = 0;
  std::uint32_t high = 0;
  std::uint32_t threshold = std::uint32_t{1} << 24;
};
ZeroCode zero_code(const QuantGroup& g, int bits);

/// Decoded values of the first n columns of a row of zeros whose noise stream is `seed`
/// (noise_seed(key, row)): `low_value` or `high_value` by the rule of ZeroCode, one stream output
/// per two values. Equals quantize_row on zeros followed by dequantize.
void decode_zero_run(std::int64_t n, std::uint64_t seed, std::uint32_t threshold, float low_value,
                     float high_value, float* out);

/// In-place orthonormal randomized Hadamard transform of one padded row of length n (a power of
/// two): forward x <- H D x / sqrt(n), inverse x <- D H x / sqrt(n), D = diag(signs).
void hadamard_forward(float* row, std::int64_t n, std::uint64_t signs_seed);
void hadamard_inverse(float* row, std::int64_t n, std::uint64_t signs_seed);

/// Indices of the flat values [begin, end) of the rows x padded_cols matrix being quantized;
/// `values` points at value `begin` (a span may cross rows).
void quantize_span(const float* values, const QuantLayout& layout, const QuantScheme& scheme,
                   const QuantGroup* groups, std::int64_t begin, std::int64_t end,
                   std::uint32_t* indices);

/// Indices of one whole (rotated, padded) row r of padded_cols values with its scale group: the
/// same numbers quantize_span gives that row, for callers that quantize rows one at a time.
void quantize_row(const float* row, std::int64_t padded_cols, std::int64_t r, const QuantScheme& scheme,
                  const QuantGroup& group, std::uint32_t* indices);

/// Receives the indices of the values [begin, end) of one block, with the scales (those of the
/// block's rows are final), on worker thread `tid` (< resolve_threads(num_threads, n) for any n).
using QuantSink = std::function<void(std::int64_t begin, std::int64_t end, const std::uint32_t* indices,
                                     const QuantGroup* groups, int tid)>;

/// Quantizes x (rows x cols, C order) block by block in parallel and returns the scale groups.
/// Blocks are kQuantBlock values (or whole rows with the rotation; each block starts at a
/// multiple of 8 values). The rotated values are recomputed per block, never stored whole.
/// Throws std::invalid_argument naming `name` for NaN or infinite values.
std::vector<QuantGroup> quantize_blocks(const float* x, const QuantLayout& layout, const QuantScheme& scheme,
                                        int num_threads, const char* name, const QuantSink& sink);

/// Quantize-dequantize round trip of x (rows x cols) into out (rows x cols); equals decoding
/// the encoded array. num_threads <= 0: all cores.
void quantize_roundtrip(const float* x, std::int64_t rows, std::int64_t cols,
                        const QuantScheme& scheme, float* out, int num_threads,
                        const char* name = "x");

/// acc (rows x cols, float64) += weight * quantize_roundtrip(x), without the decoded array: the
/// fused quantize -> dequantize -> accumulate of simulations. Deterministic for any num_threads.
void quantize_accumulate(const float* x, std::int64_t rows, std::int64_t cols, const QuantScheme& scheme,
                         double weight, double* acc, int num_threads, const char* name = "x");

}  // namespace fedrecon
