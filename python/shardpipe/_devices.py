"""Argument checking shared by the public functions: devices."""

import torch

__all__ = []


def as_device(value, name):
    """Return ``value`` as an available ``torch.device``; ``name`` is the argument's name.

    Raises ``TypeError`` for something that is not a device and ``ValueError`` for a
    device string that does not parse or a device this machine does not have.
    """
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value)
        except RuntimeError:
            raise ValueError(
                f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}"
            ) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        device = torch.device("cuda", value)
    else:
        raise TypeError(
            f"{name} must be a str, int or torch.device, got {type(value).__name__}"
        )
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"{name} must be a CPU or CUDA device, got {str(device)!r}")
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"{name} is {str(device)!r}, but no CUDA device is available")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise ValueError(
            f"{name} is {str(device)!r}, but only cuda:0..cuda:{count - 1} exist"
        )
    return torch.device("cuda", index)
