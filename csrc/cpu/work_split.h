// How a CPU call spreads its work: threads only where each gets enough of it, gradient chunks
// fixed by the shapes (bit-identical results for any thread count), per-thread workspaces.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

#include "../dagfm_math.h"
#include "../dagfm_params.h"

namespace dagfm {

// Work below which a second thread costs more (wake-up, a cold cache) than it saves.
constexpr int64_t kMinFlopsPerThread = int64_t(1) << 20;
// Gradient chunks: at least this many rows each, at most this many chunks, within this memory.
// Partials are zeroed and summed once more at the end, so their total stays small next to the work.
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMaxPartialBytes = int64_t(32) << 20;
// A batch short of two such chunks is still cut in two from this many rows per half, where a
// partial stays in cache (at most this large): a second thread then takes half of a small batch's
// backward for one extra partial's zeroing and sum.
constexpr int64_t kMinSplitRows = 64;
constexpr int64_t kMaxSplitPartialBytes = int64_t(1) << 20;

struct ChunkPlan {
  int64_t num_chunks = 1;
  int64_t chunk_rows = 1;
};

// Depends on the batch size and the weight size only, never on the thread count.
inline ChunkPlan plan_gradient_chunks(int64_t batch, int64_t partial_bytes) {
  ChunkPlan plan;
  int64_t by_rows = (batch + kMinChunkRows - 1) / kMinChunkRows;
  if (by_rows < 2 && batch >= 2 * kMinSplitRows && partial_bytes <= kMaxSplitPartialBytes) by_rows = 2;
  const int64_t by_memory = std::max<int64_t>(1, kMaxPartialBytes / std::max<int64_t>(1, partial_bytes));
  // A power of two: two, four or eight threads then take equal shares of the chunks (seven chunks
  // on two threads would leave one thread a chunk longer than the other).
  plan.num_chunks = int64_t(std::bit_floor(uint64_t(std::max<int64_t>(1, std::min({by_rows, kMaxChunks, by_memory})))));
  plan.chunk_rows = (batch + plan.num_chunks - 1) / plan.num_chunks;
  plan.num_chunks = (batch + plan.chunk_rows - 1) / plan.chunk_rows;
  return plan;
}

// out[k] += partials[c][k] for c = 0..count-1 in order: the first chunk sums straight into out, the
// others into their partials (count = chunks - 1); threads split k only.
template <typename T>
void add_partials(const T* partials, int64_t count, int64_t numel, T* out) {
  if (count <= 0) return;
  at::parallel_for(0, numel, 4096, [&](int64_t k0, int64_t k1) {
    for (int64_t c = 0; c < count; ++c) {
      const T* part = partials + c * numel;
      DAGFM_SIMD
      for (int64_t k = k0; k < k1; ++k) out[k] += part[k];
    }
  });
}

template <typename T>
int64_t per_row_flops(const PropagateParams<T>& pr) {
  const int64_t edges = int64_t(pr.num_fields) * (pr.num_fields + 1) / 2;
  const int64_t per_edge = pr.interaction == Interaction::Kernel ? 2 * int64_t(pr.embed_dim) * pr.embed_dim
                           : pr.interaction == Interaction::Outer ? 4 * int64_t(pr.embed_dim)
                                                                  : 2 * int64_t(pr.embed_dim);
  return std::max<int64_t>(1, edges * per_edge * pr.depth);
}

// Buffers the tile loops read are cache-line aligned: they load whole 64-byte vectors, and one
// that straddles two lines costs two loads. A buffer holds kLineElems<T> spare elements for it.
constexpr uintptr_t kCacheLine = 64;
template <typename T>
constexpr int64_t kLineElems = int64_t(kCacheLine / sizeof(T));

template <typename T>
T* line_aligned(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + kCacheLine - 1) & ~(kCacheLine - 1));
}

// A per-thread scratch buffer that only grows: no allocation (and no page faults) per call. A
// caller that holds one across a parallel region, whose body may take the untagged one on the same
// thread, names its own Tag.
template <typename T, typename Tag = void>
T* thread_workspace(int64_t numel) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < numel + kLineElems<T>) buf.resize(numel + kLineElems<T>);
  return line_aligned(buf.data());
}

// thread_workspace tag of the calling thread's weight-gradient partials, one per gradient chunk
// (up to kMaxPartialBytes, kept between calls).
struct GradientPartialsBuffer;

// Units of `unit_flops` each per thread, so that every thread gets at least kMinFlopsPerThread.
inline int64_t grain_for(int64_t unit_flops) {
  return std::max<int64_t>(1, (kMinFlopsPerThread + unit_flops - 1) / std::max<int64_t>(1, unit_flops));
}

}  // namespace dagfm
