// What the host tests in this folder share: failure and case counters, a checked condition, the
// relative error against a double reference, and the closing report.
#pragma once

#include <cmath>
#include <cstdio>
#include <vector>

namespace host_check {

inline int g_failures = 0;
inline int g_cases = 0;

inline void expect(bool ok, const char* what, const char* ctx) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s [%s]\n", what, ctx);
  }
}

// max |a - b| / max(1, max |b|); a size mismatch or NaN / inf anywhere gives infinity.
template <typename V>
double rel_err(const std::vector<V>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double err = 0, scale = 1;
  for (size_t k = 0; k < a.size(); ++k) {
    if (!std::isfinite(double(a[k])) || !std::isfinite(b[k])) return INFINITY;
    err = std::fmax(err, std::fabs(double(a[k]) - b[k]));
    scale = std::fmax(scale, std::fabs(b[k]));
  }
  return err / scale;
}

// The exit status of main: 0 when nothing failed.
inline int report(const char* name) {
  std::printf("%s: %d cases, %d failures\n", name, g_cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace host_check
