// Host test of the CUDA backend's path selection (csrc/cuda/path_selection.h) and of how its
// environment switches are parsed (csrc/cuda/switches.h), no GPU needed: every rule of
// choose_forward / choose_backward on made-up device limits, and the switches' spellings.
//
//   g++ -std=c++17 -O1 -fopenmp-simd -Wall -Wextra -Werror -I csrc tests/cuda_host/path_host_test.cpp -o t && ./t
#include <cstdio>
#include <map>
#include <string>

#include "host_check.h"
#include "cuda/path_selection.h"

using namespace dagfm;
using namespace dagfm::cuda;
using namespace host_check;

namespace {

const DeviceLimits kH200{227 << 10, 132, 228 << 10, 9};
const DeviceLimits kTuring{64 << 10, 40, 64 << 10, 7};  // no tensor-core path (cc 7.5)
const DeviceLimits kTiny{1 << 10, 132, 2 << 10, 9};     // nothing fits on chip

ForwardCall forward_call(Interaction kind, StorageType storage, int D, bool tf32 = false,
                         uintptr_t address = 256) {
  ForwardCall c;
  c.interaction = kind;
  c.storage = storage;
  c.batch = 65536;
  c.num_fields = 39;
  c.embed_dim = D;
  c.depth = 3;
  c.weights_address = address;
  c.tf32_allowed = tf32;
  return c;
}

BackwardCall backward_call(Interaction kind, bool saved, int L = 3) {
  BackwardCall c;
  c.interaction = kind;
  c.storage = StorageType::Float32;
  c.batch = 65536;
  c.num_fields = 39;
  c.embed_dim = 16;
  c.depth = L;
  c.messages_saved = saved;
  return c;
}

// The default switches with one of them set.
Switches with(bool Switches::*field, bool value) {
  Switches s;
  s.*field = value;
  return s;
}

template <typename Path>
void expect_path(Path got, Path want, bool plan_fits, const char* what, const char* pass) {
  ++g_cases;
  expect(got == want, what, pass);
  expect(plan_fits, "the chosen path has a plan that fits", what);
}

void expect_forward(const ForwardCall& call, const DeviceLimits& lim, const Switches& sw, ForwardPath want,
                    const char* what) {
  const ForwardChoice got = choose_forward(call, lim, sw);
  const bool fits = got.path == ForwardPath::TensorCores       ? got.tc_plan.ok
                    : got.path == ForwardPath::RegisterBlocked ? got.rb_plan.ok
                                                               : true;
  expect_path(got.path, want, fits, what, "forward");
}

void expect_backward(const BackwardCall& call, const DeviceLimits& lim, const Switches& sw, BackwardPath want,
                     const char* what) {
  const BackwardChoice got = choose_backward(call, lim, sw);
  expect_path(got.path, want, got.path != BackwardPath::RegisterBlockedInner || got.rb_plan.ok, what, "backward");
}

void check_forward_rules() {
  const Switches on;
  const auto K = Interaction::Kernel;
  // Tensor cores: 16-bit storage always, float32 only with TF32, never float64.
  expect_forward(forward_call(K, StorageType::Float16, 16), kH200, on, ForwardPath::TensorCores, "fp16 kernel");
  expect_forward(forward_call(K, StorageType::BFloat16, 64), kH200, on, ForwardPath::TensorCores, "bf16 D=64");
  expect_forward(forward_call(K, StorageType::Float32, 16, true), kH200, on, ForwardPath::TensorCores, "tf32");
  expect_forward(forward_call(K, StorageType::Float32, 16), kH200, on, ForwardPath::RegisterBlocked,
                 "exact float32 stays off tensor cores");
  expect_forward(forward_call(K, StorageType::Float64, 16, true), kH200, on, ForwardPath::RegisterBlocked,
                 "float64 never on tensor cores");
  // ... and only where the tensor-core kernel exists and may run.
  expect_forward(forward_call(K, StorageType::Float16, 8), kH200, on, ForwardPath::RegisterBlocked, "D = 8");
  expect_forward(forward_call(K, StorageType::Float16, 80), kH200, on, ForwardPath::RegisterBlocked, "D = 80");
  expect_forward(forward_call(K, StorageType::Float16, 16), kTuring, on, ForwardPath::RegisterBlocked, "cc 7.5");
  expect_forward(forward_call(K, StorageType::Float16, 16, false, 16), kH200, on, ForwardPath::RegisterBlocked,
                 "p 16- but not 32-byte aligned");
  expect_forward(forward_call(K, StorageType::Float16, 16, false, 8), kH200, on, ForwardPath::OneOutputPerThread,
                 "p not 16-byte aligned: no vector loads");
  expect_forward(forward_call(K, StorageType::Float32, 6), kH200, on, ForwardPath::OneOutputPerThread,
                 "kernel interaction, D % 4 != 0");
  // Inner and outer: register-blocked where it fits, never tensor cores.
  for (Interaction kind : {Interaction::Inner, Interaction::Outer}) {
    expect_forward(forward_call(kind, StorageType::Float16, 16), kH200, on, ForwardPath::RegisterBlocked,
                   "inner / outer fit");
    expect_forward(forward_call(kind, StorageType::Float32, 16, false, 4), kH200, on, ForwardPath::RegisterBlocked,
                   "inner / outer need no alignment");
    expect_forward(forward_call(kind, StorageType::Float32, 16), kTiny, on, ForwardPath::OneOutputPerThread,
                   "inner / outer do not fit");
  }
  // The switches.
  const Switches no_tc = with(&Switches::tensor_cores, false);
  expect_forward(forward_call(K, StorageType::Float16, 16), kH200, no_tc, ForwardPath::RegisterBlocked,
                 "DAGFM_CUDA_TENSOR_CORES=0");
  const Switches no_rb = with(&Switches::register_blocking, false);
  expect_forward(forward_call(K, StorageType::Float16, 16), kH200, no_rb, ForwardPath::TensorCores,
                 "DAGFM_CUDA_REGISTER_BLOCKING=0 keeps tensor cores");
  expect_forward(forward_call(Interaction::Inner, StorageType::Float32, 16), kH200, no_rb,
                 ForwardPath::OneOutputPerThread, "DAGFM_CUDA_REGISTER_BLOCKING=0");
  const Switches global = with(&Switches::force_global_memory, true);
  expect_forward(forward_call(K, StorageType::Float16, 16), kH200, global, ForwardPath::OneOutputPerThread,
                 "DAGFM_CUDA_FORCE_GLOBAL_MEMORY=1, tensor cores");
  expect_forward(forward_call(Interaction::Outer, StorageType::Float32, 16), kH200, global,
                 ForwardPath::OneOutputPerThread, "DAGFM_CUDA_FORCE_GLOBAL_MEMORY=1, register-blocked");
  // Two row tiles per warp when asked and D <= 32; one otherwise.
  Switches rows;
  rows.tc_row_tiles = 2;
  expect(choose_forward(forward_call(K, StorageType::Float16, 16), kH200, rows).tc_plan.mt == 2, "TC_ROWS=32, D=16",
         "forward");
  expect(choose_forward(forward_call(K, StorageType::Float16, 64), kH200, rows).tc_plan.mt == 1, "TC_ROWS=32, D=64",
         "forward");
  expect(choose_forward(forward_call(K, StorageType::Float16, 16), kH200, on).tc_plan.mt == 1, "16 rows by default",
         "forward");
  // A pinned register-blocked tile, and a value that names no tile (the planner chooses).
  Switches pin;
  pin.rb_tile = 16;
  expect(choose_forward(forward_call(Interaction::Inner, StorageType::Float32, 16), kH200, pin)
                 .rb_plan.cfg.tile_samples == 16,
         "DAGFM_CUDA_RB_TILE=16", "forward");
  Switches bad_pin;
  bad_pin.rb_tile = 12;
  expect(choose_forward(forward_call(Interaction::Inner, StorageType::Float32, 16), kH200, bad_pin)
                 .rb_plan.cfg.tile_samples ==
             choose_forward(forward_call(Interaction::Inner, StorageType::Float32, 16), kH200, on)
                 .rb_plan.cfg.tile_samples,
         "DAGFM_CUDA_RB_TILE=12 is ignored", "forward");
  g_cases += 5;
}

void check_backward_rules() {
  const Switches on;
  for (Interaction kind : {Interaction::Kernel, Interaction::Outer}) {
    expect_backward(backward_call(kind, true), kH200, on, BackwardPath::Gemm, "kernel / outer with messages");
    expect_backward(backward_call(kind, true), kTiny, on, BackwardPath::Gemm, "GEMM needs no shared memory");
    expect_backward(backward_call(kind, false), kH200, on, BackwardPath::OneOutputPerThread, "without messages");
  }
  expect_backward(backward_call(Interaction::Inner, true), kH200, on, BackwardPath::RegisterBlockedInner,
                  "inner with messages");
  expect_backward(backward_call(Interaction::Inner, false), kH200, on, BackwardPath::OneOutputPerThread,
                  "inner without messages");
  expect_backward(backward_call(Interaction::Inner, true), kTiny, on, BackwardPath::OneOutputPerThread,
                  "inner plan does not fit");
  expect_backward(backward_call(Interaction::Inner, true, 0), kH200, on, BackwardPath::OneOutputPerThread,
                  "inner, L = 0");
  const Switches no_gemm = with(&Switches::gemm_backward, false);
  expect_backward(backward_call(Interaction::Kernel, true), kH200, no_gemm, BackwardPath::OneOutputPerThread,
                  "DAGFM_CUDA_GEMM_BACKWARD=0");
  expect_backward(backward_call(Interaction::Inner, true), kH200, no_gemm, BackwardPath::RegisterBlockedInner,
                  "DAGFM_CUDA_GEMM_BACKWARD=0 leaves the inner backward");
  const Switches no_rb = with(&Switches::register_blocking, false);
  expect_backward(backward_call(Interaction::Inner, true), kH200, no_rb, BackwardPath::OneOutputPerThread,
                  "DAGFM_CUDA_REGISTER_BLOCKING=0");
  expect_backward(backward_call(Interaction::Outer, true), kH200, no_rb, BackwardPath::Gemm,
                  "DAGFM_CUDA_REGISTER_BLOCKING=0 leaves the GEMM backward");
  const Switches global = with(&Switches::force_global_memory, true);
  for (Interaction kind : {Interaction::Inner, Interaction::Outer, Interaction::Kernel})
    expect_backward(backward_call(kind, true), kH200, global, BackwardPath::OneOutputPerThread,
                    "DAGFM_CUDA_FORCE_GLOBAL_MEMORY=1");
}

Switches parse(const std::map<std::string, std::string>& env) {
  return read_switches([&](const char* name) -> const char* {
    const auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  });
}

void check_switch_parsing() {
  const Switches d = parse({});
  expect(!d.force_global_memory && d.tensor_cores && d.register_blocking && d.gemm_backward && d.tc_row_tiles == 1 &&
             d.rb_tile == 0,
         "defaults", "switches");
  expect(parse({{"DAGFM_CUDA_FORCE_GLOBAL_MEMORY", "1"}}).force_global_memory, "global memory on", "switches");
  expect(parse({{"DAGFM_CUDA_FORCE_GLOBAL_MEMORY", "yes"}}).force_global_memory, "global memory: any value",
         "switches");
  expect(!parse({{"DAGFM_CUDA_FORCE_GLOBAL_MEMORY", "0"}}).force_global_memory, "global memory off: 0", "switches");
  expect(!parse({{"DAGFM_CUDA_FORCE_GLOBAL_MEMORY", ""}}).force_global_memory, "global memory off: empty",
         "switches");
  expect(!parse({{"DAGFM_CUDA_TENSOR_CORES", "0"}}).tensor_cores, "tensor cores off", "switches");
  expect(parse({{"DAGFM_CUDA_TENSOR_CORES", "1"}}).tensor_cores, "tensor cores on", "switches");
  expect(parse({{"DAGFM_CUDA_TENSOR_CORES", ""}}).tensor_cores, "tensor cores: only 0 turns off", "switches");
  const Switches rb = parse({{"DAGFM_CUDA_REGISTER_BLOCKING", "0"}});
  expect(!rb.register_blocking && rb.gemm_backward, "register blocking off, GEMM backward on", "switches");
  const Switches gemm = parse({{"DAGFM_CUDA_GEMM_BACKWARD", "0"}});
  expect(gemm.register_blocking && !gemm.gemm_backward, "GEMM backward off, register blocking on", "switches");
  expect(parse({{"DAGFM_CUDA_TC_ROWS", "32"}}).tc_row_tiles == 2, "32 rows", "switches");
  expect(parse({{"DAGFM_CUDA_TC_ROWS", "16"}}).tc_row_tiles == 1, "16 rows", "switches");
  expect(parse({{"DAGFM_CUDA_RB_TILE", "32"}}).rb_tile == 32, "rb tile", "switches");
  g_cases += 13;
}

}  // namespace

int main() {
  check_forward_rules();
  check_backward_rules();
  check_switch_parsing();
  return report("path_host_test");
}
