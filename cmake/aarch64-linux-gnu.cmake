# Cross build for AArch64 with Debian's g++-aarch64-linux-gnu; the tests run under qemu-user
# (Debian's qemu-user-static), which CTest and catch_discover_tests call through
# CMAKE_CROSSCOMPILING_EMULATOR. Used by scripts/test.sh for the NEON target.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64-static -L /usr/aarch64-linux-gnu)
# Header-only dependencies (Eigen, Catch2, nlohmann-json) come from the host's /usr; libraries
# and programs from the cross toolchain.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
