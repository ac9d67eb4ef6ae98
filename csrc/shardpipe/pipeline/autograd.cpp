#include "shardpipe/pipeline/autograd.h"

#include <mutex>
#include <string>
#include <utility>

#include "shardpipe/pipeline/engine.h"

namespace shardpipe {
namespace {

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

class GradSink : public torch::autograd::Node {
 public:
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (grads[0].defined()) grad_ = grad_.defined() ? grad_ + grads[0] : grads[0];
    return {};
  }
  std::string name() const override { return "shardpipe::StageInput"; }
  at::Tensor take() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(grad_, at::Tensor());
  }

 private:
  std::mutex mutex_;
  at::Tensor grad_;
};

// The autograd node of `Engine::forward`'s outputs: it runs the backward schedule.
class PipelineBackward : public torch::autograd::Node {
 public:
  PipelineBackward(std::shared_ptr<Engine> engine, std::shared_ptr<Step> step,
                   std::vector<size_t> outputs, size_t total_outputs)
      : engine_(std::move(engine)),
        step_(std::move(step)),
        outputs_(std::move(outputs)),
        total_outputs_(total_outputs) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(step_, "shardpipe: the pipeline's backward already ran for this forward ",
                "(retain_graph=True is not supported: run the forward again)");
    std::vector<at::Tensor> all(total_outputs_);
    for (size_t k = 0; k < outputs_.size(); ++k) all[outputs_[k]] = grads[k];
    auto step = step_;
    return engine_->backward(*step, all);
  }

  std::string name() const override { return "shardpipe::PipelineBackward"; }
  void release_variables() override { step_.reset(); }

 private:
  std::shared_ptr<Engine> engine_;
  std::shared_ptr<Step> step_;
  std::vector<size_t> outputs_;  // which outputs have this node as grad_fn, in input order
  size_t total_outputs_;
};

}  // namespace

NodePtr attach_gradient_sink(at::Tensor& input) {
  auto sink = make_node<GradSink>();
  torch::autograd::create_gradient_edge(input, sink);
  return sink;
}

at::Tensor take_sink_gradient(const NodePtr& sink) {
  return static_cast<GradSink*>(sink.get())->take();
}

void attach_pipeline_backward(std::shared_ptr<Engine> engine, std::shared_ptr<Step> step,
                              const Activations& inputs, Activations& outputs,
                              const std::vector<size_t>& differentiable) {
  auto node = make_node<PipelineBackward>(std::move(engine), std::move(step), differentiable,
                                          outputs.size());
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (size_t k : differentiable) torch::autograd::create_gradient_edge(outputs[k], node);
}

}  // namespace shardpipe
