"""fp32 master weights for the half-precision parameters an optimizer updates (plain PyTorch).

Why: an Adam step of about lr = 5e-5 is less than half a bf16 ulp for every weight with
|w| >= 2^-6, so AdamW on bf16 weights leaves many of them unmoved, decoupled weight decay does
nothing, and bf16 moments round small updates of ``exp_avg_sq`` away. Mixed precision avoids
that by holding every weight in fp32, 4 bytes each; a layer-wise method needs fp32 only for what
it trains. So, as BAdam does for its active block:

- every half-precision parameter that has a gradient when the optimizer steps gets an fp32
  master copy of its weight (made from the weight the first time), kept in the optimizer's own
  state as ``state[p]["master"]``, beside its moments;
- for the step, the parameter's data is its master and its gradient an fp32 copy, so the
  optimizer creates fp32 moments and updates the master; afterwards the parameter gets its
  half-precision data back, set to the master rounded to nearest.

Kept in ``optimizer.state``, a master goes wherever its moments go: dropped with them when a
block leaves the active set (``idle_moments="drop"``), moved to host memory by the offloaders,
saved in and restored from checkpoints. Parameters that never train get none: with GRASS the
masters and moments cover the active blocks and the head, not the model.

``optimizer.load_state_dict`` casts state tensors to their parameter's dtype, which would turn
fp32 moments and masters into bf16 on resume; `keep_fp32_state` stops that.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from grass_lightning.core.step_hooks import after_closure

MASTER = "master"  # the optimizer-state key of a parameter's fp32 master weight
HALF = (torch.bfloat16, torch.float16)


class MasterWeights:
    """Steps ``optimizer``'s half-precision parameters through fp32 masters (see module docstring).

    Register it after any other step hook that hides or restores gradients (the offloaders'):
    its own pre-hook must see the gradients that the step will use, and its post-hook run after
    theirs. Steps nested inside a step (the stream offloader's, one per block) are handled.

    Args:
        optimizer: an optimizer with per-parameter state (AdamW).
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self._swapped: list[list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]] = []  # per step, nested
        self._handles = [
            optimizer.register_step_pre_hook(lambda _, args, kwargs: after_closure(args, kwargs, self._to_masters)),
            optimizer.register_step_post_hook(lambda *_: self._to_weights()),
            *keep_fp32_state(optimizer),
        ]

    def _to_masters(self, step_kwargs: dict) -> None:
        """The parameters about to be updated hold their fp32 masters and fp32 gradients."""
        swapped = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or p.dtype not in HALF:
                    continue
                # a new master joins the state after the step: Adam creates its moments only in an empty state
                master = self.optimizer.state[p].get(MASTER)
                half, grad = p.data, p.grad
                p.data = master if master is not None else p.detach().float()
                p.grad = grad.float()
                swapped.append((p, half, grad))
        self._swapped.append(swapped)

    def _to_weights(self) -> None:
        """Give the parameters their half-precision data back, rounded from the updated masters."""
        for p, half, grad in self._swapped.pop() if self._swapped else ():
            master = self.optimizer.state[p][MASTER] = p.data
            p.grad = None  # an fp32 gradient cannot sit on a half-precision parameter
            p.data = half
            half.copy_(master)  # round to nearest
            p.grad = grad

    def master_bytes(self) -> int:
        """Bytes of master weights the optimizer holds now (parked ones included)."""
        return sum(state[MASTER].numel() * 4 for state in self.optimizer.state.values() if MASTER in state)

    def close(self) -> None:
        """Remove the hooks (masters stay in the optimizer's state); undo a step that raised."""
        while self._swapped:
            self._to_weights()
        for handle in self._handles:
            handle.remove()
        self._handles = []


def keep_fp32_state(optimizer: Optimizer) -> list[RemovableHandle]:
    """Make ``optimizer.load_state_dict`` keep fp32 state tensors of half-precision parameters fp32.

    Torch casts every floating state tensor to its parameter's dtype on load: fp32 masters and
    moments of a bf16 parameter would come back as bf16. The post-hook puts the saved fp32 values
    back, before any other post-hook (an offloader's, which indexes the state) runs.
    Returns the two hooks' handles.
    """
    saved: list[tuple[int, dict]] = []  # (saved parameter index, its state), in parameter order

    def remember(_, state_dict: dict) -> None:
        order = [i for group in state_dict["param_groups"] for i in group["params"]]
        saved[:] = [(i, state_dict["state"].get(i, {})) for i in order]

    def restore(_) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p, (_, values) in zip(params, saved):
            if p.dtype not in HALF or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for key, value in values.items():
                if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32 and key in state:
                    state[key] = value.to(device=state[key].device, copy=True)
        saved.clear()

    return [optimizer.register_load_state_dict_pre_hook(remember),
            optimizer.register_load_state_dict_post_hook(restore, prepend=True)]
