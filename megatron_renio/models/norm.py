"""RMSNorm for Megatron-Core's local layer spec, usable with sequence parallelism.

``y = w * (x * rsqrt(mean(x^2) + eps))``, with the normalisation computed in fp32 and cast back
to the input dtype before the weight is applied (the Hugging Face Qwen/Llama order, so converted
models give the same numbers). Megatron-Core's ``WrappedTorchNorm`` refuses sequence parallelism;
this module instead marks its weight ``sequence_parallel`` so that ``finalize_model_grads``
all-reduces its gradient over the tensor-parallel group, as Transformer Engine's norms do.
"""

import torch


class RMSNorm(torch.nn.Module):
    """Signature-compatible with Megatron's norm modules: ``(config, hidden_size, eps, ...)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_init_device(config))
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def _init_device(config) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
