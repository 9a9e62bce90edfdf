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

    ``replay_from`` (the param's shape, any float dtype): the param's values before the
    first step, left unmodified (e.g. the denoiser's bf16 logits the float32 param was
    cast from). With the fused backend the moments are then not stored at all: each
    step, inside the op's backward, recomputes the whole Adam trajectory from these
    values and the per-row factors of every earlier gradient (``max_steps`` x (rows,
    d) values; see ``entrgi_kernels.adam.AdamReplay``). Exact: the same values as
    float32 moments, for 0 bytes of moments instead of 8 per logit, at one extra
    GEMM per earlier step. Steps must then all come through ``guided_embedding``'s
    backward (same table and temperature), at most ``max_steps`` of them. The
    ``torch`` backend stores float32 moments (same values).
    """

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 active: torch.Tensor | None = None, backend: str = "auto",
                 moment_dtype: torch.dtype = torch.float32, replay_from: torch.Tensor | None = None,
                 max_steps: int | None = None):  # fmt: skip
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
        if replay_from is not None:
            _check_replay(replay_from, param, moment_dtype, max_steps)
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.step_count = 0
        self.active = active
        self.fused = resolve_backend(backend, param.device) == "triton"
        self._replay = None
        if self.fused:
            if not (param.dtype == torch.float32 and param.is_contiguous()):
                raise ValueError(f"the fused Adam needs a contiguous float32 param, got {param.dtype}")
            from entrgi.ops.triton_backend import skip_flags

            self._skip = None if active is None else skip_flags(active.reshape(-1))
            if replay_from is not None:
                from entrgi_kernels.adam import AdamReplay

                vocab = param.shape[-1]
                anchor = replay_from.reshape(-1, vocab).contiguous()  # a copy only if replay_from is strided
                self._replay = AdamReplay(anchor, max_steps, lr, *betas, eps, self._skip)
        stored = self._replay is None
        self.exp_avg = torch.zeros_like(param, dtype=moment_dtype) if stored else None
        self.exp_avg_sq = torch.zeros_like(param, dtype=moment_dtype) if stored else None

    def fused_update(self):
        """The next step as an ``entrgi_kernels.adam.AdamUpdate`` over (rows, V) views of
        the moments, or the ``AdamReplay`` (``replay_from``), for a kernel that applies
        it in place (fused backend only); advances the step count."""
        from entrgi_kernels.adam import AdamUpdate

        if not self.fused:
            raise RuntimeError("fused_update needs the fused (Triton) backend")
        self.step_count += 1
        if self._replay is not None:
            return self._replay
        vocab = self.param.shape[-1]
        return AdamUpdate(self.exp_avg.view(-1, vocab), self.exp_avg_sq.view(-1, vocab), self.step_count, self.lr,
                          *self.betas, self.eps, self._skip)  # fmt: skip

    @torch.no_grad()
    @record_function("entrgi.optimizer")
    def step(self, grad: torch.Tensor) -> None:
        """One Adam step with gradient ``grad`` (the param's shape)."""
        if grad.shape != self.param.shape:
            raise ValueError(f"grad shape {tuple(grad.shape)} != param shape {tuple(self.param.shape)}")
        if self._replay is not None:
            raise RuntimeError("a LogitAdam with replay_from steps only inside guided_embedding's backward, "
                               "which hands it the gradient's factors, not a gradient")  # fmt: skip
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


def _check_replay(replay_from: torch.Tensor, param: torch.Tensor, moment_dtype: torch.dtype, max_steps) -> None:
    if not isinstance(replay_from, torch.Tensor) or not replay_from.is_floating_point():
        got = replay_from.dtype if isinstance(replay_from, torch.Tensor) else type(replay_from).__name__
        raise ValueError(f"replay_from must be a float tensor, got {got}")
    if replay_from.shape != param.shape or replay_from.device != param.device:
        raise ValueError(f"replay_from {tuple(replay_from.shape)} on {replay_from.device} must have the param's "
                         f"shape {tuple(param.shape)} and device {param.device}")  # fmt: skip
    if replay_from.data_ptr() == param.data_ptr():
        raise ValueError("replay_from must be the param's values before the first step, not the param itself")
    if moment_dtype != torch.float32:
        raise ValueError(f"replay_from stores no moments: leave moment_dtype float32, got {moment_dtype}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"replay_from needs max_steps, an int >= 1, got {max_steps!r}")
