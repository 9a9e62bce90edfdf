"""The op seam: autograd Functions, backend dispatch and input validation.

Everything in the package calls these functions, never ``kernels/`` directly.
"""

from entrgi.ops.guided import MODES, GuidedEmbedding, guided_embedding
from entrgi.ops.layer_ops import (
    add_rms_norm, merged_silu_gate, normed_rotary_embedding, rms_norm, rms_norm_with_residual, rotary_embedding,
    silu_gate,
)  # fmt: skip
from entrgi.ops.step import ALGS, StepSample, entropy_confidence, sample_step

__all__ = [
    "ALGS", "MODES", "GuidedEmbedding", "StepSample", "add_rms_norm", "entropy_confidence", "guided_embedding",
    "merged_silu_gate", "normed_rotary_embedding", "rms_norm", "rms_norm_with_residual", "rotary_embedding", "sample_step", "silu_gate",
]  # fmt: skip
