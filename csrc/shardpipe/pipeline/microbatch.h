#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "shardpipe/pipeline/step.h"

namespace shardpipe {

// Splits each `batched` input along its own dim 0 into at most `chunks` micro-batches (like
// at::chunk; all must give the same number; the other inputs go whole to every micro-batch)
// and sets the step's batch and micro-batch sizes (the first batched input's), input devices
// and slots. Returns the micro-batches; throws
// c10::ValueError / c10::TypeError for inputs that cannot be split.
std::vector<Activations> split_into_micro_batches(Step& step, const Activations& inputs,
                                                  const std::vector<bool>& batched, int64_t chunks);

// Micro-batch sizes as at::chunk cuts `batch` rows into at most `chunks` pieces (the
// executor's split): ceil(batch / chunks) each, the last one smaller.
std::vector<int64_t> chunk_rows(int64_t batch, int64_t chunks);

// Concatenates per-micro-batch activations along the batch dimension; with one micro-batch
// the tensors are returned as they are. `what` names them in errors ("output").
Activations concat_micro_batches(const std::vector<Activations>& parts, const char* what);

// The gradient of each input of the step (undefined where none arrived), on the input's own
// device, from the first stage's micro-batches; batched inputs are concatenated, the others
// summed over the micro-batches.
std::vector<at::Tensor> input_gradients(Step& step, at::Device first_stage_device);

}  // namespace shardpipe
