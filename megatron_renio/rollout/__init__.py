"""megatron_renio.rollout"""
