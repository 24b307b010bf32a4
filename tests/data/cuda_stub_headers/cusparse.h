// Stand-in for CUDA's cusparse.h (not in the CPU torch wheel, not in a bare CUDA toolkit): only
// what torch's ATen/cuda headers name, so that csrc/bindings.cpp can be syntax-checked in its
// real CUDA form on a machine without cuSPARSE (tests/test_cuda_build.py). Never used to build.
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;
const char* cusparseGetErrorString(cusparseStatus_t status);
