// Host driver of tests/test_row_kernels_host.py: the CPU row kernels' exp (csrc/cpu/row_kernels.inc)
// against long double expl, over float and double inputs from far below underflow to past
// overflow, the specials included, in every copy this CPU runs (baseline, AVX2, AVX-512), which
// must agree bit for bit. Prints one line a dtype; exits 1 on the first failed check.
// Built with the extension's own flags: g++ -std=c++17 <setup.py's cxx flags> -I csrc/cpu.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "row_kernel_copies.h"

namespace {

template <typename T>
struct Copy {
  const char* name;
  void (*fn)(T*, int64_t);
};

template <typename T>
std::vector<Copy<T>> copies() {
  std::vector<Copy<T>> out{{"baseline", &rows_baseline::exp_inplace<T>}};
#ifdef COPA_FAST_ROW_ISA_COPIES
  const int widest = widest_row_copy();
  if (widest >= 1) out.push_back({"avx2", &rows_avx2::exp_inplace<T>});
  if (widest >= 2) out.push_back({"avx512", &rows_avx512::exp_inplace<T>});
#endif
  return out;
}

// Inputs: n uniform draws over [lo, hi] and the specials; an odd count, so the vector loops' tails run.
template <typename T>
std::vector<T> inputs(double lo, double hi, size_t n, const std::vector<double>& specials) {
  std::mt19937_64 gen(12345);
  std::vector<T> x;
  for (size_t k = 0; k < n; ++k) x.push_back(T(lo + (hi - lo) * (double(gen() >> 11) * 0x1p-53)));
  for (double s : specials) x.push_back(T(s));
  if (x.size() % 2 == 0) x.push_back(T(-1.5));
  return x;
}

// The error of `got` against the exact e^x in units of T's spacing at the correctly rounded value
// (the smallest subnormal's spacing where that is 0; where it overflows, any value above T's largest
// finite one counts as exact).
template <typename T>
long double ulp_error(T x, T got) {
  const long double exact = expl((long double)x);
  const T rounded = T(exact);
  if (std::isinf(rounded)) return got >= std::numeric_limits<T>::max() ? 0.0L : 1e30L;
  const T up = std::nextafter(rounded, std::numeric_limits<T>::infinity());
  return fabsl((long double)got - exact) / ((long double)up - (long double)rounded);
}

template <typename T>
int check(const char* dtype, const std::vector<T>& x, long double max_ulp) {
  const std::vector<Copy<T>> all = copies<T>();
  std::vector<std::vector<T>> outs;
  for (const Copy<T>& c : all) {
    std::vector<T> y = x;
    c.fn(y.data(), int64_t(y.size()));
    outs.push_back(y);
  }
  long double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const T got = outs[0][i];
    for (size_t k = 1; k < outs.size(); ++k)
      if (std::memcmp(&got, &outs[k][i], sizeof(T)) != 0) {
        std::printf("FAIL %s: exp(%a) is %a in the baseline copy, %a in the %s copy\n", dtype, double(x[i]),
                    double(got), double(outs[k][i]), all[k].name);
        return 1;
      }
    if (std::isnan(x[i])) {
      if (!std::isnan(got)) {
        std::printf("FAIL %s: exp(nan) is %a\n", dtype, double(got));
        return 1;
      }
      continue;
    }
    const long double e = ulp_error<T>(x[i], got);
    if (e > max_ulp) {
      std::printf("FAIL %s: exp(%a) is %a, %.3Lf ulp from exact (at most %.3Lf)\n", dtype, double(x[i]),
                  double(got), e, max_ulp);
      return 1;
    }
    worst = std::max(worst, e);
  }
  std::printf("%s: %zu inputs, max error %.4Lf ulp, %zu copies agree\n", dtype, x.size(), worst, all.size());
  return 0;
}

}  // namespace

int main() {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  // float: [-110, 95] spans e^x = 0 through float's subnormals to inf; double: [-760, 720] likewise
  const std::vector<double> fspecial{0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, -87.33, -87.34, -103.27, -103.28,
                                     -104.0, 88.72, 88.73, 89.0, -80.0, -14.78, inf, -inf, nan};
  const std::vector<double> dspecial{0.0, -0.0, 1e-300, -1e-300, 1.0, -1.0, -708.39, -708.40, -744.44, -745.13,
                                     -745.14, -746.0, -800.0, 709.78, 709.79, 710.0, 1e10, -1e10, -700.0, inf,
                                     -inf, nan};
  // float is evaluated in double and rounded once: correctly rounded but for near-ties
  if (check<float>("float32", inputs<float>(-110.0, 95.0, 1000001, fspecial), 0.51L)) return 1;
  if (check<double>("float64", inputs<double>(-760.0, 720.0, 1000001, dspecial), 1.5L)) return 1;
  return 0;
}
