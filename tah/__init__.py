"""TaH: Think-at-Hard looped transformers over HF causal LMs (library part: no Ray in here).

    from tah import TaHConfig, TaHForCausalLM
"""

from .config import DeciderSettings, LoraSettings, TaHConfig
from .model import TaHForCausalLM, TaHOutput

__all__ = ["TaHConfig", "TaHForCausalLM", "TaHOutput", "LoraSettings", "DeciderSettings"]
__version__ = "0.1.0"
