"""megatron_renio.eval"""
