// The umbrella header: includes every public qlora header.
#pragma once

#include "qlora/core/cpu.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/core/log.hpp"
#include "qlora/core/matrix.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/core/version.hpp"
