// The BLAS that torch links (MKL on x86 wheels), reached through its Fortran symbols: row-major
// products for the kernel interaction's large-batch paths, run single-threaded inside the
// callers' parallel regions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

// Fortran BLAS as exported by the BLAS that torch links (MKL on x86 wheels). Declared weak so a
// torch without them still loads; the portable loops below take over then.
#if defined(__GNUC__) && !defined(_WIN32)
#define DAGFM_WEAK __attribute__((weak))
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) DAGFM_WEAK;
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) DAGFM_WEAK;
// Fortran entry point (argument by reference), the one MKL exports under the plain name too.
int mkl_set_num_threads_local_(const int* nt) DAGFM_WEAK;
}
#define DAGFM_HAVE_WEAK_BLAS 1
#else
#define DAGFM_HAVE_WEAK_BLAS 0
#endif


namespace dagfm {

template <typename T>
bool blas_available() {
#if DAGFM_HAVE_WEAK_BLAS
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  if constexpr (std::is_same_v<T, double>) return dgemm_ != nullptr;
#endif
  return false;
}

// A BLAS call inside a tile must run on one thread: the tiles are already spread over the threads,
// and a single-threaded product sums in the same order whatever the thread count.
struct SingleThreadedBlas {
  SingleThreadedBlas() {
#if DAGFM_HAVE_WEAK_BLAS
    const int one = 1;
    if (mkl_set_num_threads_local_ != nullptr) previous_ = mkl_set_num_threads_local_(&one);
#endif
  }
  ~SingleThreadedBlas() {
#if DAGFM_HAVE_WEAK_BLAS
    if (mkl_set_num_threads_local_ != nullptr) mkl_set_num_threads_local_(&previous_);
#endif
  }
  int previous_ = 0;
};

// Row-major C (M x N) = op(A) * op(B) + beta * C; op(A) is M x K, op(B) is K x N.
template <typename T>
void gemm_rowmajor(bool trans_a, bool trans_b, int M, int N, int K, const T* A, int lda,
                   const T* B, int ldb, T beta, T* C, int ldc) {
  if (M == 0 || N == 0) return;
#if DAGFM_HAVE_WEAK_BLAS
  if (blas_available<T>()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N';
    const char tb = trans_a ? 'T' : 'N';
    const T one = T(1);
    if constexpr (std::is_same_v<T, float>)
      sgemm_(&ta, &tb, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
    else
      dgemm_(&ta, &tb, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
    return;
  }
#endif
  for (int m = 0; m < M; ++m) {
    T* c = C + int64_t(m) * ldc;
    if (beta == T(0))
      std::fill(c, c + N, T(0));
    else if (beta != T(1))
      for (int n = 0; n < N; ++n) c[n] *= beta;
    for (int k = 0; k < K; ++k) {
      const T a = trans_a ? A[int64_t(k) * lda + m] : A[int64_t(m) * lda + k];
      if (trans_b) {
        for (int n = 0; n < N; ++n) c[n] += a * B[int64_t(n) * ldb + k];
      } else {
        const T* b = B + int64_t(k) * ldb;
        DAGFM_SIMD
        for (int n = 0; n < N; ++n) c[n] += a * b[n];
      }
    }
  }
}

}  // namespace dagfm
