// Instantiation and launch of the kernels of sce_kernels.cuh. Raw pointers and a stream only: this
// file compiles with plain nvcc (CMakeLists.txt), without torch.
#include "sce_kernels.cuh"
#include "sce_launch.h"

namespace copa_fast {
namespace cuda {

namespace {

template <typename T>
int co_resident_blocks() {
  // cached per device: the occupancy of the kernel does not change during a run
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  if (cache[dev] == 0) {
    int sms = 0, per_sm = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, copa_sce_single<T>, kThreads, 0);
    cache[dev] = per_sm * sms > 0 ? per_sm * sms : 1;
  }
  return cache[dev];
}

}  // namespace

template <typename T>
SingleSplits plan_single(int n, int c, int d) {
  return plan_splits(n, c, d, co_resident_blocks<T>());
}

template <typename T>
cudaError_t launch_single(const SceProblem<T>& problem, cudaStream_t stream) {
  const long ti = (problem.n + kTile - 1) / kTile, tc = (problem.c + kTile - 1) / kTile;
  const long td = (problem.d + kTile - 1) / kTile;
  const long ks = problem.ksplit_s > 1 ? problem.ksplit_s : 1, kq = problem.ksplit_q > 1 ? problem.ksplit_q : 1;
  // the widest phase bounds the useful number of blocks: rows go kWarps to a block, tiles one
  long items = (problem.n + 2L * problem.c + kWarps - 1) / kWarps;
  if (ti * tc * ks > items) items = ti * tc * ks;
  if (ti * td + tc * td * kq > items) items = ti * td + tc * td * kq;
  const long fit = co_resident_blocks<T>();
  const int blocks = (int)(items < fit ? items : fit);
  SceProblem<T> p = problem;
  void* args[] = {&p};
  return cudaLaunchCooperativeKernel((const void*)copa_sce_single<T>, dim3(blocks), dim3(kThreads), args, 0, stream);
}

template <typename T>
cudaError_t launch_episodes(const SceProblem<T>& stacked, const int64_t* rows, const int64_t* cls,
                            const int64_t* s_off, long s_total, int episodes, cudaStream_t stream) {
  if (episodes <= 0) return cudaSuccess;
  copa_sce_episodes<T><<<episodes, kThreads, 0, stream>>>(stacked, rows, cls, s_off, s_total, stacked.tau);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_phase(const SceProblem<T>& problem, int phase, cudaStream_t stream) {
  const long need = (phase_items(phase, problem.n, problem.c, problem.fused) + kWarps - 1) / kWarps;
  int blocks = (int)(need < kMaxPhaseBlocks ? need : kMaxPhaseBlocks);   // the rest round-robin
  if (phase == 7) blocks += tile_blocks(problem.n, problem.c);   // the column tiles' blocks follow the rows'
  if (blocks < 1) blocks = 1;
  copa_sce_phase<T><<<blocks, kThreads, 0, stream>>>(problem, phase);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_class_means(const T* pf, const int64_t* y, int n, int c, int d, T* p0, cudaStream_t stream) {
  if (c <= 0) return cudaSuccess;
  const int blocks = c < kMaxPhaseBlocks ? c : (int)kMaxPhaseBlocks;   // the rest round-robin
  copa_class_means<T><<<blocks, kThreads, 0, stream>>>(pf, y, n, c, d, p0);
  return cudaGetLastError();
}

int summary_parts(long numel) {
  const long blocks = (numel + kThreads * 8L - 1) / (kThreads * 8L);   // ~8 values a thread
  return (int)(blocks < 1 ? 1 : (blocks > 256 ? 256 : blocks));
}

template <typename U>
cudaError_t launch_count_nonfinite(const U* x, long rows, long cols, long s0, long s1, U exp_mask, int64_t* partial,
                                   cudaStream_t stream) {
  copa_count_nonfinite<U><<<summary_parts(rows * cols), kThreads, 0, stream>>>(x, rows, cols, s0, s1, exp_mask,
                                                                               partial);
  return cudaGetLastError();
}

template <typename L>
cudaError_t launch_label_summary(const L* y, long n, long k, int* seen, const int64_t* partial, int parts,
                                 const double* tau, double* out, cudaStream_t stream) {
  copa_label_summary<L><<<1, kThreads, 0, stream>>>(y, n, k, seen, partial, parts, tau, out);
  return cudaGetLastError();
}

template cudaError_t launch_count_nonfinite<uint16_t>(const uint16_t*, long, long, long, long, uint16_t, int64_t*,
                                                      cudaStream_t);
template cudaError_t launch_count_nonfinite<uint32_t>(const uint32_t*, long, long, long, long, uint32_t, int64_t*,
                                                      cudaStream_t);
template cudaError_t launch_count_nonfinite<uint64_t>(const uint64_t*, long, long, long, long, uint64_t, int64_t*,
                                                      cudaStream_t);
template cudaError_t launch_label_summary<int32_t>(const int32_t*, long, long, int*, const int64_t*, int,
                                                   const double*, double*, cudaStream_t);
template cudaError_t launch_label_summary<int64_t>(const int64_t*, long, long, int*, const int64_t*, int,
                                                   const double*, double*, cudaStream_t);
template SingleSplits plan_single<float>(int, int, int);
template SingleSplits plan_single<double>(int, int, int);
template cudaError_t launch_single<float>(const SceProblem<float>&, cudaStream_t);
template cudaError_t launch_single<double>(const SceProblem<double>&, cudaStream_t);
template cudaError_t launch_phase<float>(const SceProblem<float>&, int, cudaStream_t);
template cudaError_t launch_phase<double>(const SceProblem<double>&, int, cudaStream_t);
template cudaError_t launch_episodes<float>(const SceProblem<float>&, const int64_t*, const int64_t*,
                                            const int64_t*, long, int, cudaStream_t);
template cudaError_t launch_class_means<float>(const float*, const int64_t*, int, int, int, float*, cudaStream_t);
template cudaError_t launch_class_means<double>(const double*, const int64_t*, int, int, int, double*, cudaStream_t);
template cudaError_t launch_episodes<double>(const SceProblem<double>&, const int64_t*, const int64_t*,
                                             const int64_t*, long, int, cudaStream_t);

}  // namespace cuda
}  // namespace copa_fast
