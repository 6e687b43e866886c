#pragma once
// The instruction sets attnkit's kernels are compiled for, what the running CPU supports, and the
// one that runs. Every includer's translation unit compiles the micro-kernels once per target of
// its architecture (simd/targets.hpp), with no -march flag needed; the first kernel call picks the
// best target the CPU supports, or the one named by the environment variable ATTNKIT_TARGET
// (scalar, avx2, avx512, neon; "best" or unset: automatic). set_target() forces one from code
// (tests, benchmarks); it must not run while kernels run on other threads.
//
// Defining ATTNKIT_SCALAR_ONLY before the first attnkit include compiles the scalar target alone:
// no vector kernels and no CPU detection, so much less code to compile (a sanitizer or debug
// build, or a compiler whose target attributes misbehave). Defining ATTNKIT_STATIC_TARGET_ONLY
// instead compiles only the best target the compiler's own flags enable (-march=native on a
// Zen 4: avx512, with the bf16 engines; on AArch64: neon; without such flags: scalar), as
// Highway's HWY_COMPILE_ONLY_STATIC does: for a program built for the machine it runs on, the
// same kernels with no other target to compile. Every translation unit of a program must agree
// on both.
#include <array>
#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "error.hpp"

// ATTNKIT_X86_TARGETS: x86-64 with a compiler that takes per-function target attributes (CPU
// detection, the bf16 engines' feature bits).
#if !defined(ATTNKIT_SCALAR_ONLY) && (defined(__x86_64__) || defined(_M_X64)) && \
    (defined(__GNUC__) || defined(__clang__))
#define ATTNKIT_X86_TARGETS 1
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define ATTNKIT_X86_TARGETS 0
#endif
#if !defined(ATTNKIT_SCALAR_ONLY) && defined(__aarch64__) && defined(__ARM_NEON)
#define ATTNKIT_NEON_TARGET 1
#else
#define ATTNKIT_NEON_TARGET 0
#endif
// The x86 targets compiled: each one, or (ATTNKIT_STATIC_TARGET_ONLY) the best the flags enable.
#if ATTNKIT_X86_TARGETS && !defined(ATTNKIT_STATIC_TARGET_ONLY)
#define ATTNKIT_AVX512_TARGET 1
#define ATTNKIT_AVX2_TARGET 1
#elif ATTNKIT_X86_TARGETS && defined(__AVX512F__) && defined(__AVX512BW__) &&                  \
    defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__AVX2__) && defined(__FMA__) && \
    defined(__F16C__)
#define ATTNKIT_AVX512_TARGET 1
#define ATTNKIT_AVX2_TARGET 0
#elif ATTNKIT_X86_TARGETS && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ATTNKIT_AVX512_TARGET 0
#define ATTNKIT_AVX2_TARGET 1
#else
#define ATTNKIT_AVX512_TARGET 0
#define ATTNKIT_AVX2_TARGET 0
#endif
// The scalar target: always, except where ATTNKIT_STATIC_TARGET_ONLY has a vector one.
#if defined(ATTNKIT_STATIC_TARGET_ONLY) && \
    (ATTNKIT_AVX512_TARGET || ATTNKIT_AVX2_TARGET || ATTNKIT_NEON_TARGET)
#define ATTNKIT_SCALAR_TARGET 0
#else
#define ATTNKIT_SCALAR_TARGET 1
#endif

namespace attnkit {

/// An instruction set the kernels are compiled for.
///   scalar  plain C++ (the compiler's baseline; GEMM tiles through Eigen)
///   avx2    AVX2 + FMA + F16C (x86-64: Haswell / Zen 1 and later)
///   avx512  AVX-512 F/BW/VL (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4/5)
///   neon    Advanced SIMD (every AArch64 CPU)
enum class simd_target { scalar, avx2, avx512, neon };

/// Every target, in dispatch-preference order of their enumerators.
inline constexpr std::array<simd_target, 4> all_simd_targets = {
    simd_target::scalar, simd_target::avx2, simd_target::avx512, simd_target::neon};

/// "scalar", "avx2", "avx512" or "neon".
inline const char* target_name(simd_target t) {
  switch (t) {
    case simd_target::scalar: return "scalar";
    case simd_target::avx2: return "avx2";
    case simd_target::avx512: return "avx512";
    case simd_target::neon: return "neon";
  }
  return "?";
}

/// Whether this build contains kernels for t (the includer's architecture and compiler).
constexpr bool target_compiled(simd_target t) {
  switch (t) {
    case simd_target::scalar:
      return ATTNKIT_SCALAR_TARGET;
    case simd_target::avx2:
      return ATTNKIT_AVX2_TARGET;
    case simd_target::avx512:
      return ATTNKIT_AVX512_TARGET;
    case simd_target::neon: return ATTNKIT_NEON_TARGET;
  }
  return false;
}

namespace detail {

#if ATTNKIT_X86_TARGETS
/// The x86 feature bits the targets need, with the OS's consent to use the wider registers
/// (XCR0: AVX state for ymm, opmask + zmm state for AVX-512).
struct x86_features {
  bool avx2 = false, avx512 = false;
  bool avx512_bf16 = false;  ///< vdpbf16ps / vcvtneps2bf16 (Cooper Lake, Sapphire Rapids, Zen 4/5)
  bool amd = false;          ///< vendor AuthenticAMD
  bool amx_bf16 = false;     ///< AMX tiles with tdpbf16ps, enabled by the OS (XCR0 tile state)
};
inline x86_features detect_x86() {
  x86_features f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  f.amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "Auth" "enti" "cAMD"
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u, zmm_state = (xcr0_lo & 0xE6u) == 0xE6u;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const unsigned leaf7_subleaves = a;
  f.amx_bf16 = (d & (1u << 22)) && (d & (1u << 24)) && (xcr0_lo & 0x60000u) == 0x60000u;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  f.avx2 = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512bw && avx512vl;
  if (f.avx512 && leaf7_subleaves >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
    f.avx512_bf16 = a & (1u << 5);
  return f;
}
#endif

}  // namespace detail

/// Whether the running CPU (and OS) can execute target t.
inline bool cpu_supports(simd_target t) {
  if (!target_compiled(t)) return false;
#if ATTNKIT_X86_TARGETS && !defined(ATTNKIT_STATIC_TARGET_ONLY)
  static const detail::x86_features f = detail::detect_x86();
  if (t == simd_target::avx2) return f.avx2;
  if (t == simd_target::avx512) return f.avx512;
#endif
  // Scalar; NEON is part of every AArch64 CPU; a static target's instructions are the compiler's
  // own (ATTNKIT_STATIC_TARGET_ONLY): the program runs only where the CPU has them.
  return true;
}

namespace detail {
/// vdpbf16ps at twice the f32 FMA rate: AMD's AVX-512 BF16 (Zen 4 and 5: as many vdpbf16ps as
/// FMAs per cycle, two products each). Intel's Sapphire and Emerald Rapids issue one zmm vdpbf16ps
/// per cycle against two FMAs, which made bf16 products a third slower than f32 there
/// (docs/benchmarks.md, "SIMD targets").
inline bool cpu_has_fast_bf16_dot() {
#if ATTNKIT_X86_TARGETS
  static const bool has = [] {
    const x86_features f = detect_x86();
    return f.avx512_bf16 && f.amd;
  }();
  return has;
#else
  return false;
#endif
}

/// vdpbf16ps executes here (AVX-512 BF16), whether or not it beats f32.
inline bool cpu_has_bf16_dot() {
#if ATTNKIT_X86_TARGETS
  static const bool has = detect_x86().avx512_bf16;
  return has;
#else
  return false;
#endif
}

/// AMX-BF16 usable by this process: the CPU has it, and (Linux) the kernel granted the process
/// the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once).
inline bool cpu_has_amx_bf16() {
#if ATTNKIT_X86_TARGETS && defined(__linux__)
  static const bool has = [] {
    const x86_features f = detect_x86();
    // The tiles' operands are packed with AVX-512 BF16 instructions.
    if (!f.amx_bf16 || !f.avx512_bf16) return false;
    constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
  }();
  return has;
#else
  return false;
#endif
}
}  // namespace detail

/// The targets this build has and this CPU runs, slowest first.
inline std::vector<simd_target> supported_targets() {
  std::vector<simd_target> out;
  for (simd_target t : all_simd_targets)
    if (cpu_supports(t)) out.push_back(t);
  return out;
}

/// The fastest target this build has and this CPU runs.
inline simd_target best_target() {
  for (simd_target t : {simd_target::avx512, simd_target::avx2, simd_target::neon})
    if (cpu_supports(t)) return t;
  return simd_target::scalar;
}

/// The target named s ("best" is best_target()); attnkit::invalid_argument naming `what` for an
/// unknown name or one this build or CPU cannot run.
inline simd_target parse_target(std::string_view s, const char* what = "target") {
  if (s == "best") return best_target();
  std::string names;
  for (simd_target t : supported_targets()) names += std::string(names.empty() ? "" : ", ") + target_name(t);
  for (simd_target t : all_simd_targets)
    if (s == target_name(t)) {
      detail::require(
          cpu_supports(t), what, "=", s, ": ",
          target_compiled(t) ? "this CPU does not support it" : "not compiled in this build",
          " (supported here: ", names, ")");
      return t;
    }
  detail::throw_invalid(what, "=", s, ": unknown target (supported here: ", names, ", best)");
}

namespace detail {
/// The running target, -1 until the first kernel call chooses it.
inline std::atomic<int> active_target_slot{-1};

inline simd_target choose_target() {
  const char* env = std::getenv("ATTNKIT_TARGET");
  const simd_target t =
      env && *env ? parse_target(env, "environment variable ATTNKIT_TARGET") : best_target();
  active_target_slot.store(static_cast<int>(t), std::memory_order_relaxed);
  return t;
}
}  // namespace detail

/// The target the kernels run on: chosen on first use (ATTNKIT_TARGET or best_target()).
inline simd_target active_target() {
  const int t = detail::active_target_slot.load(std::memory_order_relaxed);
  return t >= 0 ? static_cast<simd_target>(t) : detail::choose_target();
}

namespace detail {
/// The engine of product_math::bf16 that the environment variable ATTNKIT_BF16_ENGINE forces, so
/// that tests and benchmarks reach each engine the CPU runs: "amx", "dot" (vdpbf16ps, also where
/// it is slower than f32) or "f32"; unset or empty: the fastest (automatic).
enum class bf16_engine { automatic, amx, dot, f32 };
/// The engine named s ("" automatic); attnkit::invalid_argument naming `what` for an unknown
/// name or an engine this CPU lacks.
inline bf16_engine parse_bf16_engine(std::string_view s, const char* what) {
  if (s.empty()) return bf16_engine::automatic;
  if (s == "f32") return bf16_engine::f32;
  if (s == "amx") {
    require(cpu_has_amx_bf16(), what, "=amx: this CPU (or OS) offers no AMX-BF16");
    return bf16_engine::amx;
  }
  require(s == "dot", what, "=", s, ": unknown engine (amx, dot, f32)");
  require(cpu_has_bf16_dot(), what, "=dot: this CPU has no AVX-512 BF16");
  return bf16_engine::dot;
}
inline bf16_engine forced_bf16_engine() {
  static const bf16_engine e = [] {
    const char* env = std::getenv("ATTNKIT_BF16_ENGINE");
    return parse_bf16_engine(env ? env : "", "environment variable ATTNKIT_BF16_ENGINE");
  }();
  return e;
}
/// The engine product_math::bf16 picks by itself on the avx512 target: AMX tiles where the CPU
/// has them, else AVX-512 BF16's vdpbf16ps where it is faster than f32 (cpu_has_fast_bf16_dot),
/// else f32.
inline bf16_engine automatic_bf16_engine() {
  return cpu_has_amx_bf16()        ? bf16_engine::amx
         : cpu_has_fast_bf16_dot() ? bf16_engine::dot
                                   : bf16_engine::f32;
}
/// The engine in use on the avx512 target: the one ATTNKIT_BF16_ENGINE forces, else the automatic.
inline bf16_engine active_bf16_engine() {
  const bf16_engine e = forced_bf16_engine();
  return e == bf16_engine::automatic ? automatic_bf16_engine() : e;
}
inline bool bf16_amx_available() {
  return active_target() == simd_target::avx512 && active_bf16_engine() == bf16_engine::amx;
}
inline bool bf16_dot_available() {
  return active_target() == simd_target::avx512 && active_bf16_engine() == bf16_engine::dot;
}
}  // namespace detail

/// Whether product_math::bf16 (core/options.hpp) runs on bf16 products faster than f32 on the
/// active target: AMX tiles (Intel Sapphire Rapids and later), or AVX-512 BF16's vdpbf16ps (AMD
/// Zen 4/5). Elsewhere it computes in f32.
inline bool bf16_products_available() {
  return detail::bf16_amx_available() || detail::bf16_dot_available();
}

/// Makes every later kernel call run on t (attnkit::invalid_argument if this build or CPU cannot).
/// Not while kernels run on other threads: a call reads the target more than once.
inline void set_target(simd_target t) {
  detail::require(cpu_supports(t), "set_target: ", target_name(t), " is not supported here");
  detail::active_target_slot.store(static_cast<int>(t), std::memory_order_relaxed);
}

}  // namespace attnkit
