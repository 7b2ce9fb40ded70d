// CPU attention backward entry points for c10::Half (one dtype per translation unit: attention_backward_tiles.h).
#include "attention_backward_tiles.h"

namespace fastattn {
namespace attention_cpu {
FASTATTN_DEFINE_BACKWARD_ENTRY_POINTS(c10::Half, half)
}  // namespace attention_cpu
}  // namespace fastattn
