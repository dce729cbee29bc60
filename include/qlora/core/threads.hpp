// The number of threads that qlora's kernels use.
//
// Kernels split work over OpenMP threads with a fixed partition and summation order, so
// results do not depend on the thread count. The count is process-wide.
#pragma once

namespace qlora {

/// Sets the number of threads for qlora's parallel kernels; 0 restores the default, which is
/// OpenMP's (OMP_NUM_THREADS, else the number of cores). Throws qlora::InvalidArgument for a
/// negative count.
void set_num_threads(int n_threads);

/// Returns the number of threads the next parallel kernel will use (at least 1).
int num_threads();

}  // namespace qlora
