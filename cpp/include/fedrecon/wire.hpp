// The versioned wire format of quantized arrays and sparse row updates, and the fused
// decode -> weighted accumulate. No Python here.
//
// All integers are little-endian; byte offsets:
//
//   0   4        magic "FRQW"
//   4   2        format version (u16) = kWireVersion
//   6   1        dtype of the decoded values (1 = float32)
//   7   1        bits per index, 1..16
//   8   1        flags: bit 0 row scaling, bit 1 Hadamard rotation, bit 2 sparse rows; others 0
//   9   1        ndim, 0..8 (sparse: 2)
//   10  2        reserved, 0
//   12  8        key (u64): seeds of the noise and of the Hadamard signs (quantize.hpp)
//   20  8*ndim   shape (u64 each); sparse: (number of rows sent n, cols)
//   [sparse only]
//       8        num_rows (u64): size of the table the row ids index, row ids < num_rows
//       4*n      row ids (u32)
//   .   8*G      scales: G pairs (lo f32, step f32); G = 0 without values, else rows with row
//                scaling, else 1
//   .   ceil(V*bits/8)  indices, V = rows * padded_cols; index i occupies bits
//                [i*bits, (i+1)*bits) of the payload, least significant bit first (bit k of the
//                payload is bit k % 8 of byte k / 8); unused bits of the last byte are 0
//   end-4  4     CRC-32 (IEEE 802.3 / zlib polynomial) of all preceding bytes
//
// Decoding validates everything (magic, version, dtype, bits, flags, ndim, reserved bytes,
// sizes, CRC, row ids, scales) and throws std::invalid_argument saying what is wrong; it never
// reads outside the buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fedrecon/quantize.hpp"

namespace fedrecon {

constexpr std::uint16_t kWireVersion = 1;
constexpr std::uint8_t kWireDtypeFloat32 = 1;
constexpr std::uint8_t kWireFlagRowScaling = 1;
constexpr std::uint8_t kWireFlagHadamard = 2;
constexpr std::uint8_t kWireFlagSparse = 4;
constexpr std::size_t kWireFixedHeader = 20;
constexpr int kWireMaxNdim = 8;
/// Row ids are stored as u32 and returned as int32: a sparse table has at most 2^31 rows.
constexpr std::int64_t kWireMaxSparseRows = std::int64_t{1} << 31;

/// A parsed, fully validated buffer.
struct WireHeader {
  std::uint16_t version = 0;
  std::uint8_t dtype = 0;
  QuantScheme scheme;
  bool sparse = false;
  int ndim = 0;
  std::int64_t shape[kWireMaxNdim] = {};
  std::int64_t num_rows = 0;  // sparse: rows of the indexed table
  QuantLayout layout;
  std::size_t rows_offset = 0;  // sparse: byte offset of the row ids
  std::size_t scales_offset = 0;
  std::size_t payload_offset = 0;
  std::size_t payload_bytes = 0;
  std::size_t total_bytes = 0;
  std::vector<QuantGroup> groups;
};

/// A read-only byte buffer.
struct WireBuffer {
  const std::uint8_t* data = nullptr;
  std::size_t size = 0;
};

/// CRC-32 (zlib's crc32) of n bytes, in parallel chunks for long buffers.
std::uint32_t crc32(const std::uint8_t* data, std::size_t n, int num_threads = 1);

/// Exact byte length of an encoded array of this shape (sparse_rows < 0), or of a sparse update
/// of sparse_rows rows of `cols = shape[ndim - 1]` values (ndim must then be 2).
std::size_t encoded_size(const std::int64_t* shape, int ndim, const QuantScheme& scheme,
                         std::int64_t sparse_rows = -1);

/// Encodes x (C order, the given shape) into out, which must hold exactly encoded_size() bytes.
void encode_dense(const float* x, const std::int64_t* shape, int ndim, const QuantScheme& scheme,
                  std::uint8_t* out, std::size_t out_size, int num_threads, const char* name = "x");

/// Encodes the rows `rows` (n ids in [0, num_rows)) and their values (n x cols, C order).
/// Row ids out of range throw std::out_of_range.
void encode_sparse(const std::int32_t* rows, std::int64_t n, std::int64_t num_rows, const float* values,
                   std::int64_t cols, const QuantScheme& scheme, std::uint8_t* out, std::size_t out_size,
                   int num_threads, const char* name = "values");

/// Convenience forms returning a new buffer.
std::vector<std::uint8_t> encode_dense(const float* x, const std::int64_t* shape, int ndim,
                                       const QuantScheme& scheme, int num_threads);

/// Parses and validates a buffer (including its CRC and row ids).
WireHeader parse_wire(const std::uint8_t* data, std::size_t size, int num_threads = 1);

/// Decoded values of a parsed buffer: rows x cols floats (dense: the array in C order; sparse:
/// the n x cols values).
void decode_values(const WireHeader& h, const std::uint8_t* data, float* out, int num_threads);

/// Row ids of a parsed sparse buffer (n of them).
void decode_rows(const WireHeader& h, const std::uint8_t* data, std::int32_t* out);

/// acc += sum_k weights[k] * decode(buffers[k]), in float64, without materialising decoded
/// arrays. Dense buffers must all have the shape of acc; sparse buffers must all be sparse with
/// acc of shape (>= num_rows, cols) (row ids are bounds-checked against acc: std::out_of_range).
/// Every element sums the buffers in the given order, so the result does not depend on
/// num_threads.
void decode_accumulate(const WireBuffer* buffers, const double* weights, std::int64_t num_buffers,
                       double* acc, const std::int64_t* acc_shape, int acc_ndim, int num_threads);

}  // namespace fedrecon
