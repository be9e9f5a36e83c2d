// Registration functions of the binding files (module.cpp calls each once).
#pragma once

#include <pybind11/pybind11.h>

void bind_compression(pybind11::module_& m);  // bind_compression.cpp: quantization, wire format
void bind_aggregation(pybind11::module_& m);  // bind_aggregation.cpp: weighted sums, DP
