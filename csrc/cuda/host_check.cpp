// Runs the CUDA kernels of sce_kernels.cuh on the host (simt_host.h) for the tests: reads one
// problem from a binary file, launches copa_sce_single (a cooperative grid of `blocks` blocks),
// copa_sce_episodes (one block per episode), the phased path (copa_sce_phase, `blocks` blocks a
// phase, the products on the host) or copa_class_means, writes the outputs. Every buffer is its own
// heap allocation of the exact size, so AddressSanitizer flags any out-of-bounds access (or, asked for,
// the scratch is carved out of one workspace as the binding has it).
//
// Input (native endianness): int64 header [dtype_bytes, mode (0 single, 1 episodes, 2 phased, 3 class
// means), R, K, d, fused, has_w, blocks, E, s_total, in_place (zn written over z, as binding.cpp's
// copa_loss op has it), ksplit_s, ksplit_q (the single kernel's split products; 1: none), carved (the scratch
// in one workspace laid out as the binding lays it out, workspace_layout, instead of one allocation a buffer)],
// then z (R*d), q (K*d) in dtype, y (R) int64, w (R, if has_w) and tau (E) in dtype, then for episodes rows
// (2E), cls (2E), s_off (E) int64.
// Output: loss (E), dtau (E), losses (R) in dtype, pred (R) int64, dz (R*d), dq (K*d) in dtype; for class
// means p0 (K*d) in dtype. Mode 4 runs nothing: the split products plan_splits gives R x K x d on
// `blocks` co-resident blocks, as two int64 (ksplit_s, ksplit_q). Mode 5: the value checks' summary
// kernels (run_summary below). Mode 6 runs nothing: workspace_layout(R, K, d, s_total, zn_separate = h[10],
// spart = h[11], dqpart = h[12], lpart = h[13]) as 15 int64 (the offsets in field order, then total).
#define COPA_SIMT_HOST 1
#include "sce_kernels.cuh"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

namespace {

// The phased path of csrc/cuda/binding.cpp (large problems): the one-phase kernel for phases 1, 7 and 8
// (P3), 4 and 6 over `blocks` blocks, and its three products — there the vendor GEMM's — computed here on
// the host, in the same arrangement: S = zn (e^tau qn)^T, dz = G (e^tau qn), dq = e^tau G^T zn.
template <typename T>
void run_phased(const copa_fast::cuda::SceProblem<T>& problem, int blocks) {
  using copa_fast::cuda::copa_sce_phase;
  copa_fast::cuda::SceProblem<T> p = problem;   // with the column tiles' pairs, exactly sized (unless carved)
  p.col_ranges = copa_fast::cuda::range_count(p.n);
  std::vector<T> lpart(p.Lpart ? 0 : 2L * p.col_ranges * p.c);
  if (!p.Lpart) p.Lpart = lpart.data();
  auto phase = [&](int ph) {
    // phase 7 (P3 of the phased path): `blocks` for the rows, then one block a column tile
    const int grid = ph == 7 ? blocks + copa_fast::cuda::tile_blocks(p.n, p.c) : blocks;
    simt::launch(grid, copa_fast::cuda::kThreads, [&] { copa_sce_phase<T>(p, ph); });
  };
  const long n = p.n, c = p.c, d = p.d;
  phase(1);
  const T scale = std::exp(p.tau[0]);
  std::vector<T> qs(c * d);
  for (long k = 0; k < c * d; ++k) qs[k] = p.qn[k] * scale;
  for (long i = 0; i < n; ++i)
    for (long j = 0; j < c; ++j) {
      T acc = T(0);
      for (long k = 0; k < d; ++k) acc += p.zn[i * d + k] * qs[j * d + k];
      p.S[i * c + j] = acc;
    }
  phase(7);
  phase(8);
  phase(4);
  if (p.fused) {
    for (long i = 0; i < n; ++i)
      for (long k = 0; k < d; ++k) {
        T acc = T(0);
        for (long j = 0; j < c; ++j) acc += p.S[i * c + j] * qs[j * d + k];
        p.dz[i * d + k] = acc;
      }
    for (long j = 0; j < c; ++j)
      for (long k = 0; k < d; ++k) {
        T acc = T(0);
        for (long i = 0; i < n; ++i) acc += p.S[i * c + j] * p.zn[i * d + k];
        p.dq[j * d + k] = acc * scale;
      }
  }
  phase(6);
}

template <typename V>
std::vector<V> read(FILE* f, size_t count) {
  std::vector<V> v(count);
  if (count && fread(v.data(), sizeof(V), count, f) != count) {
    fprintf(stderr, "host_check: short input\n");
    exit(2);
  }
  return v;
}

template <typename V>
void write(FILE* f, const std::vector<V>& v) {
  if (!v.empty()) fwrite(v.data(), sizeof(V), v.size(), f);
}

template <typename T>
int run(FILE* in, FILE* out, const int64_t* h) {
  using copa_fast::cuda::SceProblem;
  const int64_t mode = h[1], R = h[2], K = h[3], d = h[4], fused = h[5], has_w = h[6], blocks = h[7], E = h[8],
                s_total = h[9], in_place = h[10], ksplit_s = h[11], ksplit_q = h[12], carved = h[13];
  if (mode == 6) {
    const copa_fast::cuda::Workspace w =
        copa_fast::cuda::workspace_layout(R, K, d, s_total, h[10] != 0, h[11], h[12], h[13]);
    write(out, std::vector<int64_t>{w.zn, w.qn, w.znorm, w.qnorm, w.cnt, w.wsum, w.S, w.R, w.L, w.row_dtau, w.wloss,
                                    w.Spart, w.dqpart, w.Lpart, w.total});
    return 0;
  }
  if (mode == 4) {
    const copa_fast::cuda::SingleSplits k = copa_fast::cuda::plan_splits(R, K, d, blocks);
    write(out, std::vector<int64_t>{k.scores, k.dq});
    return 0;
  }
  auto z = read<T>(in, R * d), q = read<T>(in, K * d);
  auto y = read<int64_t>(in, R);
  auto w = has_w ? read<T>(in, R) : std::vector<T>();
  auto tau = read<T>(in, E);
  std::vector<int64_t> rows, cls, s_off;
  if (mode == 1) {
    rows = read<int64_t>(in, 2 * E);
    cls = read<int64_t>(in, 2 * E);
    s_off = read<int64_t>(in, E);
  }
  if (mode == 3) {   // class means of the rows z by the labels y into K classes
    std::vector<T> p0(K * d);
    simt::launch((int)blocks, copa_fast::cuda::kThreads,
                 [&] { copa_fast::cuda::copa_class_means<T>(z.data(), y.data(), (int)R, (int)K, (int)d, p0.data()); });
    write(out, p0);
    return 0;
  }
  std::vector<T> losses(R, T(0)), dz(fused ? R * d : 0, T(0)), dq(fused ? K * d : 0, T(0)), loss(E), dtau(E, T(0));
  std::vector<int64_t> pred(R, 0);
  const bool split_s = mode == 0 && ksplit_s > 1, split_q = mode == 0 && fused && ksplit_q > 1;
  const long s_entries = mode == 1 ? s_total : R * K;
  // The scratch: each buffer its own exact-size allocation (out-of-bounds accesses reach ASan), or, carved,
  // the binding's one workspace laid out by workspace_layout, filled with NaN as uninitialised memory stands in
  const auto own = [carved](long count) { return carved ? 0 : count; };   // carved: none of their own
  std::vector<T> zn(own(in_place ? 0 : R * d)), qn(own(K * d)), znorm(own(R)), qnorm(own(K)), cnt(own(K)),
      wsum(own(K)), S(own(s_entries)), Rr(own(2 * R)), L(own(2 * K)), row_dtau(own(R)), wloss(own(R)),
      Spart(own(split_s ? ksplit_s * R * K : 0)), dqpart(own(split_q ? ksplit_q * K * d : 0)), ws;
  SceProblem<T> p{z.data(), q.data(), y.data(), has_w ? w.data() : nullptr, tau.data(), (int)R, (int)K, (int)d,
                  fused != 0, in_place ? z.data() : zn.data(), qn.data(), znorm.data(), qnorm.data(), cnt.data(),
                  wsum.data(), S.data(), Rr.data(), L.data(), row_dtau.data(), wloss.data(), losses.data(), pred.data(),
                  fused ? dz.data() : nullptr, fused ? dq.data() : nullptr, loss.data(), dtau.data(),
                  split_s ? (int)ksplit_s : 1, split_q ? (int)ksplit_q : 1,
                  split_s ? Spart.data() : nullptr, split_q ? dqpart.data() : nullptr};
  if (carved) {
    const long lpart = mode == 2 ? 2L * copa_fast::cuda::range_count((int)R) * K : 0;
    const copa_fast::cuda::Workspace layout = copa_fast::cuda::workspace_layout(
        R, K, d, s_entries, !in_place, split_s ? ksplit_s * R * K : 0, split_q ? ksplit_q * K * d : 0, lpart);
    ws.assign(layout.total, std::numeric_limits<T>::quiet_NaN());
    copa_fast::cuda::place_workspace<T>(p, ws.data(), layout);
  }
  if (mode == 0) {
    simt::launch((int)blocks, copa_fast::cuda::kThreads, [&] { copa_fast::cuda::copa_sce_single<T>(p); });
  } else if (mode == 2) {
    run_phased<T>(p, (int)blocks);
  } else {
    simt::launch((int)E, copa_fast::cuda::kThreads, [&] {
      copa_fast::cuda::copa_sce_episodes<T>(p, rows.data(), cls.data(), s_off.data(), (long)s_total, tau.data());
    });
  }
  write(out, loss);
  write(out, dtau);
  write(out, losses);
  write(out, pred);
  write(out, dz);
  write(out, dq);
  return 0;
}

// Mode 5, the value checks' summary: header [elem_bytes (2, 4, 8), 5, R, k, d, exponent mask,
// int32 labels, blocks of the counting launch, has_tau, 0, transposed, 0, 0, 0], then the R x d
// values as raw bits (transposed: the d x R buffer viewed as R x d), R labels (int64 or int32),
// tau (one double, if has_tau). Output: the 5 doubles of copa_label_summary.
template <typename U>
int run_summary(FILE* in, FILE* out, const int64_t* h) {
  const int64_t R = h[2], k = h[3], d = h[4], int32_labels = h[6], blocks = h[7], has_tau = h[8], transposed = h[10];
  const U mask = static_cast<U>(h[5]);
  auto x = read<U>(in, R * d);
  std::vector<int64_t> y64;
  std::vector<int32_t> y32;
  if (int32_labels) {
    y32 = read<int32_t>(in, R);
  } else {
    y64 = read<int64_t>(in, R);
  }
  auto tau = read<double>(in, has_tau ? 1 : 0);
  const long s0 = transposed ? 1 : d, s1 = transposed ? R : 1;
  std::vector<int64_t> partial(blocks, -1);   // every slot written by its block
  simt::launch((int)blocks, copa_fast::cuda::kThreads,
               [&] { copa_fast::cuda::copa_count_nonfinite<U>(x.data(), R, d, s0, s1, mask, partial.data()); });
  std::vector<int> seen(k, 0);
  std::vector<double> res(5);
  const double* tau_p = has_tau ? tau.data() : nullptr;
  simt::launch(1, copa_fast::cuda::kThreads, [&] {
    if (int32_labels) {
      copa_fast::cuda::copa_label_summary<int32_t>(y32.data(), R, k, seen.data(), partial.data(), (int)blocks, tau_p,
                                                   res.data());
    } else {
      copa_fast::cuda::copa_label_summary<int64_t>(y64.data(), R, k, seen.data(), partial.data(), (int)blocks, tau_p,
                                                   res.data());
    }
  });
  write(out, res);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: host_check INPUT OUTPUT\n");
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) {
    fprintf(stderr, "host_check: cannot open files\n");
    return 2;
  }
  auto h = read<int64_t>(in, 14);
  int rc = 0;
  if (h[1] == 5) {
    rc = h[0] == 2 ? run_summary<uint16_t>(in, out, h.data())
                   : (h[0] == 4 ? run_summary<uint32_t>(in, out, h.data()) : run_summary<uint64_t>(in, out, h.data()));
  } else {
    rc = h[0] == 8 ? run<double>(in, out, h.data()) : run<float>(in, out, h.data());
  }
  fclose(in);
  fclose(out);
  return rc;
}
