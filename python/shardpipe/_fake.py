"""Fake (meta) implementations of shardpipe's operators, for FakeTensor and torch.compile."""

import torch

__all__ = []


@torch.library.register_fake("shardpipe::copy_to")
def _copy_to_fake(xs, device, non_blocking=True):
    return [torch.empty_like(x, device=device) for x in xs]


def _with_last_dim(x, size, device=None):
    return x.new_empty((*x.shape[:-1], size), device=device)


@torch.library.register_fake("shardpipe::column_parallel_linear")
def _column_parallel_linear_fake(x, weights, biases, gather_output):
    if gather_output:
        return [_with_last_dim(x, sum(w.shape[0] for w in weights))]
    return [_with_last_dim(x, w.shape[0], w.device) for w in weights]


@torch.library.register_fake("shardpipe::_column_parallel_linear_backward")
def _column_parallel_linear_backward_fake(grads, x, weights, has_bias, gather_output, output_mask):
    input_grad = torch.empty_like(x) if output_mask[0] else None
    weight_grads = [torch.empty_like(w) for w in weights] if output_mask[1] else []
    bias_grads = (
        [w.new_empty(w.shape[0]) for w in weights] if output_mask[2] and has_bias else []
    )
    return input_grad, weight_grads, bias_grads


@torch.library.register_fake("shardpipe::row_parallel_linear")
def _row_parallel_linear_fake(xs, weights, bias, input_is_parallel, output_device):
    return _with_last_dim(xs[0], weights[0].shape[0], output_device)


@torch.library.register_fake("shardpipe::_row_parallel_linear_backward")
def _row_parallel_linear_backward_fake(grad, xs, weights, has_bias, input_is_parallel, output_mask):
    input_grads = [torch.empty_like(x) for x in xs] if output_mask[0] else []
    weight_grads = [torch.empty_like(w) for w in weights] if output_mask[1] else []
    bias_grad = grad.new_empty(grad.shape[-1]) if output_mask[2] and has_bias else None
    return input_grads, weight_grads, bias_grad


@torch.library.register_fake("shardpipe::column_parallel_linear_group")
def _column_parallel_linear_group_fake(
    x, weight, bias, gather_output, shard_sizes, rank, group_name, chunks=1
):
    return _with_last_dim(x, sum(shard_sizes) if gather_output else weight.shape[0])


@torch.library.register_fake("shardpipe::row_parallel_linear_group")
def _row_parallel_linear_group_fake(
    x, weight, bias, input_is_parallel, shard_sizes, rank, group_name, chunks=1
):
    return _with_last_dim(x, weight.shape[0])


def _group_backward_fake(grad, x, weight, has_bias, flag, shard_sizes, rank, group_name,
                         output_mask):
    return (
        torch.empty_like(x) if output_mask[0] else None,
        torch.empty_like(weight) if output_mask[1] else None,
        weight.new_empty(weight.shape[0]) if output_mask[2] and has_bias else None,
    )


torch.library.register_fake("shardpipe::_column_parallel_linear_group_backward")(
    _group_backward_fake
)
torch.library.register_fake("shardpipe::_row_parallel_linear_group_backward")(_group_backward_fake)
