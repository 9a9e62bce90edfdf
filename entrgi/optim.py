"""Adam on the logits, as device-resident in-place updates (no host syncs, capturable)."""

from __future__ import annotations

import math

import torch
from torch.profiler import record_function

from entrgi.ops.validation import check_active, check_logits, resolve_backend

MOMENT_DTYPES = (torch.float32, torch.bfloat16)


class LogitAdam:
    """``torch.optim.Adam`` (default betas/eps, no weight decay) on one float32 tensor
    (..., V) whose rows may be frozen.

    ``active`` (...,) bool marks the rows that move (default all); the others keep
    their values whatever their gradient. ``backend`` ``triton`` (``auto`` on CUDA)
    runs one fused pass per step that does not touch frozen rows; ``torch`` is the
    eager reference. Bias corrections use the Python step count, static per guided
    step, so the update reads no scalar back from the device. Moments start at zero.

    Passed to ``guided_embedding(..., optimizer=)``, the step runs inside the op's
    backward (with the Triton backend in the backward kernel: the gradient is never
    stored).

    ``moment_dtype`` ``torch.bfloat16`` halves the two moments' memory (2 x 4 -> 2 x 2
    bytes per logit): each step is computed in float32 from the stored moments and
    rounds them once when storing (an approximation of Adam; float32 is exact).
    """

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 active: torch.Tensor | None = None, backend: str = "auto",
                 moment_dtype: torch.dtype = torch.float32):  # fmt: skip
        check_logits("param", param)
        check_active(active, param, "param")
        if not 0 < lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)}")
        if not 0 <= eps < math.inf:
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment_dtype must be torch.float32 or torch.bfloat16, got {moment_dtype}")
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param, dtype=moment_dtype)
        self.exp_avg_sq = torch.zeros_like(param, dtype=moment_dtype)
        self.step_count = 0
        self.active = active
        self.fused = resolve_backend(backend, param.device) == "triton"
        if self.fused:
            if not (param.dtype == torch.float32 and param.is_contiguous()):
                raise ValueError(f"the fused Adam needs a contiguous float32 param, got {param.dtype}")
            from entrgi.ops.triton_backend import skip_flags

            self._skip = None if active is None else skip_flags(active.reshape(-1))

    def fused_update(self):
        """The next step as an ``entrgi_kernels.adam.AdamUpdate`` over (rows, V) views of
        the moments, for a kernel that applies it in place (fused backend only);
        advances the step count."""
        from entrgi_kernels.adam import AdamUpdate

        if not self.fused:
            raise RuntimeError("fused_update needs the fused (Triton) backend")
        self.step_count += 1
        vocab = self.param.shape[-1]
        return AdamUpdate(self.exp_avg.view(-1, vocab), self.exp_avg_sq.view(-1, vocab), self.step_count, self.lr,
                          *self.betas, self.eps, self._skip)  # fmt: skip

    @torch.no_grad()
    @record_function("entrgi.optimizer")
    def step(self, grad: torch.Tensor) -> None:
        """One Adam step with gradient ``grad`` (the param's shape)."""
        if grad.shape != self.param.shape:
            raise ValueError(f"grad shape {tuple(grad.shape)} != param shape {tuple(self.param.shape)}")
        if self.fused:
            from entrgi_kernels.adam import adam_step

            vocab = self.param.shape[-1]
            adam_step(self.param.view(-1, vocab), grad.reshape(-1, vocab).contiguous(), self.fused_update())
            return
        beta1, beta2 = self.betas
        self.step_count += 1
        if self.active is not None:
            grad = grad * self.active.unsqueeze(-1)  # zero gradient and moments: the row stays put
        exp_avg, exp_avg_sq = self.exp_avg.float(), self.exp_avg_sq.float()  # the moments themselves if float32
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_sqrt = (1 - beta2**self.step_count) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        self.param.addcdiv_(exp_avg, denom, value=-self.lr / bias_correction1)
        if exp_avg is not self.exp_avg:  # bfloat16 moments: rounded once, as the kernels store them
            self.exp_avg.copy_(exp_avg)
            self.exp_avg_sq.copy_(exp_avg_sq)
