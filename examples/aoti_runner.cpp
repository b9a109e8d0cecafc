// A C++ program, no Python, that runs an AOTInductor package of a sparse model: the sparse
// ops' schemas and CPU kernels are compiled into it from the project's sources
// (sparsefx.kernels.deployment.sources()). Built by examples/export_aoti.py --runner and by
// tests/test_export.py.
//
//   aoti_runner model.pt2 ROWS IN_FEATURES
//
// runs the package on x[r, c] = sin(0.37 * (r * IN_FEATURES + c)) and prints the output, one
// value per line.
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s model.pt2 ROWS IN_FEATURES\n", argv[0]);
    return 2;
  }
  const int64_t rows = std::atol(argv[2]), in_features = std::atol(argv[3]);
  at::Tensor x = at::arange(rows * in_features, at::kFloat)
                     .reshape({rows, in_features})
                     .mul_(0.37)
                     .sin_();
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> outputs = loader.run({x});
  at::Tensor y = outputs.at(0).contiguous().to(at::kFloat);
  const float* data = y.data_ptr<float>();
  for (int64_t i = 0; i < y.numel(); ++i) std::printf("%.9g\n", data[i]);
  return 0;
}
