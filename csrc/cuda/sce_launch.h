// Host-side launchers of the CUDA kernels (sce_kernels.cu): raw pointers and a stream, no ATen.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "sce_problem.h"

namespace copa_fast {
namespace cuda {

// One problem in one cooperative launch: as many blocks as the device holds at once (at most as
// many as there are work items), grid-wide barriers between the phases.
template <typename T>
cudaError_t launch_single(const SceProblem<T>& problem, cudaStream_t stream);

// E episodes in one launch, one block each; see copa_sce_episodes.
template <typename T>
cudaError_t launch_episodes(const SceProblem<T>& stacked, const int64_t* rows, const int64_t* cls,
                            const int64_t* s_off, int episodes, cudaStream_t stream);

}  // namespace cuda
}  // namespace copa_fast
