// CPU attention backward entry points for double (one dtype per translation unit: attention_backward_tiles.h).
#include "attention_backward_tiles.h"

namespace fastattn {
namespace attention_cpu {
FASTATTN_DEFINE_BACKWARD_ENTRY_POINTS(double, double)
}  // namespace attention_cpu
}  // namespace fastattn
