// The whole operator surface of shardpipe, declared once. Implementations register
// per dispatch key next to their code (copy.cpp, sharded_linear.cpp, ...). This file
// has no Python in it, so GoogleTest reaches the same operators through the dispatcher.
#include <torch/library.h>

TORCH_LIBRARY(shardpipe, m) {
  // Value semantics of Tensor::to(device) for every tensor of the list; on CUDA the copies
  // run on a copy stream and the destination's current stream waits on them.
  m.def("copy_to(Tensor[] xs, Device device, bool non_blocking=True) -> Tensor[]");
}
