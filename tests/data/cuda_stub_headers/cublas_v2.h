// Stand-in for cuBLAS's cublas_v2.h: see cusparse.h beside it. Never used to build.
#pragma once
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
