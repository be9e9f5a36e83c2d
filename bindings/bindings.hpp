// Registration functions of the binding files (module.cpp calls each once).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace fedrecon_bindings {

/// C-contiguous array of T (taken with .noconvert(), so nothing is copied silently).
template <class T>
using Array = pybind11::array_t<T, pybind11::array::c_style>;

/// Bad arguments become ValueError with this message.
[[noreturn]] inline void fail(const std::string& what) { throw pybind11::value_error(what); }

}  // namespace fedrecon_bindings

void bind_compression(pybind11::module_& m);  // bind_compression.cpp: quantization, wire format
void bind_aggregation(pybind11::module_& m);  // bind_aggregation.cpp: weighted sums, DP
