// Stand-in for the header a CUDA build of torch generates (the CPU wheel lacks it): see
// cusparse.h beside it. Never used to build.
#pragma once
