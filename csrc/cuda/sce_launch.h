// Host-side launchers of the CUDA kernels (sce_kernels.cu): raw pointers and a stream, no ATen.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "sce_problem.h"

namespace copa_fast {
namespace cuda {

// The split products of one problem on this device (plan_splits over its co-resident blocks): the
// caller allocates Spart / dqpart of that size and sets ksplit_s / ksplit_q before launch_single.
template <typename T>
SingleSplits plan_single(int n, int c, int d);

// One problem in one cooperative launch: as many blocks as the device holds at once (at most as
// many as there are work items), grid-wide barriers between the phases.
template <typename T>
cudaError_t launch_single(const SceProblem<T>& problem, cudaStream_t stream);

// Problems with at least this many scores (N x C) take the phased path (csrc/cuda/binding.cpp):
// the products S = zn qn^T, G qn and G^T zn by the vendor GEMM, the other phases by launch_phase.
constexpr long kPhasedMinScores = 1L << 22;
// Blocks of a one-phase launch at most (items beyond them are taken round-robin).
constexpr long kMaxPhaseBlocks = 1L << 15;

// One phase (1: norms and counts, 3: statistics, 4: losses and G, 6: normalisation backward and
// totals) of one problem in an ordinary launch; see copa_sce_phase. Stream order stands in for the
// grid barriers of launch_single.
template <typename T>
cudaError_t launch_phase(const SceProblem<T>& problem, int phase, cudaStream_t stream);

// E episodes in one launch, one block each (s_total: the entries of stacked.S); see copa_sce_episodes.
template <typename T>
cudaError_t launch_episodes(const SceProblem<T>& stacked, const int64_t* rows, const int64_t* cls,
                            const int64_t* s_off, long s_total, int episodes, cudaStream_t stream);

// Class means p0 (C x D) of the N x D rows pf by (clamped) labels y; see copa_class_means.
template <typename T>
cudaError_t launch_class_means(const T* pf, const int64_t* y, int n, int c, int d, T* p0, cudaStream_t stream);

// The value checks' summary (see copa_label_summary): counts of non-finite entries of each checked
// tensor (2-D, strides in elements; U the float's width as an unsigned integer, exp_mask its exponent
// bits) into `partial` (summary_parts() slots per tensor, written in full), then one block over the
// labels writing out[5]; `seen` must hold k zeros.
int summary_parts(long numel);
template <typename U>
cudaError_t launch_count_nonfinite(const U* x, long rows, long cols, long s0, long s1, U exp_mask, int64_t* partial,
                                   cudaStream_t stream);
template <typename L>
cudaError_t launch_label_summary(const L* y, long n, long k, int* seen, const int64_t* partial, int parts,
                                 const double* tau, double* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace copa_fast
