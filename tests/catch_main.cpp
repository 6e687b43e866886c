// Catch2's main, compiled with the tests where Debian's prebuilt libCatch2WithMain.a (built for
// the host) cannot be linked: cross builds (cmake/aarch64-linux-gnu.cmake).
#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
int main(int argc, char* argv[]) { return Catch::Session().run(argc, argv); }
#else
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
