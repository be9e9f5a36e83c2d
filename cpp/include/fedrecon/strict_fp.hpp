// Include first in a .cpp whose float64 sums must be exactly the sequence of IEEE roundings
// "acc += c * x" (product rounded, then sum rounded): no fused multiply-add, whatever -march
// allows. A portable wheel and a -march=native build then agree bit for bit, and so does a
// NumPy loop. (No #pragma once: the pragma must apply to every file that includes it.)
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
