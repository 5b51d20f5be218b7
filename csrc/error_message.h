// FUSED_CE_CHECK: TORCH_CHECK with the numbers in its message formatted here,
// not by std::ostream.
//
// Why: on the GPU machine (H100, torch 2.11, the extension built there),
// every check of this extension whose message streamed an integer crashed
// the process with a segmentation fault, while every check whose message
// held only text, dtypes and devices raised its RuntimeError (2026-11-26 and
// -27, scripts/repro_scale_gradient_crash.py). TORCH_CHECK streams its
// arguments into a std::ostringstream, and only numbers go through the
// stream's locale (its num_put facet); text, and the dtype and device names
// that libc10 formats, do not. So the messages here are assembled as text:
// integers by std::to_string, floating point numbers by snprintf's %g and
// shapes by hand, each spelled exactly as the stream would have spelled it
// (tests/test_errors.py compares whole messages), and TORCH_CHECK receives
// one ready string, which c10::str passes through untouched.
//
// FUSED_CE_CHECK(cond, parts...) and FUSED_CE_CHECK_INDEX(cond, parts...)
// raise what TORCH_CHECK and TORCH_CHECK_INDEX raise (RuntimeError,
// IndexError); the parts are only evaluated when the check fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fused_ce {
namespace message_detail {

inline void append(std::string& out, std::string_view text) { out.append(text); }

inline void append(std::string& out, c10::ScalarType type) { out.append(c10::toString(type)); }

// Device::str() is libc10's own formatting ("cuda:0").
inline void append(std::string& out, const c10::Device& device) { out.append(device.str()); }

// Numbers (and bools, 1 or 0 like the stream's). Not chars: the stream
// prints the character, std::to_string its code, so they do not compile here.
template <typename Number>
constexpr bool kIsNumber = std::is_arithmetic_v<Number> && !std::is_same_v<Number, char> &&
                           !std::is_same_v<Number, signed char> && !std::is_same_v<Number, unsigned char>;

template <typename Number, std::enable_if_t<kIsNumber<Number>, int> = 0>
void append(std::string& out, Number value) {
  if constexpr (std::is_integral_v<Number>) {
    out.append(std::to_string(value));
  } else {
    // std::ostream's default for floating point is printf's %g: 6
    // significant digits, scientific notation for exponents below -4 or
    // from 6 on, no trailing zeros (1.5, -1e-07, inf).
    char text[32];
    std::snprintf(text, sizeof(text), "%g", static_cast<double>(value));
    out.append(text);
  }
}

// A shape as c10 streams an IntArrayRef: "[2, 3]".
inline void append(std::string& out, c10::IntArrayRef sizes) {
  out.push_back('[');
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out.append(", ");
    append(out, sizes[i]);
  }
  out.push_back(']');
}

}  // namespace message_detail

// The parts of an error message, joined.
template <typename... Parts>
std::string error_message(const Parts&... parts) {
  std::string out;
  (message_detail::append(out, parts), ...);
  return out;
}

}  // namespace fused_ce

#define FUSED_CE_CHECK(cond, ...) TORCH_CHECK(cond, ::fused_ce::error_message(__VA_ARGS__))
#define FUSED_CE_CHECK_INDEX(cond, ...) TORCH_CHECK_INDEX(cond, ::fused_ce::error_message(__VA_ARGS__))
