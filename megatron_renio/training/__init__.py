"""megatron_renio.training"""
