#include "fedrecon/cpu.hpp"

namespace fedrecon {

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
constexpr bool kX86 = true;
// __builtin_cpu_supports checks CPUID and, for AVX and AVX-512, that the OS saves the wider
// registers (XGETBV), so a feature reported here is one the process may use.
bool has(const char* name) {
  __builtin_cpu_init();
  if (std::string(name) == "avx2") return __builtin_cpu_supports("avx2");
  if (std::string(name) == "fma") return __builtin_cpu_supports("fma");
  if (std::string(name) == "bmi") return __builtin_cpu_supports("bmi");
  if (std::string(name) == "bmi2") return __builtin_cpu_supports("bmi2");
  if (std::string(name) == "f16c") return __builtin_cpu_supports("f16c");
  if (std::string(name) == "avx512f") return __builtin_cpu_supports("avx512f");
  if (std::string(name) == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (std::string(name) == "avx512cd") return __builtin_cpu_supports("avx512cd");
  if (std::string(name) == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (std::string(name) == "avx512vl") return __builtin_cpu_supports("avx512vl");
  return false;
}
#else
constexpr bool kX86 = false;
bool has(const char*) { return false; }
#endif

const char* const kV3[] = {"avx2", "fma", "bmi", "bmi2", "f16c"};
const char* const kV4[] = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"};

template <std::size_t N>
bool all(const char* const (&names)[N]) {
  for (const char* n : names)
    if (!has(n)) return false;
  return true;
}

}  // namespace

bool cpu_supports(const std::string& target) {
  if (target == "baseline") return true;
  if (!kX86) return false;
  if (target == "avx2") return all(kV3);
  if (target == "avx512") return all(kV3) && all(kV4);
  return false;
}

std::vector<std::pair<std::string, bool>> cpu_features() {
  std::vector<std::pair<std::string, bool>> out;
  if (!kX86) return out;
  for (const char* n : kV3) out.emplace_back(n, has(n));
  for (const char* n : kV4) out.emplace_back(n, has(n));
  return out;
}

const char* compiled_target() { return FEDRECON_TARGET; }
const char* compiled_flags() { return FEDRECON_TARGET_FLAGS; }

}  // namespace fedrecon
