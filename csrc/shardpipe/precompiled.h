// The torch headers most of shardpipe's translation units include. Parsing them is most of
// each file's compile time, so both builds parse them once: setup.py precompiles this file
// and force-includes it into every C++ source; CMake does the same per target. No include
// guard: it is compiled as a file of its own, and the headers below have theirs.

#include <ATen/ATen.h>
#include <torch/library.h>
