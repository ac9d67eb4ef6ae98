#include "shardpipe/pipeline/microbatch.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "shardpipe/copy/copy.h"
#include "shardpipe/pipeline/stage_stream.h"

namespace shardpipe {

std::vector<Activations> split_into_micro_batches(Step& step, const Activations& inputs,
                                                  const std::vector<bool>& batched,
                                                  int64_t chunks) {
  TORCH_CHECK_VALUE(inputs.size() == batched.size(), "shardpipe: ", inputs.size(), " inputs but ",
                    batched.size(), " batched flags");
  step.batched = batched;
  // Each batched input splits along its own dim 0 (their sizes may differ); all must give
  // the same number of micro-batches. The first one's sizes weigh the losses.
  std::vector<std::vector<at::Tensor>> pieces(inputs.size());
  int first = -1;
  for (size_t k = 0; k < inputs.size(); ++k) {
    TORCH_CHECK_TYPE(inputs[k].defined(), "shardpipe: input ", k, " is not a tensor");
    step.input_devices.push_back(inputs[k].device());
    if (!batched[k]) continue;
    TORCH_CHECK_VALUE(inputs[k].dim() >= 1, "shardpipe: input ", k,
                      " is a 0-dim tensor, so it cannot be split into micro-batches");
    TORCH_CHECK_VALUE(inputs[k].size(0) > 0, "shardpipe: the batch is empty (input ", k,
                      " has 0 rows)");
    pieces[k] = at::chunk(inputs[k], chunks, 0);
    if (first < 0) {
      first = static_cast<int>(k);
      continue;
    }
    TORCH_CHECK_VALUE(pieces[k].size() == pieces[first].size(), "shardpipe: input ", k,
                      " (batch size ", inputs[k].size(0), ") splits into ", pieces[k].size(),
                      " micro-batches but input ", first, " (batch size ", inputs[first].size(0),
                      ") into ", pieces[first].size(), "; give inputs whose batch sizes split ",
                      "into the same number, or wrap the input in NoChunk");
  }
  TORCH_CHECK_VALUE(first >= 0, "shardpipe: at least one input must be split into micro-batches");
  step.batch = inputs[first].size(0);
  step.micro_batches = static_cast<int>(pieces[first].size());
  for (const auto& piece : pieces[first]) step.sizes.push_back(piece.size(0));
  step.slots.resize(static_cast<size_t>(step.stages) * step.micro_batches);
  step.outputs.resize(step.micro_batches);
  step.input_grads.resize(step.micro_batches);

  std::vector<Activations> parts(step.micro_batches);
  for (int i = 0; i < step.micro_batches; ++i) {
    for (size_t k = 0; k < inputs.size(); ++k) {
      parts[i].push_back(batched[k] ? pieces[k][i] : inputs[k]);
    }
  }
  return parts;
}

std::vector<int64_t> chunk_rows(int64_t batch, int64_t chunks) {
  if (batch < 1 || chunks < 1)
    throw std::invalid_argument("chunk_rows: batch and chunks must be at least 1, got " +
                                std::to_string(batch) + " and " + std::to_string(chunks));
  const int64_t size = (batch + chunks - 1) / chunks;
  std::vector<int64_t> rows;
  for (int64_t start = 0; start < batch; start += size)
    rows.push_back(std::min(size, batch - start));
  return rows;
}

Activations concat_micro_batches(const std::vector<Activations>& parts, const char* what) {
  if (parts.size() == 1) return parts[0];
  Activations out(parts[0].size());
  for (size_t k = 0; k < out.size(); ++k) {
    std::vector<at::Tensor> pieces;
    for (size_t i = 0; i < parts.size(); ++i) {
      TORCH_CHECK(parts[i].size() == out.size(), "shardpipe: micro-batch ", i, " gave ",
                  parts[i].size(), " ", what, ", micro-batch 0 gave ", out.size());
      TORCH_CHECK(parts[i][k].defined() && parts[i][k].dim() >= 1, "shardpipe: ", what, " ", k,
                  " of micro-batch ", i,
                  " has no batch dimension, so micro-batches cannot be concatenated");
      pieces.push_back(parts[i][k]);
    }
    out[k] = at::cat(pieces, 0);
  }
  return out;
}

std::vector<at::Tensor> input_gradients(Step& step, at::Device first_stage_device) {
  const int m = step.micro_batches;
  std::vector<at::Tensor> result(step.input_devices.size());
  // The caller's stream, already after the stages' streams (the phases join them).
  auto here = current_stream(first_stage_device);
  for (const auto& g : step.input_grads) record_on(g, here);
  for (size_t k = 0; k < result.size(); ++k) {
    if (!step.input_requires_grad[k]) continue;
    std::vector<at::Tensor> pieces;
    for (int i = 0; i < m; ++i) {
      const auto& g = step.input_grads[i];
      if (k < g.size() && g[k].defined()) pieces.push_back(g[k]);
    }
    if (pieces.size() != static_cast<size_t>(m)) continue;  // no gradient reached this input
    at::Tensor grad =
        step.batched[k] ? (m == 1 ? pieces[0] : at::cat(pieces, 0)) : at::stack(pieces).sum(0);
    if (grad.device() != step.input_devices[k]) {
      // Blocking towards the host, like Tensor.to's backward: the caller may read it at once.
      const bool to_host = step.input_devices[k].is_cpu();
      grad = copy_to_kernel({grad}, step.input_devices[k], /*non_blocking=*/!to_host)[0];
    }
    result[k] = grad;
  }
  step.input_grads.clear();
  return result;
}

}  // namespace shardpipe
