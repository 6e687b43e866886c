#pragma once
// attnkit umbrella header: everything. Include the per-area headers to take less.
#include "version.hpp"
#include "core/error.hpp"
#include "core/executor.hpp"
#include "core/linear.hpp"
#include "core/rope.hpp"
#include "core/softmax.hpp"
#include "core/storage.hpp"
#include "core/view.hpp"
#include "cache/kv_cache.hpp"
#include "cache/dense_cache.hpp"
#include "kernels/gqa.hpp"
#include "layers/gqa_layer.hpp"
