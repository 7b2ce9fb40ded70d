// Types shared by every kernel's arguments. No torch headers.
#pragma once

namespace fastattn {

enum class Dtype : int { kHalf, kBFloat16, kFloat, kDouble };
// How a mask element is stored: absent, bool (one byte, nonzero = keep), the input's dtype, or float32
// (the last two are added to the scores).
enum class MaskKind : int { kNone, kBool, kSame, kFloat };

}  // namespace fastattn
