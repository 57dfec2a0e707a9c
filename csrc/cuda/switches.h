// The environment switches of the CUDA backend: for comparisons, tuning runs and tests, never
// needed for correct results. Read once per process (the first CUDA call) so that a launch never
// scans the environment; reread_cuda_switches() reads them again (tests flip them). No torch and
// no CUDA includes: the host tests parse them with made-up environments. docs/cuda.md lists them.
#pragma once

#include <cstdlib>
#include <cstring>

namespace dagfm {
namespace cuda {

struct Switches {
  // DAGFM_CUDA_FORCE_GLOBAL_MEMORY=1: every call takes the one-output-per-thread kernels with their
  // tile buffers in global memory (checks that path on shapes that would fit on chip).
  bool force_global_memory = false;
  // DAGFM_CUDA_TENSOR_CORES=0: the kernel interaction's forward stays off tensor cores.
  bool tensor_cores = true;
  // DAGFM_CUDA_REGISTER_BLOCKING=0: the forwards and the inner backward take the
  // one-output-per-thread kernels instead of the register-blocked ones.
  bool register_blocking = true;
  // DAGFM_CUDA_GEMM_BACKWARD=0: the kernel and outer backwards with saved messages take the
  // one-output-per-thread backward instead of the matrix products on cuBLAS.
  bool gemm_backward = true;
  // DAGFM_CUDA_TC_ROWS=32: the tensor-core forward's warps own two 16-sample row tiles (D <= 32).
  int tc_row_tiles = 1;
  // DAGFM_CUDA_RB_TILE=n: the register-blocked forward's samples per tile, when n is one it has
  // (8, 16, 32 or 64); 0: the planner chooses.
  int rb_tile = 0;
};

// Parses the switches from `getenv` (a function of the variable's name returning its value or
// nullptr). A switch that is on by default is turned off by exactly "0"; one that is off by default
// is turned on by anything but "" and "0".
template <typename Getenv>
Switches read_switches(Getenv getenv) {
  auto is_zero = [&](const char* name) {
    const char* v = getenv(name);
    return v != nullptr && std::strcmp(v, "0") == 0;
  };
  Switches s;
  const char* global = getenv("DAGFM_CUDA_FORCE_GLOBAL_MEMORY");
  s.force_global_memory = global != nullptr && global[0] != '\0' && std::strcmp(global, "0") != 0;
  s.tensor_cores = !is_zero("DAGFM_CUDA_TENSOR_CORES");
  s.register_blocking = !is_zero("DAGFM_CUDA_REGISTER_BLOCKING");
  s.gemm_backward = !is_zero("DAGFM_CUDA_GEMM_BACKWARD");
  const char* rows = getenv("DAGFM_CUDA_TC_ROWS");
  s.tc_row_tiles = rows != nullptr && std::strcmp(rows, "32") == 0 ? 2 : 1;
  const char* tile = getenv("DAGFM_CUDA_RB_TILE");
  s.rb_tile = tile == nullptr ? 0 : std::atoi(tile);
  return s;
}

// The process's switches, read from the environment at the first call (defined with the launch
// code); reread_cuda_switches() reads them again, for tests that flip them between calls (not
// while another thread launches).
const Switches& cuda_switches();
void reread_cuda_switches();

}  // namespace cuda
}  // namespace dagfm
