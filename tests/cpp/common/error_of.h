// What several GoogleTest files share to read an error's message.
#pragma once

#include <c10/util/Exception.h>

#include <string>

namespace shardpipe_test {

// Runs `fn` and returns the message of the c10::Error it throws ("" when it does not).
template <typename Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace shardpipe_test
