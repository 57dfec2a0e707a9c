// Serve an exported DAGFM student from C++: load the AOTInductor package written by
// `dagfm-ext export --aoti FILE`, score a batch of encoded rows, print the logits.
//
//   serve_student PACKAGE.pt2 ROWS.csv [EXPECTED.csv]
//
// ROWS.csv: one row per line, the schema's integer slots (FeatureSchema.encode: ids per field,
// multi-valued fields padded with -1). EXPECTED.csv (optional): one logit per line; the program
// fails if any logit differs by more than 1e-5 (the ctest uses this).
//
// The package calls dagfm_ext::propagate_fwd through the dispatcher, so this binary links the
// ops library (libdagfm_ops) whole: its static registration must run before the package loads.
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::vector<std::vector<double>> read_csv(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<std::vector<double>> rows;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::vector<double> row;
    std::stringstream cells(line);
    std::string cell;
    while (std::getline(cells, cell, ',')) row.push_back(std::stod(cell));
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::fprintf(stderr, "usage: %s PACKAGE.pt2 ROWS.csv [EXPECTED.csv]\n", argv[0]);
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const auto meta = loader.get_metadata();
    const auto rows = read_csv(argv[2]);
    if (rows.empty()) throw std::runtime_error(std::string("no rows in ") + argv[2]);
    const int64_t slots = static_cast<int64_t>(rows[0].size());
    if (meta.count("num_slots") && std::stoll(meta.at("num_slots")) != slots) {
      throw std::runtime_error("ROWS.csv: expected " + meta.at("num_slots") + " slots per row, got " +
                               std::to_string(slots));
    }
    at::Tensor x = at::empty({static_cast<int64_t>(rows.size()), slots}, at::kLong);
    auto acc = x.accessor<int64_t, 2>();
    for (size_t i = 0; i < rows.size(); ++i) {
      if (static_cast<int64_t>(rows[i].size()) != slots) {
        throw std::runtime_error("ROWS.csv: line " + std::to_string(i + 1) + " has " +
                                 std::to_string(rows[i].size()) + " slots, expected " + std::to_string(slots));
      }
      for (int64_t j = 0; j < slots; ++j) acc[i][j] = static_cast<int64_t>(rows[i][j]);
    }
    const at::Tensor logits = loader.run({x})[0].to(at::kDouble).contiguous();
    for (int64_t i = 0; i < logits.size(0); ++i) std::printf("%.7f\n", logits[i].item<double>());

    if (argc == 4) {
      const auto expected = read_csv(argv[3]);
      if (static_cast<int64_t>(expected.size()) != logits.size(0)) {
        std::fprintf(stderr, "FAIL: %zu expected logits, got %lld\n", expected.size(),
                     static_cast<long long>(logits.size(0)));
        return 1;
      }
      double worst = 0.0;
      for (size_t i = 0; i < expected.size(); ++i) {
        worst = std::max(worst, std::abs(expected[i][0] - logits[static_cast<int64_t>(i)].item<double>()));
      }
      std::printf("%s: max |C++ - Python| = %.3g\n", worst <= 1e-5 ? "PASS" : "FAIL", worst);
      return worst <= 1e-5 ? 0 : 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve_student: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
