#pragma once
// attnkit version macros. Kept equal to project(VERSION) in CMakeLists.txt (checked by a test).
#define ATTNKIT_VERSION_MAJOR 0
#define ATTNKIT_VERSION_MINOR 1
#define ATTNKIT_VERSION_PATCH 0
#define ATTNKIT_VERSION \
  (ATTNKIT_VERSION_MAJOR * 10000 + ATTNKIT_VERSION_MINOR * 100 + ATTNKIT_VERSION_PATCH)
#define ATTNKIT_VERSION_AT_LEAST(x, y, z) (ATTNKIT_VERSION >= ((x)*10000 + (y)*100 + (z)))
#define ATTNKIT_VERSION_STRING "0.1.0"

// Feature macros. ATTNKIT_HAS_AVX512: the includer compiles with AVX-512 enabled (-march); the
// kernels do not need it (they run on the best target the CPU has, core/cpu.hpp).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ATTNKIT_HAS_AVX512 1
#else
#define ATTNKIT_HAS_AVX512 0
#endif
