"""Batch norm whose running statistics are committed once per mini-batch."""

import torch
import torch.nn.functional as F
from torch import nn

from . import _C

__all__ = ["DeferredBatchNorm"]


class DeferredBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A ``BatchNorm{1,2,3}d`` for pipelines: running statistics follow the mini-batch.

    Each micro-batch is normalised with its own statistics, as usual in a pipeline, but the
    running mean and variance are not updated per micro-batch: sums are accumulated over the
    micro-batches and :meth:`commit` folds them in once, so after a step the running
    statistics equal those of one full-batch step on the inputs the layer saw. (A batch norm
    behind another one sees inputs normalised per micro-batch, so its statistics differ from
    a full-batch forward of the whole model as much as those inputs do: the price of
    micro-batching, not of the deferral.) A checkpointed forward that is recomputed
    during backward is not counted twice. Parameter and buffer names are ``BatchNorm``'s, so
    ``state_dict`` keys do not change.

    ``Pipeline(..., deferred_batch_norm=True)`` converts and commits for you.

    Example::

        >>> bn = DeferredBatchNorm.convert(nn.BatchNorm2d(8))
        >>> for part in torch.randn(6, 8, 4, 4).chunk(3):
        ...     _ = bn(part)
        >>> bn.commit()   # running stats now equal one BatchNorm2d step on all 6 samples
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        zeros = torch.zeros(num_features, dtype=torch.float64)
        self.register_buffer("_sum", zeros.clone(), persistent=False)
        self.register_buffer("_sum_squares", zeros.clone(), persistent=False)
        self.register_buffer("_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self._dim = None

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"DeferredBatchNorm expects at least 2-D input, got {input.dim()}-D")
        if self._dim is not None and input.dim() != self._dim:
            raise ValueError(f"expected {self._dim}-D input (like the BatchNorm it replaced), "
                             f"got {input.dim()}-D")

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        if not _C.is_recomputing():
            dims = [0] + list(range(2, input.dim()))
            with torch.no_grad():
                data = input.detach().to(torch.float64)
                self._sum += data.sum(dims)
                self._sum_squares += (data * data).sum(dims)
                self._count += input.numel() // input.size(1)
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @torch.no_grad()
    def commit(self):
        """Fold the statistics of the micro-batches seen since the last commit into the
        running mean and variance (and count one batch), as one full-batch step would."""
        n = float(self._count)
        if n == 0:
            return
        mean = self._sum / n
        var = (self._sum_squares / n - mean * mean).clamp_min(0)
        if n > 1:
            var = var * (n / (n - 1))
        self.num_batches_tracked += 1
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype), alpha=factor)
        self._sum.zero_()
        self._sum_squares.zero_()
        self._count.zero_()

    @classmethod
    def convert(cls, module):
        """Return ``module`` with every ``BatchNorm{1,2,3}d`` that tracks running statistics
        replaced by a ``DeferredBatchNorm`` sharing its parameters and buffers (so an optimizer
        made from the original parameters still works)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats \
                and not isinstance(module, cls):
            bn = cls(module.num_features, module.eps, module.momentum, module.affine)
            bn._dim = {"BatchNorm1d": None, "BatchNorm2d": 4, "BatchNorm3d": 5}.get(
                type(module).__name__)
            if module.affine:
                bn.weight = module.weight
                bn.bias = module.bias
            bn.running_mean = module.running_mean
            bn.running_var = module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
            device = module.running_mean.device
            bn._sum = bn._sum.to(device)
            bn._sum_squares = bn._sum_squares.to(device)
            bn._count = bn._count.to(device)
            bn.train(module.training)
            return bn
        for name, child in module.named_children():
            converted = cls.convert(child)
            if converted is not child:
                setattr(module, name, converted)
        return module
