// The emulation's stand-in for the CUDA runtime header that csrc/cuda/kernels.h includes.
#pragma once
#include "../cuda_emulation.h"
