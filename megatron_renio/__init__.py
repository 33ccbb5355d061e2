"""megatron_renio: Megatron-Core on-policy distillation (OPD / OPSD) with ReNIO sample reweighting."""

__version__ = "0.1.0"
