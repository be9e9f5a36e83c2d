// Runtime dispatch: which of the compiled SIMD targets this CPU (and its operating system) can
// run, and what this copy of the core was compiled for. No Python here.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace fedrecon {

/// True when this CPU runs code compiled for `target`: "baseline" (x86-64 SSE2, or any CPU of
/// another architecture), "avx2" (x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE) or
/// "avx512" (x86-64-v4: x86-64-v3 + AVX-512 F/BW/CD/DQ/VL), with the OS saving the registers.
/// "native" and unknown names: false (a -march=native build cannot tell what it needs).
bool cpu_supports(const std::string& target);

/// The CPU features the targets depend on, by name, as this CPU reports them (empty off x86-64).
std::vector<std::pair<std::string, bool>> cpu_features();

/// The target this copy of the core was compiled for, and its compiler flags.
const char* compiled_target();
const char* compiled_flags();

}  // namespace fedrecon
