"""megatron_renio.data"""
