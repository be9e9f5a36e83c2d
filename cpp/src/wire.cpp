#include "fedrecon/strict_fp.hpp"  // first: "acc += w * x" sums without fused multiply-add

#include "fedrecon/wire.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "fedrecon/parallel.hpp"

namespace fedrecon {

namespace {

constexpr std::uint8_t kMagic[4] = {'F', 'R', 'Q', 'W'};
constexpr std::size_t kCrcBytes = 4;

// ---- little-endian loads and stores (byte by byte: correct on any host, one move on x86) ----

inline std::uint16_t load_u16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
inline std::uint32_t load_u32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
inline std::uint64_t load_u64(const std::uint8_t* p) {
  return static_cast<std::uint64_t>(load_u32(p)) | (static_cast<std::uint64_t>(load_u32(p + 4)) << 32);
}
inline float load_f32(const std::uint8_t* p) {
  const std::uint32_t u = load_u32(p);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store_u16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v);
  p[1] = static_cast<std::uint8_t>(v >> 8);
}
inline void store_u32(std::uint8_t* p, std::uint32_t v) {
  for (int k = 0; k < 4; ++k) p[k] = static_cast<std::uint8_t>(v >> (8 * k));
}
inline void store_u64(std::uint8_t* p, std::uint64_t v) {
  store_u32(p, static_cast<std::uint32_t>(v));
  store_u32(p + 4, static_cast<std::uint32_t>(v >> 32));
}
inline void store_f32(std::uint8_t* p, float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  store_u32(p, u);
}

std::string hex32(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

// ---- CRC-32 (reflected polynomial 0xEDB88320, as zlib): slicing-by-16 plus zlib's combine ----

constexpr std::uint32_t kCrcPoly = 0xEDB88320U;

struct CrcTables {
  std::uint32_t t[16][256];
  std::uint32_t x2n[32];  // x^(2^n) modulo the polynomial
};

std::uint32_t multmodp(std::uint32_t a, std::uint32_t b) {
  // a(x) * b(x) modulo p(x), reflected bit order; a != 0.
  std::uint32_t m = 1U << 31;
  std::uint32_t p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1U) ? (b >> 1) ^ kCrcPoly : b >> 1;
  }
  return p;
}

const CrcTables& crc_tables() {
  static const CrcTables tables = [] {
    CrcTables c{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t v = i;
      for (int k = 0; k < 8; ++k) v = (v & 1U) ? (v >> 1) ^ kCrcPoly : v >> 1;
      c.t[0][i] = v;
    }
    for (int s = 1; s < 16; ++s)
      for (int i = 0; i < 256; ++i) c.t[s][i] = (c.t[s - 1][i] >> 8) ^ c.t[0][c.t[s - 1][i] & 0xFFU];
    c.x2n[0] = 1U << 30;  // x^1
    for (int n = 1; n < 32; ++n) c.x2n[n] = multmodp(c.x2n[n - 1], c.x2n[n - 1]);
    return c;
  }();
  return tables;
}

// Slicing-by-16: 16 table lookups per 16 bytes.
std::uint32_t crc_update(std::uint32_t crc, const std::uint8_t* p, std::size_t n) {
  const CrcTables& c = crc_tables();
  crc = ~crc;
  while (n >= 16) {
    const std::uint32_t a = load_u32(p) ^ crc;
    const std::uint32_t b = load_u32(p + 4);
    const std::uint32_t d = load_u32(p + 8);
    const std::uint32_t e = load_u32(p + 12);
    crc = c.t[15][a & 0xFFU] ^ c.t[14][(a >> 8) & 0xFFU] ^ c.t[13][(a >> 16) & 0xFFU] ^ c.t[12][a >> 24] ^
          c.t[11][b & 0xFFU] ^ c.t[10][(b >> 8) & 0xFFU] ^ c.t[9][(b >> 16) & 0xFFU] ^ c.t[8][b >> 24] ^
          c.t[7][d & 0xFFU] ^ c.t[6][(d >> 8) & 0xFFU] ^ c.t[5][(d >> 16) & 0xFFU] ^ c.t[4][d >> 24] ^
          c.t[3][e & 0xFFU] ^ c.t[2][(e >> 8) & 0xFFU] ^ c.t[1][(e >> 16) & 0xFFU] ^ c.t[0][e >> 24];
    p += 16;
    n -= 16;
  }
  while (n--) crc = (crc >> 8) ^ c.t[0][(crc ^ *p++) & 0xFFU];
  return ~crc;
}

// CRC of A || B from crc(A), crc(B) and len(B) (zlib's crc32_combine).
std::uint32_t crc_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) {
  const CrcTables& c = crc_tables();
  std::uint32_t p = 1U << 31;  // x^0
  unsigned k = 3;              // len_b bytes = 8 * len_b bits: x^(8 len_b) = prod x^(2^(k+3))
  for (std::uint64_t n = len_b; n; n >>= 1, ++k)
    if (n & 1U) p = multmodp(c.x2n[k & 31U], p);
  return multmodp(p, crc_a) ^ crc_b;
}

// ---- sizes ----

struct WireSizes {
  QuantLayout layout;
  std::size_t rows_offset = 0;
  std::size_t scales_offset = 0;
  std::size_t payload_offset = 0;
  std::size_t payload_bytes = 0;
  std::size_t total = 0;
};

WireSizes wire_sizes(const std::int64_t* shape, int ndim, const QuantScheme& scheme, bool sparse) {
  static_assert(sizeof(std::size_t) >= 8, "the wire format needs a 64-bit size_t");
  if (sparse && ndim != 2) bad("a sparse update has ndim 2 (rows sent, cols); got " + std::to_string(ndim));
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  shape_rows_cols(shape, ndim, rows, cols);
  WireSizes s;
  s.layout = quant_layout(rows, cols, scheme);
  std::size_t off = kWireFixedHeader + 8 * static_cast<std::size_t>(ndim);
  if (sparse) {
    off += 8;
    s.rows_offset = off;
    off += 4 * static_cast<std::size_t>(rows);
  }
  s.scales_offset = off;
  off += 8 * static_cast<std::size_t>(s.layout.num_groups);
  s.payload_offset = off;
  s.payload_bytes = (static_cast<std::size_t>(s.layout.num_values) * static_cast<std::size_t>(scheme.bits) + 7) / 8;
  s.total = off + s.payload_bytes + kCrcBytes;
  return s;
}

// ---- bit packing ----

// Packs n indices of `bits` bits into ceil(n * bits / 8) bytes starting at a byte boundary.
void pack_indices(const std::uint32_t* idx, std::int64_t n, int bits, std::uint8_t* out) {
  if (bits == 8) {
    for (std::int64_t k = 0; k < n; ++k) out[k] = static_cast<std::uint8_t>(idx[k]);
    return;
  }
  if (bits == 16) {
    for (std::int64_t k = 0; k < n; ++k) {
      out[2 * k] = static_cast<std::uint8_t>(idx[k]);
      out[2 * k + 1] = static_cast<std::uint8_t>(idx[k] >> 8);
    }
    return;
  }
  std::uint64_t acc = 0;
  int nb = 0;
  for (std::int64_t k = 0; k < n; ++k) {
    acc |= static_cast<std::uint64_t>(idx[k]) << nb;
    nb += bits;
    if (nb >= 32) {
      store_u32(out, static_cast<std::uint32_t>(acc));
      out += 4;
      acc >>= 32;
      nb -= 32;
    }
  }
  for (; nb > 0; nb -= 8, acc >>= 8) *out++ = static_cast<std::uint8_t>(acc);
}

// Unpacks n indices starting at index `first` of a payload of `size` bytes; never reads past it.
void unpack_indices(const std::uint8_t* payload, std::size_t size, std::int64_t first, std::int64_t n, int bits,
                    std::uint32_t* idx) {
  if (n <= 0) return;
  if (bits == 8) {
    const std::uint8_t* p = payload + first;
    for (std::int64_t k = 0; k < n; ++k) idx[k] = p[k];
    return;
  }
  if (bits == 16) {
    const std::uint8_t* p = payload + 2 * first;
    for (std::int64_t k = 0; k < n; ++k) idx[k] = static_cast<std::uint32_t>(p[2 * k] | (p[2 * k + 1] << 8));
    return;
  }
  const std::uint64_t bitpos = static_cast<std::uint64_t>(first) * static_cast<std::uint64_t>(bits);
  const std::uint8_t* p = payload + bitpos / 8;
  const std::uint8_t* const end = payload + size;
  std::uint64_t acc = 0;
  int nb = 0;
  auto refill = [&] {
    if (end - p >= 8) {
      // Bits above nb + 8 * advance are the stream's next bits too: OR-ing them again is harmless.
      acc |= load_u64(p) << nb;
      const int advance = (63 - nb) >> 3;
      p += advance;
      nb += 8 * advance;
    } else {
      while (nb <= 56 && p < end) {
        acc |= static_cast<std::uint64_t>(*p++) << nb;
        nb += 8;
      }
    }
  };
  refill();
  const int shift = static_cast<int>(bitpos & 7U);
  acc >>= shift;
  nb -= shift;
  const std::uint64_t mask = (std::uint64_t{1} << bits) - 1U;
  for (std::int64_t k = 0; k < n; ++k) {
    if (nb < bits) refill();
    idx[k] = static_cast<std::uint32_t>(acc & mask);
    acc >>= bits;
    nb -= bits;
  }
}

// ---- encoding ----

std::uint8_t scheme_flags(const QuantScheme& s, bool sparse) {
  return static_cast<std::uint8_t>((s.row_scaling ? kWireFlagRowScaling : 0) | (s.hadamard ? kWireFlagHadamard : 0) |
                                   (sparse ? kWireFlagSparse : 0));
}

// Encodes the rows x cols matrix x; the header is written from shape/ndim (and the row ids).
void encode_matrix(const float* x, const std::int64_t* shape, int ndim, const QuantScheme& scheme, bool sparse,
                   const std::int32_t* row_ids, std::int64_t num_rows, std::uint8_t* out, std::size_t out_size,
                   int num_threads, const char* name) {
  const WireSizes s = wire_sizes(shape, ndim, scheme, sparse);
  if (out_size != s.total)
    bad("output buffer has " + std::to_string(out_size) + " bytes; the encoding needs " + std::to_string(s.total));
  const QuantLayout& l = s.layout;
  if (sparse) {
    if (num_rows < 0 || num_rows > kWireMaxSparseRows)
      bad("num_rows must be in [0, 2^31]; got " + std::to_string(num_rows));
    for (std::int64_t i = 0; i < l.rows; ++i)
      if (row_ids[i] < 0 || row_ids[i] >= num_rows)
        throw std::out_of_range("row id " + std::to_string(row_ids[i]) + " at position " + std::to_string(i) +
                                " is outside [0, " + std::to_string(num_rows) + ")");
  }
  // Indices first (blocks start on byte boundaries: see quantize_blocks), then the scales.
  std::uint8_t* payload = out + s.payload_offset;
  const std::vector<QuantGroup> groups = quantize_blocks(
      x, l, scheme, num_threads, name,
      [&](std::int64_t e0, std::int64_t e1, const std::uint32_t* idx, const QuantGroup*, int) {
        pack_indices(idx, e1 - e0, scheme.bits, payload + static_cast<std::size_t>(e0) * scheme.bits / 8);
      });

  std::memcpy(out, kMagic, 4);
  store_u16(out + 4, kWireVersion);
  out[6] = kWireDtypeFloat32;
  out[7] = static_cast<std::uint8_t>(scheme.bits);
  out[8] = scheme_flags(scheme, sparse);
  out[9] = static_cast<std::uint8_t>(ndim);
  store_u16(out + 10, 0);
  store_u64(out + 12, scheme.key);
  for (int d = 0; d < ndim; ++d) store_u64(out + kWireFixedHeader + 8 * d, static_cast<std::uint64_t>(shape[d]));
  if (sparse) {
    store_u64(out + s.rows_offset - 8, static_cast<std::uint64_t>(num_rows));
    for (std::int64_t i = 0; i < l.rows; ++i)
      store_u32(out + s.rows_offset + 4 * i, static_cast<std::uint32_t>(row_ids[i]));
  }
  for (std::size_t g = 0; g < groups.size(); ++g) {
    store_f32(out + s.scales_offset + 8 * g, groups[g].lo);
    store_f32(out + s.scales_offset + 8 * g + 4, groups[g].step);
  }
  store_u32(out + s.total - kCrcBytes, crc32(out, s.total - kCrcBytes, num_threads));
}

// ---- decoding ----

struct DecodeScratch {
  std::vector<std::uint32_t> idx;
  std::vector<float> row;
  std::vector<float> values;
};

// Decoded values [e0, e1) of the rows x cols output (row-aligned with the rotation) into dst.
void decode_span(const WireHeader& h, const std::uint8_t* data, std::int64_t e0, std::int64_t e1, float* dst,
                 DecodeScratch& s) {
  const QuantLayout& l = h.layout;
  if (e1 <= e0) return;
  const std::uint8_t* payload = data + h.payload_offset;
  const int bits = h.scheme.bits;
  if (!h.scheme.hadamard) {
    s.idx.resize(static_cast<std::size_t>(std::max<std::int64_t>(e1 - e0, kQuantBlock)));
    unpack_indices(payload, h.payload_bytes, e0, e1 - e0, bits, s.idx.data());
    std::int64_t e = e0;
    while (e < e1) {
      const std::int64_t r = e / l.cols;
      const std::int64_t end = std::min(e1, (r + 1) * l.cols);
      const QuantGroup g = h.groups[h.scheme.row_scaling ? static_cast<std::size_t>(r) : 0];
      for (; e < end; ++e) dst[e - e0] = dequantize(g, s.idx[static_cast<std::size_t>(e - e0)]);
    }
    return;
  }
  const std::int64_t P = l.padded_cols;
  s.idx.resize(static_cast<std::size_t>(P));
  s.row.resize(static_cast<std::size_t>(P));
  for (std::int64_t r = e0 / l.cols; r < e1 / l.cols; ++r) {
    unpack_indices(payload, h.payload_bytes, r * P, P, bits, s.idx.data());
    const QuantGroup g = h.groups[h.scheme.row_scaling ? static_cast<std::size_t>(r) : 0];
    for (std::size_t j = 0; j < static_cast<std::size_t>(P); ++j) s.row[j] = dequantize(g, s.idx[j]);
    hadamard_inverse(s.row.data(), P, sign_seed(h.scheme.key, r));
    std::copy_n(s.row.data(), l.cols, dst + (r * l.cols - e0));
  }
}

// Work items over the rows x cols output: flat blocks, or row blocks when `rows_needed`.
struct Spans {
  bool by_rows = false;
  std::int64_t per_item = 0;  // values (flat) or rows per item
  std::int64_t items = 0;
  std::int64_t rows = 0, cols = 0;
  void range(std::int64_t item, std::int64_t& e0, std::int64_t& e1) const {
    if (by_rows) {
      e0 = item * per_item * cols;
      e1 = std::min(rows, (item + 1) * per_item) * cols;
    } else {
      e0 = item * per_item;
      e1 = std::min(rows * cols, e0 + per_item);
    }
  }
};

Spans make_spans(std::int64_t rows, std::int64_t cols, bool by_rows, std::int64_t padded_cols) {
  Spans s;
  s.rows = rows;
  s.cols = cols;
  s.by_rows = by_rows;
  if (rows * cols == 0) return s;
  if (by_rows) {
    s.per_item = std::max<std::int64_t>(1, kQuantBlock / std::max<std::int64_t>(1, padded_cols));
    s.items = (rows + s.per_item - 1) / s.per_item;
  } else {
    s.per_item = kQuantBlock;
    s.items = (rows * cols + kQuantBlock - 1) / kQuantBlock;
  }
  return s;
}

std::string shape_str(const std::int64_t* shape, int ndim) {
  std::string out = "(";
  for (int d = 0; d < ndim; ++d) out += std::to_string(shape[d]) + (ndim == 1 ? "," : d + 1 < ndim ? ", " : "");
  return out + ")";
}

}  // namespace

std::uint32_t crc32(const std::uint8_t* data, std::size_t n, int num_threads) {
  constexpr std::size_t kChunk = std::size_t{1} << 20;
  const std::int64_t chunks = static_cast<std::int64_t>((n + kChunk - 1) / kChunk);
  const int threads = resolve_threads(num_threads, chunks);
  if (threads <= 1) return crc_update(0, data, n);
  std::vector<std::uint32_t> parts(static_cast<std::size_t>(chunks));
  parallel_for(chunks, threads, [&](std::int64_t c, int) {
    const std::size_t begin = static_cast<std::size_t>(c) * kChunk;
    parts[static_cast<std::size_t>(c)] = crc_update(0, data + begin, std::min(kChunk, n - begin));
  });
  std::uint32_t crc = parts[0];
  for (std::int64_t c = 1; c < chunks; ++c) {
    const std::size_t begin = static_cast<std::size_t>(c) * kChunk;
    crc = crc_combine(crc, parts[static_cast<std::size_t>(c)], std::min(kChunk, n - begin));
  }
  return crc;
}

std::size_t encoded_size(const std::int64_t* shape, int ndim, const QuantScheme& scheme, std::int64_t sparse_rows) {
  if (sparse_rows < 0) return wire_sizes(shape, ndim, scheme, false).total;
  if (ndim != 2) bad("a sparse update needs a 2-D table shape (num_rows, cols); got ndim " + std::to_string(ndim));
  const std::int64_t sent[2] = {sparse_rows, shape[1]};
  return wire_sizes(sent, 2, scheme, true).total;
}

void encode_dense(const float* x, const std::int64_t* shape, int ndim, const QuantScheme& scheme, std::uint8_t* out,
                  std::size_t out_size, int num_threads, const char* name) {
  encode_matrix(x, shape, ndim, scheme, false, nullptr, 0, out, out_size, num_threads, name);
}

std::vector<std::uint8_t> encode_dense(const float* x, const std::int64_t* shape, int ndim, const QuantScheme& scheme,
                                       int num_threads) {
  std::vector<std::uint8_t> out(encoded_size(shape, ndim, scheme));
  encode_dense(x, shape, ndim, scheme, out.data(), out.size(), num_threads);
  return out;
}

void encode_sparse(const std::int32_t* rows, std::int64_t n, std::int64_t num_rows, const float* values,
                   std::int64_t cols, const QuantScheme& scheme, std::uint8_t* out, std::size_t out_size,
                   int num_threads, const char* name) {
  const std::int64_t shape[2] = {n, cols};
  encode_matrix(values, shape, 2, scheme, true, rows, num_rows, out, out_size, num_threads, name);
}

WireHeader parse_wire(const std::uint8_t* data, std::size_t size, int num_threads) {
  if (data == nullptr && size > 0) bad("buffer is null");
  if (size < 4) bad("buffer of " + std::to_string(size) + " bytes is too short to hold an encoded array (truncated?)");
  if (std::memcmp(data, kMagic, 4) != 0) bad("bad magic: not a fedrecon_fast encoded array (expected \"FRQW\")");
  if (size < kWireFixedHeader + kCrcBytes)
    bad("buffer truncated: " + std::to_string(size) + " bytes, shorter than the " +
        std::to_string(kWireFixedHeader + kCrcBytes) + "-byte minimum");
  WireHeader h;
  h.version = load_u16(data + 4);
  if (h.version == 0 || h.version > kWireVersion)
    bad("unsupported format version " + std::to_string(h.version) + ": this build reads version " +
        std::to_string(kWireVersion) + (h.version > kWireVersion ? " (written by a newer fedrecon_fast?)" : ""));
  h.dtype = data[6];
  if (h.dtype != kWireDtypeFloat32) bad("unsupported dtype code " + std::to_string(h.dtype) + " (1 = float32)");
  const int bits = data[7];
  if (bits < kMinQuantBits || bits > kMaxQuantBits)
    bad("invalid bits " + std::to_string(bits) + " in header (must be 1..16)");
  const std::uint8_t flags = data[8];
  if (flags & ~(kWireFlagRowScaling | kWireFlagHadamard | kWireFlagSparse))
    bad("unknown scheme flags " + hex32(flags) + " in header");
  h.ndim = data[9];
  if (h.ndim > kWireMaxNdim) bad("invalid ndim " + std::to_string(h.ndim) + " in header (at most 8)");
  if (load_u16(data + 10) != 0) bad("reserved header bytes 10-11 must be zero");
  h.scheme.bits = bits;
  h.scheme.row_scaling = (flags & kWireFlagRowScaling) != 0;
  h.scheme.hadamard = (flags & kWireFlagHadamard) != 0;
  h.sparse = (flags & kWireFlagSparse) != 0;
  h.scheme.key = load_u64(data + 12);
  if (h.sparse && h.ndim != 2) bad("sparse buffer must have ndim 2; header says " + std::to_string(h.ndim));
  const std::size_t fields_end = kWireFixedHeader + 8 * static_cast<std::size_t>(h.ndim) + (h.sparse ? 8 : 0);
  if (size < fields_end + kCrcBytes)
    bad("buffer truncated: " + std::to_string(size) + " bytes, its header alone needs " +
        std::to_string(fields_end + kCrcBytes));
  for (int d = 0; d < h.ndim; ++d) {
    const std::uint64_t v = load_u64(data + kWireFixedHeader + 8 * d);
    if (v > static_cast<std::uint64_t>(kMaxQuantValues))
      bad("shape entry " + std::to_string(d) + " in header is too large (" + std::to_string(v) + ")");
    h.shape[d] = static_cast<std::int64_t>(v);
  }
  if (h.sparse) {
    const std::uint64_t nr = load_u64(data + fields_end - 8);
    if (nr > static_cast<std::uint64_t>(kWireMaxSparseRows))
      bad("num_rows " + std::to_string(nr) + " in header exceeds 2^31");
    h.num_rows = static_cast<std::int64_t>(nr);
  }
  WireSizes s;
  try {
    s = wire_sizes(h.shape, h.ndim, h.scheme, h.sparse);
  } catch (const std::invalid_argument& e) {
    bad(std::string("invalid header: ") + e.what());
  }
  if (size != s.total)
    bad("buffer length " + std::to_string(size) + " does not match the " + std::to_string(s.total) +
        " bytes its header describes (truncated or corrupted)");
  const std::uint32_t stored = load_u32(data + s.total - kCrcBytes);
  const std::uint32_t computed = crc32(data, s.total - kCrcBytes, num_threads);
  if (stored != computed)
    bad("CRC-32 mismatch (stored " + hex32(stored) + ", computed " + hex32(computed) + "): the buffer is corrupted");
  h.layout = s.layout;
  h.rows_offset = s.rows_offset;
  h.scales_offset = s.scales_offset;
  h.payload_offset = s.payload_offset;
  h.payload_bytes = s.payload_bytes;
  h.total_bytes = s.total;
  if (h.sparse) {
    for (std::int64_t i = 0; i < h.layout.rows; ++i) {
      const std::uint32_t id = load_u32(data + h.rows_offset + 4 * static_cast<std::size_t>(i));
      if (static_cast<std::int64_t>(id) >= h.num_rows)
        bad("row id " + std::to_string(id) + " at position " + std::to_string(i) + " is outside [0, " +
            std::to_string(h.num_rows) + ") declared by the header");
    }
  }
  const double levels = static_cast<double>((std::uint32_t{1} << bits) - 1U);
  h.groups.resize(static_cast<std::size_t>(h.layout.num_groups));
  for (std::size_t g = 0; g < h.groups.size(); ++g) {
    const float lo = load_f32(data + h.scales_offset + 8 * g);
    const float step = load_f32(data + h.scales_offset + 8 * g + 4);
    if (!std::isfinite(lo) || !std::isfinite(step) || step < 0.0f ||
        static_cast<double>(lo) + levels * static_cast<double>(step) > FLT_MAX)
      bad("invalid scale of group " + std::to_string(g) + " (lo " + std::to_string(lo) + ", step " +
          std::to_string(step) + ")");
    h.groups[g] = QuantGroup{lo, step};
    if (h.scheme.hadamard && !rotation_fits(h.groups[g], bits, h.layout.padded_cols))
      bad("invalid scale of group " + std::to_string(g) + " (lo " + std::to_string(lo) + ", step " +
          std::to_string(step) + "): its values overflow float32 in the inverse Hadamard rotation");
  }
  const std::uint64_t used_bits = static_cast<std::uint64_t>(h.layout.num_values) * static_cast<std::uint64_t>(bits);
  if (used_bits % 8 != 0 && (data[h.payload_offset + h.payload_bytes - 1] >> (used_bits % 8)) != 0)
    bad("nonzero padding bits after the last index");
  return h;
}

void decode_values(const WireHeader& h, const std::uint8_t* data, float* out, int num_threads) {
  const QuantLayout& l = h.layout;
  const Spans sp = make_spans(l.rows, l.cols, h.scheme.hadamard, l.padded_cols);
  const int threads = resolve_threads(num_threads, sp.items);
  std::vector<DecodeScratch> scratch(static_cast<std::size_t>(threads));
  parallel_for(sp.items, threads, [&](std::int64_t item, int tid) {
    std::int64_t e0 = 0, e1 = 0;
    sp.range(item, e0, e1);
    decode_span(h, data, e0, e1, out + e0, scratch[static_cast<std::size_t>(tid)]);
  });
}

void decode_rows(const WireHeader& h, const std::uint8_t* data, std::int32_t* out) {
  if (!h.sparse) bad("buffer holds a dense array, not sparse rows");
  for (std::int64_t i = 0; i < h.layout.rows; ++i)
    out[i] = static_cast<std::int32_t>(load_u32(data + h.rows_offset + 4 * static_cast<std::size_t>(i)));
}

void decode_accumulate(const WireBuffer* buffers, const double* weights, std::int64_t num_buffers, double* acc,
                       const std::int64_t* acc_shape, int acc_ndim, int num_threads) {
  if (num_buffers < 0) bad("number of buffers must be >= 0");
  if (acc_ndim < 0 || acc_ndim > kWireMaxNdim) bad("out must have ndim in [0, 8]");
  for (std::int64_t k = 0; k < num_buffers; ++k)
    if (!std::isfinite(weights[k])) bad("weights must be finite; weight " + std::to_string(k) + " is not");
  if (num_buffers == 0) return;

  // Parse (and CRC-check) every buffer: in parallel across buffers, or within one buffer.
  std::vector<WireHeader> headers(static_cast<std::size_t>(num_buffers));
  auto parse_one = [&](std::int64_t k, int threads) {
    try {
      headers[static_cast<std::size_t>(k)] = parse_wire(buffers[k].data, buffers[k].size, threads);
    } catch (const std::invalid_argument& e) {
      if (num_buffers == 1) throw;
      bad("buffer " + std::to_string(k) + ": " + e.what());
    }
  };
  if (num_buffers == 1) {
    parse_one(0, num_threads);
  } else {
    parallel_for(num_buffers, resolve_threads(num_threads, num_buffers), [&](std::int64_t k, int) { parse_one(k, 1); });
  }
  const std::string which = num_buffers == 1 ? "the buffer" : "buffer ";
  auto name = [&](std::int64_t k) { return num_buffers == 1 ? which : which + std::to_string(k); };
  const bool sparse = headers[0].sparse;
  for (std::int64_t k = 0; k < num_buffers; ++k) {
    const WireHeader& h = headers[static_cast<std::size_t>(k)];
    if (h.sparse != sparse) bad("cannot accumulate dense and sparse buffers together (" + name(k) + " differs)");
    if (!sparse) {
      bool same = h.ndim == acc_ndim;
      for (int d = 0; same && d < acc_ndim; ++d) same = h.shape[d] == acc_shape[d];
      if (!same)
        bad(name(k) + " holds an array of shape " + shape_str(h.shape, h.ndim) + " but out has shape " +
            shape_str(acc_shape, acc_ndim));
    } else if (acc_ndim != 2 || acc_shape[1] != h.layout.cols) {
      bad(name(k) + " holds sparse rows of " + std::to_string(h.layout.cols) + " values but out has shape " +
          shape_str(acc_shape, acc_ndim) + " (need (num_rows, " + std::to_string(h.layout.cols) + "))");
    }
  }

  if (!sparse) {
    std::int64_t rows = 0, cols = 0;
    shape_rows_cols(acc_shape, acc_ndim, rows, cols);
    bool any_rotated = false;
    std::int64_t padded = cols;
    for (const WireHeader& h : headers) {
      any_rotated = any_rotated || h.scheme.hadamard;
      padded = std::max(padded, h.layout.padded_cols);
    }
    const Spans sp = make_spans(rows, cols, any_rotated, padded);
    const int threads = resolve_threads(num_threads, sp.items);
    std::vector<DecodeScratch> scratch(static_cast<std::size_t>(threads));
    parallel_for(sp.items, threads, [&](std::int64_t item, int tid) {
      DecodeScratch& s = scratch[static_cast<std::size_t>(tid)];
      std::int64_t e0 = 0, e1 = 0;
      sp.range(item, e0, e1);
      s.values.resize(static_cast<std::size_t>(e1 - e0));
      for (std::int64_t k = 0; k < num_buffers; ++k) {
        decode_span(headers[static_cast<std::size_t>(k)], buffers[k].data, e0, e1, s.values.data(), s);
        const double w = weights[k];
        double* a = acc + e0;
        const float* v = s.values.data();
        for (std::int64_t e = 0; e < e1 - e0; ++e) a[e] += w * static_cast<double>(v[e]);
      }
    });
    return;
  }

  // Sparse: the table's rows are split into blocks; each buffer's entries are bucketed by block
  // (stable), and each block adds the buffers in order, the entries of a buffer in order.
  const std::int64_t table_rows = acc_shape[0];
  const std::int64_t cols = acc_shape[1];
  auto check_row = [&](std::int64_t id, std::int64_t k) {
    if (id >= table_rows)
      throw std::out_of_range("row id " + std::to_string(id) + " of " + name(k) + " is outside the " +
                              std::to_string(table_rows) + " rows of out");
  };
  if (table_rows == 0 || cols == 0) {  // nothing to add; the row ids must still fit
    for (std::int64_t k = 0; k < num_buffers; ++k) {
      const WireHeader& h = headers[static_cast<std::size_t>(k)];
      for (std::int64_t i = 0; i < h.layout.rows; ++i) check_row(load_u32(buffers[k].data + h.rows_offset + 4 * i), k);
    }
    return;
  }
  const int all_threads = resolve_threads(num_threads, table_rows);
  const std::int64_t blocks_wanted = std::min<std::int64_t>(table_rows, 8 * static_cast<std::int64_t>(all_threads));
  const std::int64_t rows_per_block = (table_rows + blocks_wanted - 1) / blocks_wanted;
  const std::int64_t blocks = (table_rows + rows_per_block - 1) / rows_per_block;
  struct Buckets {
    std::vector<std::int64_t> start;  // blocks + 1
    std::vector<std::int64_t> entry;  // entry indices grouped by block, in entry order
    std::vector<std::int32_t> row;    // their row ids
  };
  std::vector<Buckets> buckets(static_cast<std::size_t>(num_buffers));
  parallel_for(num_buffers, resolve_threads(num_threads, num_buffers), [&](std::int64_t k, int) {
    const WireHeader& h = headers[static_cast<std::size_t>(k)];
    const std::uint8_t* ids = buffers[k].data + h.rows_offset;
    const std::int64_t n = h.layout.rows;
    Buckets& b = buckets[static_cast<std::size_t>(k)];
    b.start.assign(static_cast<std::size_t>(blocks + 1), 0);
    // Read the ids once (the checked copy is what gets used, whatever happens to the buffer).
    std::vector<std::int32_t> local(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t id = load_u32(ids + 4 * i);
      check_row(id, k);
      local[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(id);
      ++b.start[static_cast<std::size_t>(id / rows_per_block + 1)];
    }
    for (std::size_t c = 0; c < static_cast<std::size_t>(blocks); ++c) b.start[c + 1] += b.start[c];
    std::vector<std::int64_t> fill(b.start.begin(), b.start.end() - 1);
    b.entry.resize(static_cast<std::size_t>(n));
    b.row.resize(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int32_t id = local[static_cast<std::size_t>(i)];
      const std::int64_t pos = fill[static_cast<std::size_t>(id / rows_per_block)]++;
      b.entry[static_cast<std::size_t>(pos)] = i;
      b.row[static_cast<std::size_t>(pos)] = id;
    }
  });
  const int threads = resolve_threads(num_threads, blocks);
  std::vector<DecodeScratch> scratch(static_cast<std::size_t>(threads));
  parallel_for(blocks, threads, [&](std::int64_t block, int tid) {
    DecodeScratch& s = scratch[static_cast<std::size_t>(tid)];
    s.values.resize(static_cast<std::size_t>(cols));
    for (std::int64_t k = 0; k < num_buffers; ++k) {
      const Buckets& b = buckets[static_cast<std::size_t>(k)];
      const double w = weights[k];
      const WireHeader& h = headers[static_cast<std::size_t>(k)];
      const auto first = static_cast<std::size_t>(b.start[static_cast<std::size_t>(block)]);
      const auto last = static_cast<std::size_t>(b.start[static_cast<std::size_t>(block + 1)]);
      for (std::size_t p = first; p < last; ++p) {
        const std::int64_t i = b.entry[p];
        decode_span(h, buffers[k].data, i * cols, (i + 1) * cols, s.values.data(), s);
        double* a = acc + static_cast<std::int64_t>(b.row[p]) * cols;
        for (std::int64_t j = 0; j < cols; ++j) a[j] += w * static_cast<double>(s.values[static_cast<std::size_t>(j)]);
      }
    }
  });
}

}  // namespace fedrecon
