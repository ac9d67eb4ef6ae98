"""Argument checking shared by the public functions: one home for every rule.

Each check raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for one out
of range, naming the argument (``name``) and what is allowed.
"""

import collections.abc

import torch

__all__ = []


def check_int(value, name, minimum=None, maximum=None):
    """``value`` if it is an int (not a bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_number(value, name, minimum=None):
    """``value`` if it is an int or float (not a bool), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_instance(value, name, cls, what):
    """``value`` if it is an instance of ``cls``; ``what`` names it ("a torch.Tensor")."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def check_bool(value, name):
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(value, name, allowed):
    """``value`` if it is one of the strings ``allowed``."""
    allowed = tuple(allowed)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {allowed}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_dtype(dtype, allowed):
    """``dtype`` (the default dtype when None) if it is one of ``allowed``."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(str(d) for d in allowed)}; got {dtype}")
    return dtype


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


def as_device_list(value, name):
    """``value`` as a non-empty list of available devices (``name[i]`` named in errors)."""
    if isinstance(value, str) or not isinstance(value, collections.abc.Sequence):
        raise TypeError(f"{name} must be a list of devices such as ['cuda:0', 'cuda:1'] or "
                        f"['cpu', 'cpu'], got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must list at least one device, got an empty list")
    return [as_device(d, f"{name}[{i}]") for i, d in enumerate(value)]
