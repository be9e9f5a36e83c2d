#include "fedrecon/privacy.hpp"
