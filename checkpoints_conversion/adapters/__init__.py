"""One adapter per supported Hugging Face architecture; :func:`get_adapter` picks one by name."""

from checkpoints_conversion.adapters.llama import LlamaAdapter
from checkpoints_conversion.adapters.qwen2 import Qwen2Adapter
from checkpoints_conversion.adapters.qwen3 import Qwen3Adapter
from checkpoints_conversion.common import Adapter
from megatron_renio.errors import UserInputError

ADAPTERS: dict[str, Adapter] = {a.architecture: a for a in (Qwen3Adapter(), Qwen2Adapter(), LlamaAdapter())}


def get_adapter(architecture: str) -> Adapter:
    """The adapter of ``architecture`` (e.g. ``"Qwen3ForCausalLM"``); unknown ones list the supported."""
    if architecture not in ADAPTERS:
        raise UserInputError(f"unsupported architecture {architecture!r}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[architecture]
