// The CPU tile kernels (csrc/cpu/*.h, free of torch) timed on their own: one thread, CPU time, next to
// an FMA loop that measures this core's vector peak in the same process. What the op adds around them
// (dispatch, threads, gradient chunks, the kernel interaction's BLAS path at large batches) is not here;
// `dagfm-ext bench` measures the op. Builds in two minutes without torch (the extension's CPU file
// takes ten), so a kernel change can be timed and checked before the extension is rebuilt; CMake
// builds it as the target cpu_kernels and ctest runs its check:
//
//   g++ -O3 -std=c++20 -fopenmp-simd -Wno-psabi -I csrc benchmarks/cpu_kernels.cpp -o cpu_kernels
//   ./cpu_kernels [--isa avx512|avx2|generic] [--interaction inner|outer|kernel] [--batch 4096]
//                 [--fields 39] [--depth 3] [--reps 9]
//   ./cpu_kernels --check     (vector loops against the portable ones, float64 and float32; exit 1 on a mismatch)
//
// The embedding size is 16 (the tile loops are compiled for fixed sizes). Useful FLOPs are counted as
// in dagfm_ext/cost.py (upper triangle only; the backward on the kept messages).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "cpu/backward_tile.h"
#include "cpu/cpu_features.h"
#include "cpu/tile.h"

#if !DAGFM_X86_DISPATCH
#error "benchmarks/cpu_kernels.cpp needs GCC on x86-64 (per-function target attributes)"
#endif

namespace {

using dagfm::CpuIsa;
using dagfm::Interaction;
using dagfm::PropagateBackwardParams;
using dagfm::PropagateParams;

constexpr int kD = 16;

// Buffers on 64-byte boundaries, as torch allocates tensors: malloc's 16-byte alignment would split
// every vector load across two cache lines and time a slower loop than the op runs.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

// One entry per instruction set, compiled for it as the op's dagfm_cpu.cpp does.
template <typename T>
DAGFM_TARGET_AVX512 void forward_avx512(const PropagateParams<T>& pr, T* ws, T* saved) {
  dagfm::cpu::forward_tiles<T, 64, 24, kD>(pr, 0, pr.batch, ws, saved);
}
template <typename T>
DAGFM_TARGET_AVX2 void forward_avx2(const PropagateParams<T>& pr, T* ws, T* saved) {
  dagfm::cpu::forward_tiles<T, 32, 12, kD>(pr, 0, pr.batch, ws, saved);
}
template <typename T>
void forward_generic(const PropagateParams<T>& pr, T* ws, T* saved) {
  dagfm::cpu::forward_tiles<T, 0, 0, 0>(pr, 0, pr.batch, ws, saved);
}
template <typename T>
DAGFM_TARGET_AVX512 void backward_avx512(const PropagateBackwardParams<T>& pr, T* ws, const T* saved) {
  dagfm::cpu::backward_tiles<T, 64, 24, kD>(pr, 0, pr.batch, pr.grad_p, pr.grad_q, ws, saved);
}
template <typename T>
DAGFM_TARGET_AVX2 void backward_avx2(const PropagateBackwardParams<T>& pr, T* ws, const T* saved) {
  dagfm::cpu::backward_tiles<T, 32, 12, kD>(pr, 0, pr.batch, pr.grad_p, pr.grad_q, ws, saved);
}
template <typename T>
void backward_generic(const PropagateBackwardParams<T>& pr, T* ws, const T* saved) {
  dagfm::cpu::backward_tiles<T, 0, 0, 0>(pr, 0, pr.batch, pr.grad_p, pr.grad_q, ws, saved);
}

template <typename T>
void forward(CpuIsa isa, const PropagateParams<T>& pr, T* ws, T* saved) {
  if (isa == CpuIsa::Avx512) return forward_avx512(pr, ws, saved);
  if (isa == CpuIsa::Avx2) return forward_avx2(pr, ws, saved);
  forward_generic(pr, ws, saved);
}
template <typename T>
void backward(CpuIsa isa, const PropagateBackwardParams<T>& pr, T* ws, const T* saved) {
  if (isa == CpuIsa::Avx512) return backward_avx512(pr, ws, saved);
  if (isa == CpuIsa::Avx2) return backward_avx2(pr, ws, saved);
  backward_generic(pr, ws, saved);
}

// 12 independent FMA chains on full vectors: the core's float32 FMA rate for this instruction set.
template <int kBytes>
DAGFM_HD double fma_peak_gflops() {
  using V = typename dagfm::cpu::Vec<float, kBytes>::type;
  constexpr int kChains = 12;
  volatile float seed = 0.999999f;
  V acc[kChains], x = V{} + seed, y = V{} + 1e-7f;
  for (int k = 0; k < kChains; ++k) acc[k] = V{} + float(k + 1);
  const long n = 20000000;
  timespec t0, t1;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  for (long i = 0; i < n; ++i)
#pragma GCC unroll 12
    for (int k = 0; k < kChains; ++k) acc[k] = acc[k] * x + y;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  float sink = 0;
  for (int k = 0; k < kChains; ++k) sink += acc[k][0];
  if (sink == 12345.f) std::puts("");  // keeps the loop
  const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  return n * double(kChains) * (kBytes / 4) * 2 / s * 1e-9;
}
DAGFM_TARGET_AVX512 double fma_peak_avx512() { return fma_peak_gflops<64>(); }
DAGFM_TARGET_AVX2 double fma_peak_avx2() { return fma_peak_gflops<32>(); }

// Useful FLOPs of one forward and of one backward on the kept messages, as dagfm_ext/cost.py counts them.
void useful_flops(Interaction kind, int64_t B, int F, int D, int L, double* fwd, double* bwd) {
  const double E = double(F) * (F + 1) / 2;
  const double edge_fwd = kind == Interaction::Kernel ? 2.0 * D * D : kind == Interaction::Outer ? 4.0 * D : 2.0 * D;
  const double edge_bwd = kind == Interaction::Kernel ? 4.0 * D * D : kind == Interaction::Outer ? 10.0 * D : 4.0 * D;
  *fwd = B * (F * double(D) + L * (E * edge_fwd + 2.0 * F * D));
  *bwd = B * L * (E * edge_bwd + 4.0 * F * D);
}

template <typename T>
struct Problem {
  int64_t B;
  int F, D, L;
  Interaction kind;
  Buffer<T> h0, p, q, states, saved, grad_states, grad_h0, grad_p, grad_q, ws;

  Problem(int64_t B_, int F_, int L_, Interaction kind_, unsigned seed) : B(B_), F(F_), D(kD), L(L_), kind(kind_) {
    const int64_t FD = int64_t(F) * D, layer = kind == Interaction::Kernel ? int64_t(F) * F * D * D : int64_t(F) * F * D;
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    auto fill = [&](Buffer<T>& v, int64_t n, double scale) {
      v.resize(n);
      for (auto& x : v) x = T(scale * u(gen));
    };
    // Weights scaled so that the states keep their magnitude through the layers.
    const double w = kind == Interaction::Kernel ? 1.0 / (F * D) : kind == Interaction::Outer ? 1.0 / std::sqrt(F * D) : 1.0 / F;
    fill(h0, B * FD, 1.0);
    fill(p, L * layer, w);
    fill(q, kind == Interaction::Outer ? L * layer : 0, 1.0);
    fill(grad_states, B * (L + 1) * F, 1.0);
    states.assign(B * (L + 1) * F, T(0));
    saved.assign(B * L * FD, T(0));
    grad_h0.assign(B * FD, T(0));
    grad_p.assign(L * layer, T(0));
    grad_q.assign(q.size(), T(0));
    ws.assign(std::max(dagfm::cpu::forward_tile_numel(F, D, dagfm::cpu::kForwardTileRows),
                       dagfm::cpu::backward_tiles_numel(F, D, L)),
              T(0));
  }
  PropagateParams<T> params() {
    PropagateParams<T> pr;
    pr.h0 = h0.data();
    pr.p = p.data();
    pr.q = q.empty() ? nullptr : q.data();
    pr.states = states.data();
    pr.batch = B;
    pr.num_fields = F;
    pr.embed_dim = D;
    pr.depth = L;
    pr.interaction = kind;
    return pr;
  }
  PropagateBackwardParams<T> backward_params() {
    PropagateBackwardParams<T> pr;
    static_cast<PropagateParams<T>&>(pr) = params();
    pr.grad_states = grad_states.data();
    pr.saved_messages = saved.data();
    pr.grad_h0 = grad_h0.data();
    pr.grad_p = grad_p.data();
    pr.grad_q = grad_q.empty() ? nullptr : grad_q.data();
    return pr;
  }
  T* workspace() { return ws.data(); }
  // forward (with the messages), then backward into zeroed gradients
  void run(CpuIsa isa) {
    forward(isa, params(), workspace(), saved.data());
    std::fill(grad_p.begin(), grad_p.end(), T(0));
    std::fill(grad_q.begin(), grad_q.end(), T(0));
    backward(isa, backward_params(), workspace(), saved.data());
  }
};

double now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

template <typename T>
double max_rel_error(const Buffer<T>& a, const Buffer<T>& b) {
  double num = 0, den = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    num = std::max(num, std::fabs(double(a[k]) - double(b[k])));
    den = std::max(den, std::fabs(double(b[k])));
  }
  return num / std::max(den, 1e-30);
}

template <typename T>
bool check_one(CpuIsa isa, int64_t B, int F, int L, Interaction kind, double tol) {
  Problem<T> vec(B, F, L, kind, 7), ref(B, F, L, kind, 7);
  vec.run(isa);
  ref.run(CpuIsa::Generic);
  const double err = std::max({max_rel_error(vec.states, ref.states), max_rel_error(vec.saved, ref.saved),
                               max_rel_error(vec.grad_h0, ref.grad_h0), max_rel_error(vec.grad_p, ref.grad_p),
                               max_rel_error(vec.grad_q, ref.grad_q)});
  const bool ok = err <= tol;
  if (!ok)
    std::printf("MISMATCH %s B=%lld F=%d L=%d kind=%d: relative error %.3g > %.3g\n",
                sizeof(T) == 8 ? "float64" : "float32", (long long)B, F, L, int(kind), err, tol);
  return ok;
}

int check(CpuIsa isa) {
  int failures = 0, cases = 0;
  for (Interaction kind : {Interaction::Inner, Interaction::Outer, Interaction::Kernel})
    for (int64_t B : {1, 7, 16, 50})
      for (int F : {1, 5, 39})
        for (int L : {1, 3}) {
          failures += !check_one<double>(isa, B, F, L, kind, 1e-12);
          failures += !check_one<float>(isa, B, F, L, kind, 1e-4);
          cases += 2;
        }
  std::printf("check (%s loops against the portable ones): %d of %d cases match\n",
              dagfm::isa_name(isa), cases - failures, cases);
  return failures == 0 ? 0 : 1;
}

template <typename Fn>
double best_ms(int reps, Fn&& fn) {
  fn();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now();
    fn();
    best = std::min(best, now() - t0);
  }
  return best * 1e3;
}

// only: the interaction to time, or -1 for all three.
int bench(CpuIsa isa, int64_t B, int F, int L, int reps, int only) {
  const double peak = isa == CpuIsa::Avx512 ? fma_peak_avx512() : isa == CpuIsa::Avx2 ? fma_peak_avx2() : 0.0;
  std::printf("isa %s, 1 thread, B=%lld F=%d D=%d L=%d float32, best of %d calls in CPU time; FMA peak %.1f GFLOP/s\n\n",
              dagfm::isa_name(isa), (long long)B, F, kD, L, reps, peak);
  std::printf("| interaction | pass | ms | useful GFLOP/s | of FMA peak |\n|---|---|---|---|---|\n");
  // (The op takes BLAS products for the kernel interaction at large batches; its rows here are the
  // tile loops it runs at small ones.)
  const char* names[] = {"inner", "outer", "kernel"};
  for (Interaction kind : {Interaction::Inner, Interaction::Outer, Interaction::Kernel}) {
    if (only >= 0 && int(kind) != only) continue;
    Problem<float> pb(B, F, L, kind, 1);
    double fwd_flops, bwd_flops;
    useful_flops(kind, B, F, kD, L, &fwd_flops, &bwd_flops);
    const double infer = best_ms(reps, [&] { forward(isa, pb.params(), pb.workspace(), (float*)nullptr); });
    const double train = best_ms(reps, [&] { forward(isa, pb.params(), pb.workspace(), pb.saved.data()); });
    // The kernel interaction's backward at D >= 8 runs as BLAS products in the op (kernel_blas.h).
    const bool tile_backward = kind != Interaction::Kernel;
    const double back =
        tile_backward ? best_ms(reps, [&] { backward(isa, pb.backward_params(), pb.workspace(), pb.saved.data()); }) : 0;
    const struct { const char* pass; double ms, flops; } rows[] = {
        {"fwd", infer, fwd_flops}, {"fwd (keeps messages)", train, fwd_flops}, {"bwd", back, bwd_flops}};
    for (const auto& r : rows) {
      if (r.ms == 0) continue;
      const double gflops = r.flops / (r.ms * 1e-3) * 1e-9;
      std::printf("| %s | %s | %.2f | %.1f | %s |\n", names[int(kind)], r.pass, r.ms, gflops,
                  peak > 0 ? (std::to_string(int(std::lround(100 * gflops / peak))) + "%").c_str() : "-");
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const CpuIsa best = dagfm::supported_isa();
  CpuIsa isa = best;
  int64_t B = 4096;
  int F = 39, L = 3, reps = 9, only = -1;
  bool do_check = false;
  for (int k = 1; k < argc; ++k) {
    const std::string a = argv[k];
    auto value = [&]() -> const char* {
      if (k + 1 >= argc) {
        std::fprintf(stderr, "%s: expected a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++k];
    };
    if (a == "--check") do_check = true;
    else if (a == "--batch") B = std::atoll(value());
    else if (a == "--fields") F = std::atoi(value());
    else if (a == "--depth") L = std::atoi(value());
    else if (a == "--reps") reps = std::atoi(value());
    else if (a == "--interaction") {
      const std::string v = value();
      only = v == "inner" ? int(Interaction::Inner) : v == "outer" ? int(Interaction::Outer)
             : v == "kernel" ? int(Interaction::Kernel) : -2;
      if (only == -2) {
        std::fprintf(stderr, "--interaction: expected inner, outer or kernel, got '%s'\n", v.c_str());
        return 2;
      }
    }
    else if (a == "--isa") {
      const std::string v = value();
      isa = v == "avx512" ? CpuIsa::Avx512 : v == "avx2" ? CpuIsa::Avx2 : v == "generic" ? CpuIsa::Generic : best;
      if (v != "avx512" && v != "avx2" && v != "generic") {
        std::fprintf(stderr, "--isa: expected avx512, avx2 or generic, got '%s'\n", v.c_str());
        return 2;
      }
      if (int(isa) > int(best)) {
        std::fprintf(stderr, "--isa %s: this CPU does not have it\n", v.c_str());
        return 2;
      }
    } else {
      std::fprintf(stderr, "unknown argument '%s' (see the comment at the top of benchmarks/cpu_kernels.cpp)\n",
                   a.c_str());
      return 2;
    }
  }
  if (B < 1 || F < 1 || L < 1 || reps < 1) {
    std::fprintf(stderr, "--batch, --fields, --depth and --reps: expected positive integers\n");
    return 2;
  }
  if (do_check) {
    int rc = 0;
    for (CpuIsa i : {CpuIsa::Avx2, CpuIsa::Avx512})
      if (int(i) <= int(best)) rc |= check(i);
    return rc;
  }
  return bench(isa, B, F, L, reps, only);
}
