#pragma once
// attnkit umbrella header: everything (attention.hpp plus the conversion tools of convert/).
// Include attention.hpp, or the per-area headers, to take less.
#include "attention.hpp"
#include "convert/gqa_to_mla.hpp"
#include "convert/mha2mla.hpp"
#include "convert/transmla.hpp"
#include "convert/synthetic.hpp"
