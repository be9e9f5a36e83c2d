#include "bindings.hpp"

void bind_aggregation(pybind11::module_& m) { (void)m; }
