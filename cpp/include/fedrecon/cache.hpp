// Cache hints for loops whose memory traffic the hardware cannot predict: a software prefetch
// of a byte range, and a copy with non-temporal stores.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fedrecon {

// For loops that visit rows in an order the hardware prefetchers cannot follow (sorted by row
// while stored by client). Callers keep their lookahead loops as local lambdas: moved into a
// shared class, GCC 12 deleted the loop (its only effect is __builtin_prefetch), and an asm
// volatile prefetch it cannot delete measured 4-8% slower.
inline void prefetch_bytes(const void* p, std::size_t n) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (std::size_t o = 0; o < n; o += 64) __builtin_prefetch(c + o);
  __builtin_prefetch(c + n - 1);  // the last line, when p is not line-aligned
#else
  (void)p;  // a hint only: other compilers go without
  (void)n;
#endif
}

// Model tables larger than this are taken not to stay in a core's private caches between
// clients (L2 is 1-2 MiB on current x86-64 cores): their rows are prefetched ahead of use.
constexpr std::int64_t kLargeTableBytes = std::int64_t{8} << 20;

// Output tables at least this large are written with non-temporal stores: they do not fit the
// last-level cache, so ordinary stores would first read every line in (read-for-ownership) only
// to overwrite it, and evict the inputs on the way.
constexpr std::size_t kStreamBytes = std::size_t{32} << 20;

// memcpy whose stores bypass the cache where the target allows (SSE2; whole 64-byte lines per
// iteration), fenced so the bytes are visible to other threads once it returns.
inline void stream_copy(void* dst, const void* src, std::size_t n) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const std::size_t head = std::min<std::size_t>(n, (64 - reinterpret_cast<std::uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  d += head, s += head, n -= head;
  for (; n >= 64; n -= 64, d += 64, s += 64) {
    const auto* from = reinterpret_cast<const __m128i*>(s);
    auto* to = reinterpret_cast<__m128i*>(d);
    const __m128i a = _mm_loadu_si128(from), b = _mm_loadu_si128(from + 1);
    const __m128i c = _mm_loadu_si128(from + 2), e = _mm_loadu_si128(from + 3);
    _mm_stream_si128(to, a);
    _mm_stream_si128(to + 1, b);
    _mm_stream_si128(to + 2, c);
    _mm_stream_si128(to + 3, e);
  }
  std::memcpy(d, s, n);
  _mm_sfence();
#else
  std::memcpy(dst, src, n);
#endif
}

}  // namespace fedrecon
