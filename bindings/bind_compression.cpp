#include "bindings.hpp"

void bind_compression(pybind11::module_& m) { (void)m; }
