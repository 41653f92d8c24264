// Argument checks shared by the CPU kernels and the CUDA binding of copa_fast's ops.
// Every message names the argument, what was expected and what was received.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace copa_fast::detail {

// An error message assembled without iostreams. torch's check macros format their arguments through
// a std::ostringstream compiled into the extension. On the lent H200's image (torch 2.11, the
// extension compiled by the g++ its CXX names, /opt/gcc/bin/g++, GCC 13.3) an integer streamed that
// way kills the process with SIGSEGV instead of raising: seen in every check of ours whose message
// held a number, and in a four-line probe extension (`TORCH_CHECK_VALUE(false, "n: ", int64_t(5))`)
// in a fresh process, where the same check given one std::string raised ValueError. So integers go
// through std::to_string, shapes are written out here, and torch receives one string.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <class... Args>
std::string msg(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace copa_fast::detail

#define CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, ::copa_fast::detail::msg(__VA_ARGS__))
#define CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::copa_fast::detail::msg(__VA_ARGS__))
#define CHECK_RANK(t, r) CHECK_ARG((t).dim() == (r), #t ": expected a ", r, "-D tensor, got ", (t).dim(), "-D")
#define CHECK_FLOATING(t)                                                                   \
  CHECK_TYPE((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,          \
             #t ": expected float32 or float64, got ", (t).scalar_type())
#define CHECK_SAME_DEVICE(t, ref) \
  CHECK_ARG((t).device() == (ref).device(), #t ": expected device ", (ref).device(), ", got ", (t).device())

namespace copa_fast {

// precision: "ieee" (IEEE products) or "tf32" (products may use TF32 tensor cores where the device and
// the path have them; the CPU kernels and the fused CUDA kernel compute IEEE products at either).
inline void check_precision(c10::string_view precision) {
  CHECK_ARG(precision == "ieee" || precision == "tf32", "precision: expected 'ieee' or 'tf32', got '", precision,
            "'");
}

// labels (N,), tau (one element), weights (N,) or None, all on `device`.
inline void check_labels_tau_weights(int64_t n, const at::Device& device, const at::Tensor& labels,
                                     const at::Tensor& tau, const c10::optional<at::Tensor>& weights) {
  CHECK_RANK(labels, 1);
  CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
             "labels: expected int64 or int32, got ", labels.scalar_type());
  CHECK_ARG(labels.size(0) == n, "labels: expected ", n, " entries (rows of z), got ", labels.size(0));
  CHECK_ARG(tau.numel() == 1, "tau: expected one element, got ", tau.numel());
  CHECK_TYPE(at::isFloatingType(tau.scalar_type()), "tau: expected a floating tensor, got ", tau.scalar_type());
  CHECK_ARG(labels.device() == device, "labels: expected device ", device, ", got ", labels.device());
  if (weights.has_value()) {
    CHECK_RANK((*weights), 1);
    CHECK_ARG(weights->size(0) == n, "weights: expected ", n, " entries, got ", weights->size(0));
    CHECK_ARG(weights->device() == device, "weights: expected device ", device, ", got ", weights->device());
  }
}

inline void check_symmetric_ce_args(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels,
                                    const at::Tensor& tau, const c10::optional<at::Tensor>& weights,
                                    c10::string_view precision) {
  CHECK_RANK(z, 2);
  CHECK_RANK(q, 2);
  CHECK_FLOATING(z);
  CHECK_TYPE(q.scalar_type() == z.scalar_type(), "q: expected dtype ", z.scalar_type(), " (as z), got ",
             q.scalar_type());
  CHECK_ARG(z.size(0) >= 1 && z.size(1) >= 1, "z: expected a non-empty (N, D) tensor, got ", z.sizes());
  CHECK_ARG(q.size(0) >= 1, "q: expected at least one class row, got ", q.sizes());
  CHECK_ARG(q.size(1) == z.size(1), "q: expected ", z.size(1), " columns (as z), got ", q.size(1));
  CHECK_SAME_DEVICE(q, z);
  check_labels_tau_weights(z.size(0), z.device(), labels, tau, weights);
  check_precision(precision);
}

// Checks of copa_fast::copa_loss (x, pf (N, D); w_img, w_proto (E, D); labels, tau, weights, precision
// as above).
inline void check_copa_loss_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img,
                                 const at::Tensor& w_proto, const at::Tensor& pf, int64_t num_classes,
                                 const at::Tensor& tau, const c10::optional<at::Tensor>& weights,
                                 c10::string_view precision) {
  CHECK_RANK(x, 2);
  CHECK_RANK(w_img, 2);
  CHECK_RANK(w_proto, 2);
  CHECK_RANK(pf, 2);
  CHECK_FLOATING(x);
  for (const auto* t : {&w_img, &w_proto, &pf}) {
    CHECK_TYPE(t->scalar_type() == x.scalar_type(), "w_img, w_proto, pf: expected dtype ", x.scalar_type(),
               " (as x), got ", t->scalar_type());
    CHECK_SAME_DEVICE((*t), x);
  }
  CHECK_ARG(x.size(0) >= 1, "x: expected at least one row, got ", x.sizes());
  CHECK_ARG(w_img.size(1) == x.size(1), "w_img: expected ", x.size(1), " columns (as x), got ", w_img.sizes());
  CHECK_ARG(w_img.size(0) >= 1, "w_img: expected at least one output row, got ", w_img.sizes());
  CHECK_ARG(w_proto.sizes() == w_img.sizes(), "w_proto: expected shape ", w_img.sizes(), " (as w_img), got ",
            w_proto.sizes());
  CHECK_ARG(pf.sizes() == x.sizes(), "pf: expected shape ", x.sizes(), " (as x), got ", pf.sizes());
  CHECK_ARG(num_classes >= 1, "num_classes: expected >= 1, got ", num_classes);
  check_labels_tau_weights(x.size(0), x.device(), labels, tau, weights);
  check_precision(precision);
}

// Checks of copa_fast::value_summary: labels (N,) int32/int64, k >= 1, each checked tensor of a
// floating dtype with a bit layout the summary knows, all on the labels' device; tau one element.
inline void check_value_summary_args(const at::Tensor& labels, int64_t k, at::TensorList tensors,
                                     const c10::optional<at::Tensor>& tau) {
  CHECK_RANK(labels, 1);
  CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
             "labels: expected int64 or int32, got ", labels.scalar_type());
  CHECK_ARG(k >= 1, "k: expected >= 1, got ", k);
  for (const at::Tensor& t : tensors) {
    const auto st = t.scalar_type();
    CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
               "tensors: expected float16, bfloat16, float32 or float64, got ", st);
    CHECK_ARG(t.device() == labels.device(), "tensors: expected device ", labels.device(), ", got ", t.device());
  }
  if (tau.has_value()) {
    CHECK_ARG(tau->numel() == 1, "tau: expected one element, got ", tau->numel());
    CHECK_TYPE(at::isFloatingType(tau->scalar_type()), "tau: expected a floating tensor, got ", tau->scalar_type());
    CHECK_ARG(tau->device() == labels.device(), "tau: expected device ", labels.device(), ", got ", tau->device());
  }
}

// The exponent bits of a floating dtype (all ones: NaN or +-Inf), as an unsigned integer of its width.
inline uint64_t exponent_mask(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return 0x7C00u;
    case at::kBFloat16: return 0x7F80u;
    case at::kFloat: return 0x7F800000u;
    default: return 0x7FF0000000000000ull;   // float64
  }
}

// Checks of copa_fast::episodes_sce that need no data read. The offsets are data: each kernel checks
// its episodes' own (an episode that does not lie inside the stacked tensors gets a NaN loss and
// touches nothing), without the synchronisation a host check would cost on a GPU.
inline void check_episodes_args(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels,
                                const at::Tensor& rows, const at::Tensor& classes, const at::Tensor& s_off,
                                const at::Tensor& tau) {
  CHECK_RANK(z, 2);
  CHECK_RANK(q, 2);
  CHECK_FLOATING(z);
  CHECK_TYPE(q.scalar_type() == z.scalar_type(), "q: expected dtype ", z.scalar_type(), " (as z), got ",
             q.scalar_type());
  CHECK_ARG(q.size(1) == z.size(1), "q: expected ", z.size(1), " columns (as z), got ", q.size(1));
  CHECK_TYPE(labels.scalar_type() == at::kLong, "labels: expected int64, got ", labels.scalar_type());
  CHECK_ARG(labels.dim() == 1 && labels.size(0) == z.size(0), "labels: expected ", z.size(0), " entries, got ",
            labels.sizes());
  CHECK_ARG(rows.dim() == 2 && rows.size(1) == 2 && rows.scalar_type() == at::kLong,
            "rows: expected an (E, 2) int64 tensor, got ", rows.sizes(), " ", rows.scalar_type());
  CHECK_ARG(classes.sizes() == rows.sizes() && classes.scalar_type() == at::kLong,
            "classes: expected an (E, 2) int64 tensor as rows, got ", classes.sizes());
  CHECK_ARG(s_off.dim() == 1 && s_off.size(0) == rows.size(0) && s_off.scalar_type() == at::kLong,
            "s_off: expected (E,) int64, got ", s_off.sizes());
  CHECK_ARG(tau.dim() == 1 && tau.size(0) == rows.size(0), "tau: expected (E,), got ", tau.sizes());
  CHECK_SAME_DEVICE(q, z);
  CHECK_SAME_DEVICE(labels, z);
  CHECK_SAME_DEVICE(rows, z);
  CHECK_SAME_DEVICE(classes, z);
  CHECK_SAME_DEVICE(s_off, z);
  CHECK_SAME_DEVICE(tau, z);
}

}  // namespace copa_fast
