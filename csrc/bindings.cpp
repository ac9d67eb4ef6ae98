// The one place where C++ meets Python: the pybind11 module shardpipe._C. Operators are
// registered with the dispatcher by the core itself (csrc/shardpipe/ops.cpp); loading this
// module is what makes torch.ops.shardpipe.* appear.
#include <torch/extension.h>

#include "shardpipe/balance.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "shardpipe's C++ core";
  m.def(
      "cuda_compiled",
      []() {
#ifdef SHARDPIPE_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether this build of shardpipe compiled its CUDA sources.");
  // std::invalid_argument from the core arrives in Python as ValueError.
  m.def("balance_partition", &shardpipe::balance_partition, py::arg("costs"), py::arg("partitions"),
        "Group sizes splitting `costs` into `partitions` contiguous groups with the smallest "
        "largest group cost (ties: most even sizes, then lexicographically smallest).");
}
