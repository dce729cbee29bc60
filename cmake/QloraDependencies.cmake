# Finds qlora's dependencies. Each one comes from a Debian package; a missing one stops the
# configure step with the package to install.

# Fails with the apt-get command that installs `package` when `found` is false.
function(qlora_require found name package)
  if(NOT ${found})
    message(FATAL_ERROR
      "qlora: ${name} was not found. Install it with:\n"
      "  sudo apt-get install ${package}\n"
      "or run scripts/setup, which installs every dependency.")
  endif()
endfunction()

find_package(Eigen3 3.4 QUIET NO_MODULE)
qlora_require(Eigen3_FOUND "Eigen 3.4" libeigen3-dev)

find_package(fmt QUIET)
qlora_require(fmt_FOUND "fmt" libfmt-dev)

find_package(OpenMP QUIET COMPONENTS CXX)
qlora_require(OpenMP_CXX_FOUND "OpenMP for C++" "libomp-dev (clang) or g++ (GCC ships libgomp)")

find_package(nlohmann_json 3.10 QUIET)
qlora_require(nlohmann_json_FOUND "nlohmann-json" nlohmann-json3-dev)

find_package(CLI11 QUIET)
qlora_require(CLI11_FOUND "CLI11" libcli11-dev)

if(QLORA_BUILD_TESTS)
  find_package(GTest QUIET)
  qlora_require(GTest_FOUND "GoogleTest" "libgtest-dev libgmock-dev")
endif()

if(QLORA_BUILD_BENCHMARKS)
  find_package(benchmark QUIET)
  qlora_require(benchmark_FOUND "Google Benchmark" libbenchmark-dev)
  # OpenBLAS is the fp32 GEMM reference that the kernel benchmarks measure against.
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS QUIET)
  qlora_require(BLAS_FOUND "OpenBLAS" libopenblas-dev)
  find_path(QLORA_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas openblas-pthread)
  qlora_require(QLORA_CBLAS_INCLUDE_DIR "cblas.h (OpenBLAS)" libopenblas-dev)
endif()

if(QLORA_WITH_MPI)
  find_package(MPI QUIET COMPONENTS CXX)
  qlora_require(MPI_CXX_FOUND "MPI for C++" "libopenmpi-dev openmpi-bin")
endif()
