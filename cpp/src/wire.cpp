#include "fedrecon/wire.hpp"
