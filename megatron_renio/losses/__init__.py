"""megatron_renio.losses"""
