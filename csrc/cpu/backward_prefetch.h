// What a CPU backward tile reads next from memory, fetched into L2 while its register blocks run:
// the line prefetcher the blocks step, and the plan of what it fetches after each layer.
#pragma once

#include <cstdint>

#include "../dagfm_params.h"
#include "vec.h"

#ifdef DAGFM_CPU_VECTORS
namespace dagfm {
namespace cpu {

// Cache lines a tile reads next from memory (the kept messages, h0, grad_h0 to be written),
// fetched into L2 a few at a time between register blocks: their first reads then overlap the
// blocks' FMAs instead of stalling a pass of few operations per value. Regions are rows of
// row_bytes, stride bytes apart; prefetching never faults, so a row past the batch is harmless.
struct LinePrefetcher {
  struct Rows {
    const char* base;
    int64_t rows, row_bytes, stride;
    bool write;
  };
  static constexpr int kMaxRegions = 8;
  static constexpr int64_t kLine = 64;
  Rows regions[kMaxRegions];
  int count = 0, region = 0;
  int64_t row = 0, offset = 0;
  // Lines owed, in units of 1/work lines: each unit of work adds `lines`.
  int64_t lines = 0, work = 1, owed = 0;

  DAGFM_HD void add(const void* base, int64_t rows, int64_t row_bytes, int64_t stride, bool write) {
    if (base != nullptr && rows > 0 && count < kMaxRegions)
      regions[count++] = Rows{static_cast<const char*>(base), rows, row_bytes, stride, write};
  }
  // Spreads what was added over calls of step() whose weights add up to total_work.
  DAGFM_HD void pace(int64_t total_work) {
    lines = 0;
    for (int r = 0; r < count; ++r) lines += regions[r].rows * ((regions[r].row_bytes + kLine - 1) / kLine);
    work = total_work > 0 ? total_work : 1;
  }
  DAGFM_HD void step(int64_t weight) {
    owed += lines * weight;
    for (; owed >= work && region < count; owed -= work) {
      const Rows& r = regions[region];
      const char* line = r.base + row * r.stride + offset;
      if (r.write)
        __builtin_prefetch(line, 1, 2);
      else
        __builtin_prefetch(line, 0, 2);
      offset += kLine;
      if (offset >= r.row_bytes) {
        offset = 0;
        if (++row == r.rows) {
          row = 0;
          ++region;
        }
      }
    }
  }
  DAGFM_HD void clear() { count = region = 0, row = offset = owed = lines = 0, work = 1; }
};

// What a backward tile first reads from memory after layer t's register blocks, for `prefetch`
// to fetch while they run: a^{t-2} of this tile (read by layer t-1); in layers 2 and 1, the next
// tile's a^L and h0, then its grad_h0, a^{L-1} and the gradients it starts from. message(t): a^t of
// the tile's first sample, samples message_stride apart; next_messages: the next tile's a^1 in the
// kept messages, or nullptr.
template <typename T, typename Message>
DAGFM_HD void plan_next_reads(LinePrefetcher& prefetch, const PropagateBackwardParams<T>& pr, int64_t b, int S,
                              int t, Message&& message, int64_t message_stride, const T* next_messages) {
  const int L = pr.depth;
  const int64_t FD = int64_t(pr.num_fields) * pr.embed_dim, states_row = int64_t(L + 1) * pr.num_fields;
  const int64_t row_bytes = FD * int64_t(sizeof(T)), message_bytes = message_stride * int64_t(sizeof(T));
  const int64_t next = b + S, next_rows = next + S <= pr.batch ? S : pr.batch - next;
  prefetch.clear();
  if (t > 2) prefetch.add(message(t - 2), S, row_bytes, message_bytes, false);
  if (t > 2 || next_rows <= 0) return;
  // Half of the next tile's reads during layer 2, the rest during layer 1.
  const int half = t == 2 ? 0 : L == 1 ? 2 : 1;
  const int64_t block_bytes = next_rows * row_bytes;
  if (half != 1) {
    if (next_messages != nullptr) prefetch.add(next_messages + (L - 1) * FD, next_rows, row_bytes, message_bytes, false);
    prefetch.add(pr.h0 + next * FD, 1, block_bytes, 0, false);
  }
  if (half != 0) {
    prefetch.add(pr.grad_h0 + next * FD, 1, block_bytes, 0, true);
    if (next_messages != nullptr && L > 1)
      prefetch.add(next_messages + (L - 2) * FD, next_rows, row_bytes, message_bytes, false);
    prefetch.add(pr.grad_states + next * states_row, 1, next_rows * states_row * int64_t(sizeof(T)), 0, false);
    if (pr.grad_sum != nullptr) prefetch.add(pr.grad_sum + next * FD, 1, block_bytes, 0, false);
  }
}

}  // namespace cpu
}  // namespace dagfm
#endif
