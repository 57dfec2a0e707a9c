// Cache lines fetched into L2 a few at a time while a tile's register blocks run, so that the
// first reads of what the tile (or the next one) needs from memory overlap FMAs.
#pragma once

#include <cstdint>

#include "vec.h"

#ifdef DAGFM_CPU_VECTORS
namespace dagfm {
namespace cpu {

// Regions of memory (rows of row_bytes, stride bytes apart) fetched line by line as the blocks step
// it, paced so that the last line goes out with the last unit of work. Prefetching never faults, so
// a row past the batch is harmless.
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

}  // namespace cpu
}  // namespace dagfm
#endif
