#pragma once
// attnkit umbrella header: everything (attention.hpp plus the conversion tools of convert/).
// Include attention.hpp, or the per-area headers, to take less.
#include "attention.hpp"
#include "convert/gqa_to_mla.hpp"
#include "convert/mha2mla.hpp"
#include "convert/transmla.hpp"
#include "convert/synthetic.hpp"

/// @namespace attnkit
/// @brief CPU attention kernels, KV caches and layers for MHA/GQA/MQA, MLA, TPA and shared
/// attention (attention.hpp), plus safetensors checkpoints (io/) and a decoder (model/).

/// @namespace attnkit::convert
/// @brief GQA -> MLA conversion: exact, then compressed the TransMLA and MHA2MLA ways.

/// @namespace attnkit::convert::synthetic
/// @brief Synthetic GQA layers and activations with controlled spectra, for conversion tests
/// and benchmarks.

/// @namespace attnkit::io
/// @brief Hugging Face checkpoints: safetensors reading and writing, config.json parsing.

/// @namespace attnkit::model
/// @brief A dense decoder-only model over the library's layers (forward, NLL).

/// @namespace attnkit::reference
/// @brief Plain double-precision references of every variant, written independently of the
/// kernels: what the tests compare against.
