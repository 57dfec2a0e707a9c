// Which CUDA algorithm runs a call: the one place that decides, from the interaction, the dtype,
// the shapes, the device's limits and the switches. The launch code switches on the result. Pure
// arithmetic without torch, so tests/cuda_host/path_host_test.cpp checks every rule on the host.
// The rules and the reasons for them: docs/cuda.md.
#pragma once

#include <cstdint>

#include "register_blocked_launch.cuh"
#include "switches.h"
#include "tensor_core_forward.cuh"

namespace dagfm {
namespace cuda {

enum class StorageType { Float32, Float64, Float16, BFloat16 };

DAGFM_HD int storage_bytes(StorageType s) {
  return s == StorageType::Float64 ? 8 : (s == StorageType::Float32 ? 4 : 2);
}
// The accumulator: float for float16 / bfloat16.
DAGFM_HD int accumulator_bytes(StorageType s) { return s == StorageType::Float64 ? 8 : 4; }

enum class ForwardPath {
  TensorCores,         // tc::forward_kernel_interaction (tensor_core_forward.cuh)
  RegisterBlocked,     // rb::forward_inner_outer / rb::forward_kernel_interaction
  OneOutputPerThread,  // one_output::propagate_fwd_kernel (on chip, or tile buffers in global memory)
};

enum class BackwardPath {
  Gemm,                  // kernel and outer: matrix products on cuBLAS (gemm_backward.h)
  RegisterBlockedInner,  // rb::backward_inner, one launch per layer
  OneOutputPerThread,    // one_output::propagate_bwd_kernel
};

// What every call is: the interaction, the dtype and the shapes.
struct CallShape {
  Interaction interaction = Interaction::Inner;
  StorageType storage = StorageType::Float32;
  int64_t batch = 0;
  int num_fields = 0, embed_dim = 0, depth = 0;
};

struct ForwardCall : CallShape {
  uintptr_t weights_address = 0;  // p: the vector and fragment loads need it aligned
  bool tf32_allowed = false;      // PyTorch's float32 matmul precision allows TF32
};

struct BackwardCall : CallShape {
  bool messages_saved = false;  // the training forward's messages a^1..a^L are given
};

// The path, with the plan it was chosen on (the launch uses that plan).
struct ForwardChoice {
  ForwardPath path = ForwardPath::OneOutputPerThread;
  tc::TcPlan tc_plan;  // path == TensorCores
  rb::RbPlan rb_plan;  // path == RegisterBlocked
};

struct BackwardChoice {
  BackwardPath path = BackwardPath::OneOutputPerThread;
  rb::RbPlan rb_plan;  // path == RegisterBlockedInner
};

// DAGFM_CUDA_RB_TILE when it names one of the register-blocked tiles, else 0 (the planner chooses).
inline int pinned_rb_tile(const Switches& sw) {
  for (int tb : rb::kTiles)
    if (sw.rb_tile == tb) return tb;
  return 0;
}

// Forward rules, first match wins:
//  1. tensor cores: the kernel interaction in float16 / bfloat16, or float32 when TF32 is allowed;
//     D in {16, 32, 48, 64}; compute capability 8.0+; p 32-byte aligned; a plan that fits shared
//     memory (two row tiles per warp when DAGFM_CUDA_TC_ROWS=32 asks and they fit, else one).
//  2. register-blocked: its plan fits shared memory (the kernel interaction also needs D % 4 == 0
//     and p 16-byte aligned).
//  3. one output per thread: always applies (its planner puts the tile buffers in global memory
//     when they do not fit on chip).
// DAGFM_CUDA_FORCE_GLOBAL_MEMORY skips 1 and 2; DAGFM_CUDA_TENSOR_CORES=0 skips 1;
// DAGFM_CUDA_REGISTER_BLOCKING=0 skips 2.
inline ForwardChoice choose_forward(const ForwardCall& call, const DeviceLimits& lim, const Switches& sw) {
  ForwardChoice out;
  const int F = call.num_fields, D = call.embed_dim;
  const bool kernel = call.interaction == Interaction::Kernel;
  const bool tc_storage = call.storage == StorageType::Float16 || call.storage == StorageType::BFloat16 ||
                          (call.storage == StorageType::Float32 && call.tf32_allowed);
  if (kernel && tc_storage && lim.cc_major >= 8 && !sw.force_global_memory && sw.tensor_cores &&
      call.weights_address % 32 == 0) {
    const int bytes = storage_bytes(call.storage);
    tc::TcPlan plan = tc::plan_forward(F, D, bytes, lim, sw.tc_row_tiles);
    if (!plan.ok) plan = tc::plan_forward(F, D, bytes, lim);
    if (plan.ok) {
      out.path = ForwardPath::TensorCores;
      out.tc_plan = plan;
      return out;
    }
  }
  if (!sw.force_global_memory && sw.register_blocking && (!kernel || call.weights_address % 16 == 0)) {
    const rb::RbPlan plan = rb::plan_forward(call.interaction, call.batch, F, D,
                                             accumulator_bytes(call.storage), lim, pinned_rb_tile(sw));
    if (plan.ok) {
      out.path = ForwardPath::RegisterBlocked;
      out.rb_plan = plan;
      return out;
    }
  }
  return out;
}

// Backward rules, first match wins (each needs the training forward's messages):
//  1. GEMM: the kernel and outer interactions.
//  2. register-blocked: the inner interaction, when its plan fits shared memory.
//  3. one output per thread: always applies (it recomputes the messages when none are saved).
// DAGFM_CUDA_FORCE_GLOBAL_MEMORY skips 1 and 2; DAGFM_CUDA_GEMM_BACKWARD=0 skips 1;
// DAGFM_CUDA_REGISTER_BLOCKING=0 skips 2.
inline BackwardChoice choose_backward(const BackwardCall& call, const DeviceLimits& lim, const Switches& sw) {
  BackwardChoice out;
  if (!call.messages_saved || sw.force_global_memory) return out;
  if (call.interaction != Interaction::Inner) {
    if (sw.gemm_backward) out.path = BackwardPath::Gemm;
    return out;
  }
  if (!sw.register_blocking) return out;
  const rb::RbPlan plan = rb::plan_backward_inner(call.batch, call.num_fields, call.embed_dim, call.depth,
                                                  accumulator_bytes(call.storage), lim);
  if (plan.ok) {
    out.path = BackwardPath::RegisterBlockedInner;
    out.rb_plan = plan;
  }
  return out;
}

}  // namespace cuda
}  // namespace dagfm
