// Stand-in for cuSOLVER's cusolver_common.h: see cusparse.h beside it. Never used to build.
#pragma once
typedef enum {
  CUSOLVER_STATUS_SUCCESS = 0,
  CUSOLVER_STATUS_INVALID_VALUE = 3
} cusolverStatus_t;
