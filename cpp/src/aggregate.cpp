#include "fedrecon/aggregate.hpp"
