#pragma once
// attention_options: what every attention entry point (attend, attend_latent,
// attend_factorized) accepts besides its operands. The mask and logit fields are the runtime
// half of the attention policy (kernels/policy.hpp); a custom mask predicate is a template
// argument of the entry points.
#include <cstdint>
#include <optional>
#include <span>

#include "view.hpp"

namespace attnkit {

/// How the GQA-family kernel computes its block products: register-blocked streaming
/// micro-kernels (decode, short chunks) or GEMM tiles (prefill). automatic picks by tile size.
/// The TPA kernel has one path and accepts automatic and streaming.
enum class tile_strategy { automatic, streaming, gemm };

/// The arithmetic of the products over bf16 caches.
///   f32   the cache's bf16 values widened exactly; queries and probabilities stay float: the
///         result carries float round-off only. On AMX CPUs the GEMM tiles (prefill, absorbed
///         MLA decode; d_qk a multiple of 32, d_v of 16) and TPA's D dots and value GEMM run on
///         AMX tiles with each float operand as the exact sum of three bf16 parts, so the
///         products stay exact (docs/math.md, "f32 products on AMX tiles"); views of 32 keys or
///         more.
///   bf16  the scaled queries and the probabilities are rounded to bf16 as well (relative error
///         <= 2^-8 each; what oneDNN and PyTorch's CPU flash attention do with bf16 inputs), so
///         the GEMM tiles (prefill, absorbed MLA with many heads) run on the CPU's bf16 dot
///         products with float accumulation: AMX tiles (Intel Sapphire Rapids and later), or
///         AVX-512 BF16 vdpbf16ps where it runs at twice the f32 FMA rate (AMD Zen 4/5). The
///         output error grows to about 2^-8 max|v| per probability-weighted sum (docs/math.md,
///         "bf16 products"). On vdpbf16ps the streaming path (decode, short chunks; d_qk a
///         multiple of 32) takes the rounded queries against the keys as stored, and its P V the
///         rounded probabilities against two keys' values as stored where d_v is a multiple of
///         32 (else float probabilities): no key or value widened. The GEMM tiles compute the
///         probabilities they round by a coarser exponential (relative error < 6e-5).
///         TPA (attend_factorized) rounds its value weights p A_V to bf16 and runs its value
///         GEMM on AMX tiles (d_v a multiple of 16) or vdpbf16ps; on AMX also its D dots, with
///         B_Q rounded (d a multiple of 32).
///         A shared-attention follower (attend_shared) over a bf16 value cache takes the donor's
///         products for its P V: the probabilities rounded to bf16 against the values as
///         stored, on AMX tiles (GEMM tiles, d_v a multiple of 16) or vdpbf16ps (GEMM tiles;
///         the streaming path where d_v is a multiple of 32).
///         Where the CPU has no such products (bf16_products_available() in core/cpu.hpp), with
///         an odd d_qk, and on the streaming path of an AMX CPU it computes as f32. No effect on
///         float and f16 caches. The layers take it as their configs' `products` field.
enum class product_math { f32, bf16 };

/// Per-call attention options: scale, masks, score modifiers, optional outputs and how the
/// kernel computes. Every attend* call takes one; the defaults are causal softmax attention.
struct attention_options {
  /// Softmax scale applied to q . k; default 1/sqrt(width of the q . k dot product the kernel
  /// sees): d_qk for attend, d_c + d_R for attend_latent, d for attend_factorized. MLA layers
  /// pass 1/sqrt(d_nope + d_R).
  std::optional<float> scale{};
  bool causal = true;                    ///< key position <= query position
  std::optional<std::int64_t> window{};  ///< sliding window: keep keys with q_pos - k_pos < window
  /// Logit soft-capping (Gemma 2): s <- cap * tanh(s / cap) on the scaled score.
  std::optional<float> logit_softcap{};
  /// ALiBi: s <- s - slope[h] * (q_pos - k_pos); one slope per query head, empty = none.
  std::span<const float> alibi_slopes{};
  /// Attention sinks (gpt-oss): a learned logit per query head that joins the softmax
  /// denominator and carries no value; empty = none. The returned LSE includes it.
  std::span<const float> sinks{};
  matrix_view<float> lse{};  ///< optional [Tq, H] output: natural-log log-sum-exp of each row
  /// Optional [Tq, H, Tk] output: the normalised attention weights P = softmax(masked logits)
  /// of every row over the Tk keys the call reads (0 for masked keys; with sinks a row sums to
  /// less than 1). A shared-attention donor's materialised form (kernels/shared.hpp).
  tensor3_view<float> weights{};
  tile_strategy strategy = tile_strategy::automatic;  ///< how work is split (default: planned)
  product_math products = product_math::f32;          ///< the precision of the products
};

/// Optional outputs of a layer's attention call, beside its y: what a shared-attention donor
/// hands its followers (layers/shared_stack.hpp). weights [T, H, Tk] (Tk: the cache's size after
/// the call appends), lse [T, H]; empty = not wanted.
struct attention_outputs {
  tensor3_view<float> weights{};  ///< [T, H, Tk] normalised attention weights, or empty
  matrix_view<float> lse{};       ///< [T, H] log-sum-exp per row, or empty
  /// The layer's attention options with these outputs added.
  attention_options added_to(attention_options opt) const {
    opt.weights = weights, opt.lse = lse;
    return opt;
  }
};

}  // namespace attnkit
