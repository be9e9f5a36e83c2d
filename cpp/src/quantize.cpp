#include "fedrecon/strict_fp.hpp"  // first: "acc += w * x" sums without fused multiply-add

#include "fedrecon/quantize.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include <Eigen/Core>

#include "fedrecon/parallel.hpp"
#include "fedrecon/rng.hpp"

namespace fedrecon {

namespace {

// Rng(seed) returns mix64(seed + k * kGolden) as its k-th output (k = 0, 1, ...): streams are
// counter-based, so any value of a row can be drawn without drawing the ones before it.
constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline std::uint64_t stream_output(std::uint64_t seed, std::uint64_t k) { return mix64(seed + k * kGolden); }

std::int64_t flat_blocks(std::int64_t n) { return (n + kQuantBlock - 1) / kQuantBlock; }

// Min, max and finiteness of n floats (Eigen's vectorized reductions; a value is NaN or
// infinite exactly when the sum of (x - x) is NaN).
struct MinMax {
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  bool finite = true;
};

MinMax min_max(const float* x, std::int64_t n) {
  MinMax m;
  if (n <= 0) return m;
  const Eigen::Map<const Eigen::ArrayXf> a(x, static_cast<Eigen::Index>(n));
  m.finite = (a - a).sum() == 0.0f;
  if (m.finite) {
    m.lo = a.minCoeff();
    m.hi = a.maxCoeff();
  }
  return m;
}

[[noreturn]] void throw_nonfinite(const char* name) {
  throw std::invalid_argument(std::string(name) + " contains NaN or infinite values");
}

// Unnormalized fast Walsh-Hadamard transform, stage by stage (h = 1, 2, 4, ...: (a, b) <- (a + b,
// a - b)). Every output is the same float32 expression tree whatever the loop order, so the
// first three stages run as one 8-point kernel per block and the result is still bit-identical
// to the plain stage-by-stage loops of the reference.
void fwht(float* x, std::int64_t n) {
  std::int64_t h = 1;
  if (n >= 8) {
    for (std::int64_t i = 0; i < n; i += 8) {
      float* p = x + i;
      const float a0 = p[0] + p[1], a1 = p[0] - p[1], a2 = p[2] + p[3], a3 = p[2] - p[3];
      const float a4 = p[4] + p[5], a5 = p[4] - p[5], a6 = p[6] + p[7], a7 = p[6] - p[7];
      const float b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
      const float b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
      p[0] = b0 + b4;
      p[4] = b0 - b4;
      p[1] = b1 + b5;
      p[5] = b1 - b5;
      p[2] = b2 + b6;
      p[6] = b2 - b6;
      p[3] = b3 + b7;
      p[7] = b3 - b7;
    }
    h = 8;
  }
  for (; h < n; h *= 2) {
    for (std::int64_t i = 0; i < n; i += 2 * h) {
      float* a = x + i;
      float* b = x + i + h;
      for (std::int64_t j = 0; j < h; ++j) {
        const float u = a[j];
        const float v = b[j];
        a[j] = u + v;
        b[j] = u - v;
      }
    }
  }
}

float hadamard_scale(std::int64_t n) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(n))); }

// x[j] <- -x[j] where bit j % 64 of output j / 64 of the sign stream is set (flips the sign bit,
// which is exactly negation).
void apply_signs(float* x, std::int64_t n, std::uint64_t signs_seed) {
  for (std::int64_t w = 0; w * 64 < n; ++w) {
    const std::uint64_t bits = stream_output(signs_seed, static_cast<std::uint64_t>(w));
    const int end = static_cast<int>(std::min<std::int64_t>(64, n - w * 64));
    float* p = x + w * 64;
    for (int j = 0; j < end; ++j) {
      std::uint32_t u;
      std::memcpy(&u, p + j, sizeof u);
      u ^= static_cast<std::uint32_t>((bits >> j) & 1U) << 31;
      std::memcpy(p + j, &u, sizeof u);
    }
  }
}

// Forward transform and scale: x <- H x / sqrt(n) (the signs are applied by the caller).
void fwht_scaled(float* x, std::int64_t n) {
  fwht(x, n);
  const float s = hadamard_scale(n);
  for (std::int64_t j = 0; j < n; ++j) x[j] *= s;
}

}  // namespace

void check_bits(int bits) {
  if (bits < kMinQuantBits || bits > kMaxQuantBits)
    throw std::invalid_argument("bits must be in [1, 16]; got " + std::to_string(bits));
}

std::int64_t next_pow2(std::int64_t n) {
  if (n <= 0) return 0;
  std::int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

void shape_rows_cols(const std::int64_t* shape, int ndim, std::int64_t& rows, std::int64_t& cols) {
  if (ndim < 0 || ndim > 8) throw std::invalid_argument("ndim must be in [0, 8]; got " + std::to_string(ndim));
  for (int d = 0; d < ndim; ++d)
    if (shape[d] < 0 || shape[d] > kMaxQuantValues) throw std::invalid_argument("shape entries must be in [0, 2^56]");
  cols = ndim == 0 ? 1 : shape[ndim - 1];
  rows = 1;
  // The product of the non-zero entries is bounded too: an empty array of shape (0, 2^40, 2^40)
  // is no array NumPy (or anyone) can allocate, so it is no valid shape either.
  std::int64_t nonzero = 1;
  for (int d = 0; d < ndim; ++d) {
    if (shape[d] == 0) continue;
    if (nonzero > kMaxQuantValues / shape[d]) throw std::invalid_argument("shape is too large");
    nonzero *= shape[d];
  }
  for (int d = 0; d + 1 < ndim; ++d) {
    if (shape[d] == 0) {
      rows = 0;
      break;
    }
    rows *= shape[d];
  }
}

QuantLayout quant_layout(std::int64_t rows, std::int64_t cols, const QuantScheme& scheme) {
  check_bits(scheme.bits);
  if (rows < 0 || cols < 0) throw std::invalid_argument("rows and cols must be >= 0");
  if (cols > kMaxQuantValues || rows > kMaxQuantValues) throw std::invalid_argument("shape is too large");
  QuantLayout l;
  l.rows = rows;
  l.cols = cols;
  l.padded_cols = scheme.hadamard ? next_pow2(cols) : cols;
  if (l.padded_cols != 0 && rows > kMaxQuantValues / l.padded_cols) throw std::invalid_argument("shape is too large");
  l.num_values = rows * l.padded_cols;
  l.num_groups = l.num_values == 0 ? 0 : (scheme.row_scaling ? rows : 1);
  return l;
}

std::uint64_t noise_seed(std::uint64_t key, std::int64_t row) {
  return derive_seed(key, 0, static_cast<std::uint64_t>(row), 0);
}

std::uint64_t sign_seed(std::uint64_t key, std::int64_t row) {
  return derive_seed(key, 0, static_cast<std::uint64_t>(row), 1);
}

QuantGroup make_group(float lo, float hi, int bits) {
  check_bits(bits);
  const double levels = static_cast<double>((std::uint32_t{1} << bits) - 1U);
  const double range = static_cast<double>(hi) - static_cast<double>(lo);
  if (!(range >= 0.0)) throw std::invalid_argument("quantization group needs lo <= hi");
  if (range == 0.0) return QuantGroup{lo, 0.0f};
  float step = static_cast<float>(range / levels);
  // Round the step up so that the grid covers [lo, hi]: no value is clamped, error <= step.
  while (std::isfinite(step) && static_cast<double>(step) * levels < range)
    step = std::nextafter(step, std::numeric_limits<float>::infinity());
  if (!std::isfinite(step) || static_cast<double>(lo) + levels * static_cast<double>(step) > FLT_MAX)
    throw std::invalid_argument("values span too wide a range for float32 quantization (|x| near FLT_MAX)");
  return QuantGroup{lo, step};
}

bool rotation_fits(const QuantGroup& g, int bits, std::int64_t n) {
  const double levels = static_cast<double>((std::uint32_t{1} << bits) - 1U);
  const double lo = static_cast<double>(g.lo);
  const double m = std::max(std::fabs(lo), std::fabs(lo + levels * static_cast<double>(g.step)));
  return m * static_cast<double>(std::max<std::int64_t>(n, 1)) <= static_cast<double>(FLT_MAX);
}

void hadamard_forward(float* row, std::int64_t n, std::uint64_t signs_seed) {
  if (n <= 0) return;
  apply_signs(row, n, signs_seed);
  fwht_scaled(row, n);
}

void hadamard_inverse(float* row, std::int64_t n, std::uint64_t signs_seed) {
  if (n <= 0) return;
  fwht_scaled(row, n);
  apply_signs(row, n, signs_seed);
}

namespace {

// The index of value x in group g (step > 0) with the 24 random bits `bits24`: floor((x - lo) /
// step + u), u = bits24 * 2^-24, at most `levels`; in double precision.
inline std::uint32_t quant_index(float x, double lo, double step, double levels, std::uint32_t bits24) {
  const double u = static_cast<double>(static_cast<std::int32_t>(bits24)) * 0x1p-24;
  const double t = (static_cast<double>(x) - lo) / step + u;  // >= 0 since x >= lo
  return static_cast<std::uint32_t>(static_cast<std::int32_t>(std::min(t, levels)));
}

// Indices of values v[0, n) of one row, starting at column j0, with the row's group and noise
// stream. Value j of a row draws 24 bits of stream output j / 2: its top 24 bits for even j,
// bits 16..39 for odd j.
void quantize_run(const float* v, std::int64_t n, std::int64_t j0, const QuantGroup& g,
                  std::uint64_t seed, int bits, std::uint32_t* out) {
  if (g.step == 0.0f) {
    std::fill_n(out, n, 0U);
    return;
  }
  const double levels = static_cast<double>((std::uint32_t{1} << bits) - 1U);
  const double lo = g.lo;
  const double step = g.step;
  auto index = [&](float x, std::uint32_t bits24) { return quant_index(x, lo, step, levels, bits24); };
  std::int64_t k = 0;
  if (j0 & 1) {
    const std::uint64_t z = stream_output(seed, static_cast<std::uint64_t>(j0 >> 1));
    out[0] = index(v[0], static_cast<std::uint32_t>(z >> 16) & 0xFFFFFFU);
    k = 1;
  }
  const std::uint64_t pair0 = static_cast<std::uint64_t>((j0 + k) >> 1);
  const std::int64_t pairs = (n - k) / 2;
  const float* pv = v + k;
  std::uint32_t* po = out + k;
  for (std::int64_t p = 0; p < pairs; ++p) {
    const std::uint64_t z = stream_output(seed, pair0 + static_cast<std::uint64_t>(p));
    po[2 * p] = index(pv[2 * p], static_cast<std::uint32_t>(z >> 40));
    po[2 * p + 1] = index(pv[2 * p + 1], static_cast<std::uint32_t>(z >> 16) & 0xFFFFFFU);
  }
  k += 2 * pairs;
  if (k < n) {
    const std::uint64_t z = stream_output(seed, static_cast<std::uint64_t>((j0 + k) >> 1));
    out[k] = index(v[k], static_cast<std::uint32_t>(z >> 40));
  }
}

}  // namespace

ZeroCode zero_code(const QuantGroup& g, int bits) {
  check_bits(bits);
  ZeroCode z;
  if (g.step == 0.0f) return z;  // every value is index 0
  const double levels = static_cast<double>((std::uint32_t{1} << bits) - 1U);
  const auto index = [&](std::uint32_t bits24) { return quant_index(0.0f, g.lo, g.step, levels, bits24); };
  // index() is non-decreasing in the draw and spans less than one step over all draws (see
  // quantize.hpp), so it takes at most two values: find where it leaves the first.
  z.low = index(0);
  z.high = index((std::uint32_t{1} << 24) - 1U);
  if (z.high == z.low) return z;
  std::uint32_t a = 0, b = (std::uint32_t{1} << 24) - 1U;  // index(a) == low, index(b) == high
  while (b - a > 1) {
    const std::uint32_t mid = a + (b - a) / 2;
    (index(mid) == z.low ? a : b) = mid;
  }
  z.threshold = b;
  return z;
}

void decode_zero_run(std::int64_t n, std::uint64_t seed, std::uint32_t threshold, float low_value,
                     float high_value, float* out) {
  // One stream output serves two columns (bits 40..63, then 16..39): a branch-free select
  // per value, which the compiler vectorises.
  const std::int64_t pairs = n / 2;
  for (std::int64_t p = 0; p < pairs; ++p) {
    const std::uint64_t z = stream_output(seed, static_cast<std::uint64_t>(p));
    out[2 * p] = static_cast<std::uint32_t>(z >> 40) >= threshold ? high_value : low_value;
    out[2 * p + 1] = (static_cast<std::uint32_t>(z >> 16) & 0xFFFFFFU) >= threshold ? high_value : low_value;
  }
  if (n & 1) {
    const std::uint64_t z = stream_output(seed, static_cast<std::uint64_t>(pairs));
    out[n - 1] = static_cast<std::uint32_t>(z >> 40) >= threshold ? high_value : low_value;
  }
}

void quantize_span(const float* values, const QuantLayout& l, const QuantScheme& scheme, const QuantGroup* groups,
                   std::int64_t begin, std::int64_t end, std::uint32_t* indices) {
  std::int64_t e = begin;
  while (e < end) {
    const std::int64_t r = e / l.padded_cols;
    const std::int64_t j0 = e - r * l.padded_cols;
    const std::int64_t n = std::min(end - e, l.padded_cols - j0);
    quantize_run(values + (e - begin), n, j0, groups[scheme.row_scaling ? r : 0], noise_seed(scheme.key, r),
                 scheme.bits, indices + (e - begin));
    e += n;
  }
}

void quantize_row(const float* row, std::int64_t padded_cols, std::int64_t r, const QuantScheme& scheme,
                  const QuantGroup& group, std::uint32_t* indices) {
  quantize_run(row, padded_cols, 0, group, noise_seed(scheme.key, r), scheme.bits, indices);
}

namespace {

// Rotated, zero-padded copy of row r of x (rows x cols) into dst (padded_cols values). A NaN or
// infinity in the row makes rotated values non-finite too; callers check those.
void rotate_row(const float* x, const QuantLayout& l, std::uint64_t key, std::int64_t r, float* dst) {
  const float* src = x + r * l.cols;
  std::copy_n(src, l.cols, dst);
  std::fill(dst + l.cols, dst + l.padded_cols, 0.0f);
  hadamard_forward(dst, l.padded_cols, sign_seed(key, r));
}

// Work items of the quantizer over the rows x padded_cols values. Without rotation: flat blocks
// of kQuantBlock values. With it: blocks of whole rows, kQuantBlock values each when
// padded_cols <= kQuantBlock (a power of two divides it), else one row. Either way every block
// starts at a multiple of 8 values, so its packed indices start on a byte boundary.
struct QuantBlocks {
  bool by_rows = false;
  std::int64_t rows_per_item = 0;
  std::int64_t items = 0;
  std::int64_t begin(std::int64_t item, const QuantLayout& l) const {
    return by_rows ? item * rows_per_item * l.padded_cols : item * kQuantBlock;
  }
  std::int64_t end(std::int64_t item, const QuantLayout& l) const {
    return by_rows ? std::min(l.rows, (item + 1) * rows_per_item) * l.padded_cols
                   : std::min(l.num_values, (item + 1) * kQuantBlock);
  }
};

QuantBlocks quant_blocks(const QuantLayout& l, bool by_rows) {
  QuantBlocks b;
  b.by_rows = by_rows;
  if (by_rows) {
    b.rows_per_item = std::max<std::int64_t>(1, kQuantBlock / std::max<std::int64_t>(1, l.padded_cols));
    b.items = (l.rows + b.rows_per_item - 1) / b.rows_per_item;
  } else {
    b.items = flat_blocks(l.num_values);
  }
  return b;
}

[[noreturn]] void throw_rotation_overflow(const char* name) {
  throw std::invalid_argument(std::string(name) + " is too large: its Hadamard rotation overflows float32");
}

// Rotated rows [r0, r1) hold a non-finite value: blame the input if it has one, else the
// rotation (values so large that it overflows float32).
[[noreturn]] void throw_rotated_nonfinite(const float* x, const QuantLayout& l, std::int64_t r0, std::int64_t r1,
                                          const char* name) {
  if (!min_max(x + r0 * l.cols, (r1 - r0) * l.cols).finite) throw_nonfinite(name);
  throw_rotation_overflow(name);
}

// A group whose decoded values could overflow in the inverse rotation (|x| near FLT_MAX / n):
// the decoder would return infinities for finite input, so such arrays are rejected.
QuantGroup rotated_group(float lo, float hi, const QuantScheme& scheme, std::int64_t n, const char* name) {
  const QuantGroup g = make_group(lo, hi, scheme.bits);
  if (!rotation_fits(g, scheme.bits, n)) throw_rotation_overflow(name);
  return g;
}

}  // namespace

std::vector<QuantGroup> quantize_blocks(const float* x, const QuantLayout& l, const QuantScheme& scheme,
                                        int num_threads, const char* name, const QuantSink& sink) {
  std::vector<QuantGroup> groups(static_cast<std::size_t>(l.num_groups));
  if (l.num_values == 0) return groups;
  const bool rotate = scheme.hadamard;
  const QuantBlocks blocks = quant_blocks(l, rotate);
  const int threads = resolve_threads(num_threads, blocks.items);
  struct Scratch {
    std::vector<float> values;
    std::vector<std::uint32_t> idx;
  };
  std::vector<Scratch> scratch(static_cast<std::size_t>(threads));
  // Rotates the rows of a block into the thread's scratch (with the rotation the values are
  // recomputed rather than stored: no array of the rotated size is ever allocated).
  auto rotated_block = [&](std::int64_t item, Scratch& s) {
    const std::int64_t r0 = blocks.begin(item, l) / l.padded_cols;
    const std::int64_t r1 = blocks.end(item, l) / l.padded_cols;
    s.values.resize(static_cast<std::size_t>((r1 - r0) * l.padded_cols));
    for (std::int64_t r = r0; r < r1; ++r) rotate_row(x, l, scheme.key, r, s.values.data() + (r - r0) * l.padded_cols);
    return s.values.data();
  };

  // Pass 1: the scales that need a look at all values before any is quantized.
  if (!scheme.row_scaling) {
    std::vector<MinMax> parts(static_cast<std::size_t>(blocks.items));
    parallel_for(blocks.items, threads, [&](std::int64_t item, int tid) {
      const std::int64_t e0 = blocks.begin(item, l);
      const float* v = rotate ? rotated_block(item, scratch[static_cast<std::size_t>(tid)]) : x + e0;
      parts[static_cast<std::size_t>(item)] = min_max(v, blocks.end(item, l) - e0);
      if (rotate && !parts[static_cast<std::size_t>(item)].finite)
        throw_rotated_nonfinite(x, l, e0 / l.padded_cols, blocks.end(item, l) / l.padded_cols, name);
    });
    MinMax all;
    for (const MinMax& p : parts) {
      if (!p.finite) throw_nonfinite(name);
      all.lo = std::min(all.lo, p.lo);
      all.hi = std::max(all.hi, p.hi);
    }
    groups[0] = rotate ? rotated_group(all.lo, all.hi, scheme, l.padded_cols, name)
                       : make_group(all.lo, all.hi, scheme.bits);
  } else if (!rotate) {
    // Row scales (a row may span several flat blocks): a pass over row ranges.
    const QuantBlocks rb = quant_blocks(l, true);
    parallel_for(rb.items, resolve_threads(num_threads, rb.items), [&](std::int64_t item, int) {
      for (std::int64_t r = item * rb.rows_per_item; r < std::min(l.rows, (item + 1) * rb.rows_per_item); ++r) {
        const MinMax m = min_max(x + r * l.cols, l.cols);
        if (!m.finite) throw_nonfinite(name);
        groups[static_cast<std::size_t>(r)] = make_group(m.lo, m.hi, scheme.bits);
      }
    });
  }

  // Pass 2: quantize every block and hand its indices to the sink.
  parallel_for(blocks.items, threads, [&](std::int64_t item, int tid) {
    Scratch& s = scratch[static_cast<std::size_t>(tid)];
    const std::int64_t e0 = blocks.begin(item, l);
    const std::int64_t e1 = blocks.end(item, l);
    const float* v = x + e0;
    if (rotate) {
      v = rotated_block(item, s);
      if (scheme.row_scaling) {
        for (std::int64_t r = e0 / l.padded_cols; r < e1 / l.padded_cols; ++r) {
          const MinMax m = min_max(v + (r * l.padded_cols - e0), l.padded_cols);
          if (!m.finite) throw_rotated_nonfinite(x, l, r, r + 1, name);
          groups[static_cast<std::size_t>(r)] = rotated_group(m.lo, m.hi, scheme, l.padded_cols, name);
        }
      }
    }
    s.idx.resize(static_cast<std::size_t>(e1 - e0));
    quantize_span(v, l, scheme, groups.data(), e0, e1, s.idx.data());
    sink(e0, e1, s.idx.data(), groups.data(), tid);
  });
  return groups;
}

namespace {

// Runs the quantizer and hands the decoded values to emit(out_begin, values, n): n values of the
// rows x cols output starting at flat index out_begin (disjoint ranges, from worker threads).
template <class Emit>
void roundtrip_blocks(const float* x, const QuantLayout& l, const QuantScheme& scheme, int num_threads,
                      const char* name, Emit emit) {
  if (l.num_values == 0) return;
  std::vector<std::vector<float>> scratch(static_cast<std::size_t>(resolve_threads(num_threads, l.num_values)));
  quantize_blocks(x, l, scheme, num_threads, name,
                  [&](std::int64_t e0, std::int64_t e1, const std::uint32_t* idx, const QuantGroup* groups, int tid) {
                    auto& buf = scratch[static_cast<std::size_t>(tid)];
                    if (!scheme.hadamard) {
                      buf.resize(static_cast<std::size_t>(e1 - e0));
                      for (std::int64_t e = e0; e < e1;) {
                        const std::int64_t r = e / l.cols;
                        const std::int64_t end = std::min(e1, (r + 1) * l.cols);
                        const QuantGroup g = groups[scheme.row_scaling ? r : 0];
                        for (; e < end; ++e) buf[static_cast<std::size_t>(e - e0)] = dequantize(g, idx[e - e0]);
                      }
                      emit(e0, buf.data(), e1 - e0);
                      return;
                    }
                    buf.resize(static_cast<std::size_t>(l.padded_cols));
                    for (std::int64_t r = e0 / l.padded_cols; r < e1 / l.padded_cols; ++r) {
                      const QuantGroup g = groups[scheme.row_scaling ? r : 0];
                      const std::uint32_t* ri = idx + (r * l.padded_cols - e0);
                      for (std::int64_t j = 0; j < l.padded_cols; ++j)
                        buf[static_cast<std::size_t>(j)] = dequantize(g, ri[j]);
                      hadamard_inverse(buf.data(), l.padded_cols, sign_seed(scheme.key, r));
                      emit(r * l.cols, buf.data(), l.cols);
                    }
                  });
}

}  // namespace

void quantize_roundtrip(const float* x, std::int64_t rows, std::int64_t cols, const QuantScheme& scheme, float* out,
                        int num_threads, const char* name) {
  const QuantLayout l = quant_layout(rows, cols, scheme);
  roundtrip_blocks(x, l, scheme, num_threads, name,
                   [&](std::int64_t begin, const float* v, std::int64_t n) { std::copy_n(v, n, out + begin); });
}

void quantize_accumulate(const float* x, std::int64_t rows, std::int64_t cols, const QuantScheme& scheme,
                         double weight, double* acc, int num_threads, const char* name) {
  if (!std::isfinite(weight)) throw std::invalid_argument("weight must be finite");
  const QuantLayout l = quant_layout(rows, cols, scheme);
  roundtrip_blocks(x, l, scheme, num_threads, name, [&](std::int64_t begin, const float* v, std::int64_t n) {
    double* a = acc + begin;
    for (std::int64_t k = 0; k < n; ++k) a[k] += weight * static_cast<double>(v[k]);
  });
}

}  // namespace fedrecon
