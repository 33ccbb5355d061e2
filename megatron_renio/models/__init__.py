"""megatron_renio.models"""
