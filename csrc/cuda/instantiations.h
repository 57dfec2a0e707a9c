// The one list of what the CUDA kernels are instantiated for, as X-macros: the launch code
// dispatches over these lists, register_blocked_launch.cu instantiates its launches for them, and
// scripts/check_cuda_compile.sh compiles every kernel of each header for them through the
// DAGFM_INSTANTIATE_<HEADER> macros below (a header with kernels and no macro here fails that
// check). Include it after the headers whose kernels it names.
#pragma once

// X(T, Acc): storage type and accumulator of every CUDA-core kernel (float16 / bfloat16 sum in
// float).
#define DAGFM_CUDA_STORAGE_TYPES(X) \
  X(float, float)                   \
  X(double, double)                 \
  X(__half, float)                  \
  X(__nv_bfloat16, float)

// X(T): the tensor-core forward's operand types (float as TF32).
#define DAGFM_CUDA_TENSOR_CORE_TYPES(X) \
  X(float)                              \
  X(__half)                             \
  X(__nv_bfloat16)

// X(T, NF, MT): the tensor-core forward's shapes, D = 16 * NF with MT 16-sample row tiles per
// warp (two only for D <= 32, where the accumulators stay in registers).
#define DAGFM_CUDA_TENSOR_CORE_SHAPES(X, T) \
  X(T, 1, 1)                                \
  X(T, 2, 1)                                \
  X(T, 3, 1)                                \
  X(T, 4, 1)                                \
  X(T, 1, 2)                                \
  X(T, 2, 2)

// X(kB, T, Acc): samples per thread of the register-blocked forwards.
#define DAGFM_CUDA_RB_SAMPLES_PER_THREAD(X, T, Acc) \
  X(4, T, Acc)                                      \
  X(8, T, Acc)

// ---------------------------------------------------------------------------------------------
// Explicit instantiation of every kernel of a header, for every entry of the lists above.

// one_output_per_thread.cuh
#define DAGFM_INSTANTIATE_ONE_OUTPUT_KERNELS(K, T, Acc)                                                    \
  template __global__ void propagate_fwd_kernel<K, T, Acc>(PropagateParams<T>, TileConfig, Acc*, int64_t); \
  template __global__ void propagate_bwd_kernel<K, T, Acc>(PropagateBackwardParams<T>, TileConfig, Acc*, int64_t);
#define DAGFM_INSTANTIATE_ONE_OUTPUT_TYPES(T, Acc)                 \
  DAGFM_INSTANTIATE_ONE_OUTPUT_KERNELS(Interaction::Inner, T, Acc)  \
  DAGFM_INSTANTIATE_ONE_OUTPUT_KERNELS(Interaction::Outer, T, Acc)  \
  DAGFM_INSTANTIATE_ONE_OUTPUT_KERNELS(Interaction::Kernel, T, Acc)
#define DAGFM_INSTANTIATE_ONE_OUTPUT_PER_THREAD()                \
  namespace dagfm {                                              \
  namespace cuda {                                               \
  namespace one_output {                                         \
  DAGFM_CUDA_STORAGE_TYPES(DAGFM_INSTANTIATE_ONE_OUTPUT_TYPES)   \
  }                                                              \
  }                                                              \
  }

// weight_grad_reduce.cuh
#define DAGFM_INSTANTIATE_WEIGHT_GRAD_REDUCE_TYPES(T, Acc)                                              \
  template __global__ void reduce_weight_grad_kernel<T, Acc>(const Acc*, int64_t, int64_t, int64_t, int, \
                                                             int64_t, int64_t, T*);
#define DAGFM_INSTANTIATE_WEIGHT_GRAD_REDUCE()                            \
  namespace dagfm {                                                      \
  namespace cuda {                                                       \
  DAGFM_CUDA_STORAGE_TYPES(DAGFM_INSTANTIATE_WEIGHT_GRAD_REDUCE_TYPES)   \
  }                                                                      \
  }

// register_blocked_forward.cuh
#define DAGFM_INSTANTIATE_RB_INNER_OUTER(kB, T, Acc)                                                   \
  template __global__ void forward_inner_outer<Interaction::Inner, kB, T, Acc>(PropagateParams<T>, RbConfig); \
  template __global__ void forward_inner_outer<Interaction::Outer, kB, T, Acc>(PropagateParams<T>, RbConfig);
#define DAGFM_INSTANTIATE_RB_INNER_OUTER_TYPES(T, Acc) \
  DAGFM_CUDA_RB_SAMPLES_PER_THREAD(DAGFM_INSTANTIATE_RB_INNER_OUTER, T, Acc)
#define DAGFM_INSTANTIATE_REGISTER_BLOCKED_FORWARD() \
  namespace dagfm {                                  \
  namespace cuda {                                   \
  namespace rb {                                     \
  DAGFM_CUDA_STORAGE_TYPES(DAGFM_INSTANTIATE_RB_INNER_OUTER_TYPES) \
  }                                                  \
  }                                                  \
  }

// register_blocked_kernel_interaction.cuh
#define DAGFM_INSTANTIATE_RB_KERNEL_INTERACTION(kB, T, Acc) \
  template __global__ void forward_kernel_interaction<kB, T, Acc>(PropagateParams<T>, RbConfig);
#define DAGFM_INSTANTIATE_RB_KERNEL_INTERACTION_TYPES(T, Acc) \
  DAGFM_CUDA_RB_SAMPLES_PER_THREAD(DAGFM_INSTANTIATE_RB_KERNEL_INTERACTION, T, Acc)
#define DAGFM_INSTANTIATE_REGISTER_BLOCKED_KERNEL_INTERACTION() \
  namespace dagfm {                                             \
  namespace cuda {                                              \
  namespace rb {                                                \
  DAGFM_CUDA_STORAGE_TYPES(DAGFM_INSTANTIATE_RB_KERNEL_INTERACTION_TYPES) \
  }                                                             \
  }                                                             \
  }

// register_blocked_inner_backward.cuh
#define DAGFM_INSTANTIATE_RB_INNER_BACKWARD_TYPES(T, Acc) \
  template __global__ void backward_inner<T, Acc>(PropagateBackwardParams<T>, InnerBwdArgs, RbConfig);
#define DAGFM_INSTANTIATE_REGISTER_BLOCKED_INNER_BACKWARD() \
  namespace dagfm {                                         \
  namespace cuda {                                          \
  namespace rb {                                            \
  DAGFM_CUDA_STORAGE_TYPES(DAGFM_INSTANTIATE_RB_INNER_BACKWARD_TYPES) \
  }                                                         \
  }                                                         \
  }

// tensor_core_forward.cuh
#define DAGFM_INSTANTIATE_TC_SHAPE(T, NF, MT) \
  template __global__ void forward_kernel_interaction<T, NF, MT>(PropagateParams<T>, int64_t, int64_t, int64_t);
#define DAGFM_INSTANTIATE_TC_TYPE(T) DAGFM_CUDA_TENSOR_CORE_SHAPES(DAGFM_INSTANTIATE_TC_SHAPE, T)
#define DAGFM_INSTANTIATE_TENSOR_CORE_FORWARD() \
  namespace dagfm {                             \
  namespace cuda {                              \
  namespace tc {                                \
  DAGFM_CUDA_TENSOR_CORE_TYPES(DAGFM_INSTANTIATE_TC_TYPE) \
  }                                             \
  }                                             \
  }
