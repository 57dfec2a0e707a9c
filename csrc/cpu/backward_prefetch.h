// What a CPU backward tile reads next from memory, fetched into L2 while its register blocks run:
// the plan of what the line prefetcher fetches after each layer.
#pragma once

#include <cstdint>

#include "../dagfm_params.h"
#include "line_prefetcher.h"
#include "vec.h"

#ifdef DAGFM_CPU_VECTORS
namespace dagfm {
namespace cpu {

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
