// Include order for an emulated kernel unit: the c10 and standard headers first (so that the emulator's
// macros, e.g. threadIdx, and its global min/max overloads cannot meet their code), then the emulator,
// then the one kernel header the unit runs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "testing/cuda_emu.h"
#include "testing/emu_launchers.h"
