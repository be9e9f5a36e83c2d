// Finiteness tests that vectorise. NaN and infinity are the values whose exponent bits are all
// ones, so an integer OR of per-element bit tests scans an array in vector registers; a float
// reduction that asks the same (a sum of x - x) is a serial dependency chain.
#pragma once

#include <cstdint>
#include <cstring>

namespace fedrecon {

/// 1 if x is NaN or infinite, else 0.
inline std::uint32_t nonfinite_bit(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
}

inline std::uint32_t nonfinite_bit(double x) {
  std::uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<std::uint32_t>((bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
}

/// No element of x[0, n) is NaN or infinite.
template <class T, class N>
inline bool all_finite(const T* x, N n) {
  std::uint32_t bad = 0;
  for (N j = 0; j < n; ++j) bad |= nonfinite_bit(x[j]);
  return bad == 0;
}

}  // namespace fedrecon
