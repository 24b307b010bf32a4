// Stand-in for cuBLAS's cublasLt.h: see cusparse.h beside it. Never used to build.
#pragma once
#include <cublas_v2.h>
typedef struct cublasLtContext* cublasLtHandle_t;
