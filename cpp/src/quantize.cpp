#include "fedrecon/quantize.hpp"
