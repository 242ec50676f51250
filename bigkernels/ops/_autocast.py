"""Autocast for the custom ops, which have no autocast kernels of their own:
the Python entry points cast their inputs as torch.autocast casts those of
the torch op they replace (F.linear, F.scaled_dot_product_attention)."""

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)
# Whether autocast is on for any device type (a private torch function; where
# it is missing, say yes and let the per-device check below decide).
_ANY_AUTOCAST_ENABLED = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_enabled(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast, such as "meta"
        return False


def autocast_inputs(first, *others):
    """(first, *others), cast to the autocast dtype when autocast is on for
    first's device. Like autocast, leaves float64, non-float tensors (bool
    masks) and non-tensors alone."""
    tensors = (first,) + others
    if not _ANY_AUTOCAST_ENABLED():  # the common case, answered in one C call
        return tensors
    if not isinstance(first, torch.Tensor) or not _autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE and t.dtype != dtype else t
                 for t in tensors)


def autocast_dtype(tensor):
    """The dtype autocast_inputs gives tensor, as the first of its inputs
    (without casting it)."""
    if (_ANY_AUTOCAST_ENABLED() and tensor.dtype in _CASTABLE and _autocast_enabled(tensor.device.type)):
        return torch.get_autocast_dtype(tensor.device.type)
    return tensor.dtype


def autocast_runs_in_float32(tensor):
    """Whether autocast is on for tensor's device and would run an op on its
    float32 list (cross_entropy) in float32 for tensor's dtype."""
    return (_ANY_AUTOCAST_ENABLED() and tensor.dtype in _CASTABLE
            and _autocast_enabled(tensor.device.type))
