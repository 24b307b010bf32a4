// Stand-in for cuSOLVER's cusolverDn.h: see cusparse.h beside it. Never used to build.
#pragma once
#include <cusolver_common.h>
typedef struct cusolverDnContext* cusolverDnHandle_t;
