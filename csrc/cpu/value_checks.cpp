// copa_fast::value_summary: what the public API's value checks need to know of one call's data, in
// one call and (on a GPU) one copy back — [min label, max label, distinct labels in [0, k),
// non-finite entries over `tensors`, tau] as floats. The Python side (copa_fast/_validate.py)
// decides; the detailed checks run only when something fails. CPU kernel here, CUDA in
// csrc/cuda/binding.cpp. A value is non-finite when its exponent bits are all ones.
//
//   value_summary(Tensor labels, int k, Tensor[] tensors, Tensor? tau) -> float[]

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../symmetric_ce_checks.h"

namespace copa_fast {
namespace {

template <typename U>
int64_t count_nonfinite(const at::Tensor& t, U mask) {
  const at::Tensor c = t.contiguous();
  const U* x = reinterpret_cast<const U*>(c.data_ptr());
  return at::parallel_reduce(
      int64_t(0), c.numel(), int64_t(1) << 16, int64_t(0),
      [&](int64_t b, int64_t e, int64_t acc) {
        for (int64_t i = b; i < e; ++i) acc += (x[i] & mask) == mask;
        return acc;
      },
      [](int64_t a, int64_t b) { return a + b; });
}

template <typename L>
void label_summary(const at::Tensor& labels, int64_t k, std::vector<double>& out) {
  const at::Tensor y = labels.contiguous();
  const L* p = y.data_ptr<L>();
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min(), present = 0;
  std::vector<char> seen(k, 0);
  for (int64_t i = 0; i < y.numel(); ++i) {
    const int64_t v = p[i];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    if (v >= 0 && v < k && !seen[v]) {
      seen[v] = 1;
      ++present;
    }
  }
  out[0] = double(lo);
  out[1] = double(hi);
  out[2] = double(present);
}

std::vector<double> value_summary_cpu(const at::Tensor& labels, int64_t k, at::TensorList tensors,
                                      const c10::optional<at::Tensor>& tau) {
  check_value_summary_args(labels, k, tensors, tau);
  CHECK_ARG(labels.device().is_cpu(), "labels: expected a CPU tensor, got ", labels.device());
  std::vector<double> out(5, 0.0);
  if (labels.scalar_type() == at::kLong) {
    label_summary<int64_t>(labels, k, out);
  } else {
    label_summary<int32_t>(labels, k, out);
  }
  int64_t bad = 0;
  for (const at::Tensor& t : tensors) {
    const uint64_t mask = exponent_mask(t.scalar_type());
    switch (t.element_size()) {
      case 2: bad += count_nonfinite<uint16_t>(t, uint16_t(mask)); break;
      case 4: bad += count_nonfinite<uint32_t>(t, uint32_t(mask)); break;
      default: bad += count_nonfinite<uint64_t>(t, mask); break;
    }
  }
  out[3] = double(bad);
  if (tau.has_value()) out[4] = tau->reshape({1}).to(at::kDouble).contiguous().data_ptr<double>()[0];
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(copa_fast, CPU, m) { m.impl("value_summary", &value_summary_cpu); }

// Not differentiable, returns no tensor: autograd passes straight through to the device kernel.
TORCH_LIBRARY_IMPL(copa_fast, Autograd, m) { m.impl("value_summary", torch::CppFunction::makeFallthrough()); }

}  // namespace copa_fast
