"""Whether an op call will be differentiated: grad mode is on and some input
(None allowed) requires grad. The ops keep less for backward when not."""

import torch


def needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
