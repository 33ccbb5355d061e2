"""megatron_renio.renio"""
