// Host test of the tensor-core forward's tile algorithm (csrc/cuda/tensor_core_forward.cuh), no GPU needed.
// forward_warp_tile runs here with a plain-C++ MMA policy (16 x 16 fragments as arrays, the
// same load / mma / store contract as nvcuda::wmma) and a team of one lane, warp after warp, and is
// compared with dagfm_math.h's per-sample forward in double. Covers both K steps (8: the TF32
// layout, 16: the half/bfloat16 layout), D = 16..64, ragged last tiles, several tiles per warp
// (slices reused), L = 0, and the launch planner. Lower-triangle weights, the state buffers' row
// padding, the scratch tiles and the outputs start as NaN: a read of an unused weight, of padding
// or of an unwritten value, or an unwritten output, fails the comparison.
//
//   g++ -std=c++17 -O1 -Wall -Wextra -Werror -I csrc tests/cuda_host/tc_host_test.cpp -o t && ./t
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "host_check.h"
#include "per_sample_reference.h"
#include "cuda/tensor_core_forward.cuh"

using namespace dagfm;
using namespace dagfm::cuda;
using namespace host_check;

namespace {

const float kNaNf = std::numeric_limits<float>::quiet_NaN();

// The WMMA contract on plain arrays: A is 16 x K row-major at p with leading dimension ldm,
// B is K x 16 row-major, the accumulator 16 x 16, stored row-major.
template <int KK>
struct HostMma {
  static constexpr int kK = KK;
  struct FragA { float x[16][KK]; };
  struct FragB { float x[KK][16]; };
  struct FragAcc { float x[16][16]; };
  static void fill_zero(FragAcc& c) {
    for (auto& row : c.x)
      for (float& v : row) v = 0.0f;
  }
  static void load_a(FragA& a, const float* p, unsigned ldm) {
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < KK; ++k) a.x[r][k] = p[int64_t(r) * ldm + k];
  }
  static void load_b(FragB& b, const float* p, unsigned ldm) {
    for (int k = 0; k < KK; ++k)
      for (int n = 0; n < 16; ++n) b.x[k][n] = p[int64_t(k) * ldm + n];
  }
  static void mma(FragAcc& c, const FragA& a, const FragB& b) {
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) {
        float s = c.x[r][n];
        for (int k = 0; k < KK; ++k) s += a.x[r][k] * b.x[k][n];
        c.x[r][n] = s;
      }
  }
  static void add(FragAcc& c, const FragAcc& o) {
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) c.x[r][n] += o.x[r][n];
  }
  static void store(float* p, const FragAcc& c, unsigned ldm) {
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) p[int64_t(r) * ldm + n] = c.x[r][n];
  }
};

template <int KK, int NF, int MT = 1>
void run_case(int64_t B, int F, int L, int warps, std::mt19937_64& rng) {
  constexpr int D = 16 * NF;
  ++g_cases;
  char ctx[128];
  std::snprintf(ctx, sizeof ctx, "K=%d B=%lld F=%d D=%d L=%d warps=%d", KK, (long long)B, F, D, L, warps);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int64_t FD = int64_t(F) * D;
  std::vector<float> h0(B * FD), p(int64_t(L) * F * F * D * D);
  for (auto& v : h0) v = u(rng);
  const float scale = 1.0f / std::sqrt(float(F * D));
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < F; ++i)
      for (int j = 0; j < F; ++j)
        for (int x = 0; x < D * D; ++x)
          p[((int64_t(l) * F + i) * F + j) * D * D + x] = j >= i ? u(rng) * scale : kNaNf;
  std::vector<float> states(B * (L + 1) * F, kNaNf);
  std::vector<float> messages(B * L * FD, kNaNf);  // a^1..a^L, as a training forward keeps them

  PropagateParams<float> prm;
  prm.h0 = h0.data();
  prm.p = p.data();
  prm.states = states.data();
  prm.messages = messages.data();
  prm.batch = B;
  prm.num_fields = F;
  prm.embed_dim = D;
  prm.depth = L;
  prm.interaction = Interaction::Kernel;

  // One slice per warp (state buffer then scratch, as the kernel carves them), poisoned once and
  // reused for every tile the warp takes, tiles round-robin over the warps as on the device.
  const int64_t ld = tc::state_ld(F, D, int(sizeof(float)));
  const int rows = tc::kRows * MT;
  const int64_t tiles = ceil_div64(B, rows);
  std::vector<std::vector<float>> hbuf(warps, std::vector<float>(rows * ld, kNaNf));
  std::vector<std::vector<float>> scratch(warps, std::vector<float>(rows * D, kNaNf));
  for (int w = 0; w < warps; ++w)
    for (int64_t tile = w; tile < tiles; tile += warps)
      tc::forward_warp_tile<HostMma<KK>, float, NF, MT>(prm, hbuf[w].data(), ld, scratch[w].data(),
                                                        tile * rows, Team{0, 1});
  // The row padding is never written (and a read of it would have spread NaN into the outputs).
  for (int w = 0; w < warps; ++w)
    for (int r = 0; r < rows; ++r)
      for (int64_t c = FD; c < ld; ++c)
        if (!std::isnan(hbuf[w][r * ld + c])) {
          ++g_failures;
          std::printf("FAIL padding written [%s]\n", ctx);
          return;
        }

  // Reference: dagfm_math.h in double on the same (float) inputs.
  std::vector<double> h0d(h0.begin(), h0.end()), pd(p.begin(), p.end());
  std::vector<double> ref(states.size()), ws(sample_workspace_numel(F, D, L));
  std::vector<double> ref_msg(messages.size());
  for (int64_t b = 0; b < B; ++b)
    tile_forward<double, double>(Interaction::Kernel, h0d.data() + b * FD, pd.data(), nullptr,
                                 ref.data() + b * (L + 1) * F, ws.data(), F, D, L, 1,
                                 ref_msg.data() + b * L * FD);
  expect(rel_err(messages, ref_msg) < 2e-5, "messages", ctx);
  expect(rel_err(states, ref) < 2e-5, "states", ctx);
}

void test_planner() {
  ++g_cases;
  DeviceLimits h200;
  h200.smem_optin = 232448;
  h200.smem_per_sm = 233472;
  h200.num_sms = 132;
  h200.cc_major = 9;
  // float16, F=39, D=16: rows of 624 halves (78 16-byte units, even) padded to 632.
  tc::TcPlan p16 = tc::plan_forward(39, 16, 2, h200);
  if (!(p16.ok && p16.ld == 632 && p16.warp_bytes == 20224 + 1024 && p16.warps == 5 &&
        p16.smem_bytes == 5 * 21248)) {
    ++g_failures;
    std::printf("FAIL planner fp16: ok=%d ld=%lld warps=%d warp_bytes=%lld\n", int(p16.ok),
                (long long)p16.ld, p16.warps, (long long)p16.warp_bytes);
  }
  // float (TF32), F=39, D=16: 624 floats (156 units, even) padded to 628; 5 warps fit one block.
  tc::TcPlan p32 = tc::plan_forward(39, 16, 4, h200);
  if (!(p32.ok && p32.ld == 628 && p32.warps == 5 && p32.smem_bytes <= h200.smem_optin)) {
    ++g_failures;
    std::printf("FAIL planner fp32: ok=%d ld=%lld warps=%d\n", int(p32.ok), (long long)p32.ld, p32.warps);
  }
  // Every plan: odd number of 16-byte units per row, ld >= F*D, slices 128-byte multiples.
  for (int F : {1, 2, 8, 23, 39, 100})
    for (int D : {16, 32, 48, 64})
      for (int es : {2, 4}) {
        tc::TcPlan pl = tc::plan_forward(F, D, es, h200);
        const bool fits = int64_t(tc::kRows) * (int64_t(F) * D + 16) * es + 16 * D * 4 + 256 <= h200.smem_optin;
        if (pl.ok != fits && fits) {
          ++g_failures;
          std::printf("FAIL planner F=%d D=%d es=%d: no plan although one warp fits\n", F, D, es);
        }
        if (!pl.ok) continue;
        if (pl.ld < int64_t(F) * D || (pl.ld * es / 16) % 2 != 1 || pl.warp_bytes % 128 != 0 ||
            pl.smem_bytes > h200.smem_optin || pl.warps < 1 || pl.warps > tc::kMaxWarps) {
          ++g_failures;
          std::printf("FAIL planner F=%d D=%d es=%d: ld=%lld warps=%d\n", F, D, es, (long long)pl.ld,
                      pl.warps);
        }
      }
  // Unsupported dims: no plan; two row tiles per warp only up to D = 32, and a larger slice.
  for (int D : {1, 8, 12, 24, 80})
    if (tc::plan_forward(39, D, 2, h200).ok) {
      ++g_failures;
      std::printf("FAIL planner accepted D=%d\n", D);
    }
  const tc::TcPlan two = tc::plan_forward(39, 16, 2, h200, 2);
  if (!(two.ok && two.mt == 2 && two.warp_bytes >= 2 * 16 * 632 * 2) || tc::plan_forward(39, 48, 2, h200, 2).ok ||
      tc::plan_forward(39, 16, 2, h200, 3).ok) {
    ++g_failures;
    std::printf("FAIL planner row tiles\n");
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  test_planner();
  // (B, F, L, warps): ragged tiles, one field, more tiles than warps, L = 0.
  const int cases[][4] = {{1, 1, 1, 1}, {16, 3, 2, 1}, {37, 5, 3, 2}, {70, 8, 1, 3}, {5, 2, 0, 1}, {33, 13, 3, 2}};
  for (const auto& c : cases) {
    run_case<8, 1>(c[0], c[1], c[2], c[3], rng);
    run_case<16, 1>(c[0], c[1], c[2], c[3], rng);
  }
  run_case<8, 2>(35, 7, 2, 2, rng);
  run_case<16, 2>(35, 7, 2, 2, rng);
  run_case<16, 3>(20, 4, 2, 1, rng);
  run_case<8, 4>(18, 3, 3, 2, rng);
  run_case<16, 4>(18, 3, 3, 2, rng);
  run_case<16, 1>(100, 39, 3, 4, rng);
  // Two row tiles per warp (MT = 2): ragged 32-sample tiles, one and two fragments of D.
  run_case<8, 1, 2>(1, 1, 1, 1, rng);
  run_case<16, 1, 2>(37, 5, 3, 2, rng);
  run_case<8, 1, 2>(70, 8, 2, 3, rng);
  run_case<16, 2, 2>(35, 7, 2, 2, rng);
  run_case<8, 2, 2>(65, 13, 3, 1, rng);
  return report("tc_host_test");
}
