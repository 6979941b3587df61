"""wurst: a from-scratch, pure-PyTorch Würstchen v2 text-to-image model."""

from .clip import CLIPTextConfig, CLIPTextEncoder, load_clip_text_encoder
from .errors import CheckpointError, ConfigError, ModelNotFoundError, WurstError
from .tokenizer import CLIPTokenizer, PromptTruncatedWarning

__all__ = [
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CLIPTokenizer",
    "CheckpointError",
    "ConfigError",
    "ModelNotFoundError",
    "PromptTruncatedWarning",
    "WurstError",
    "load_clip_text_encoder",
]
__version__ = "0.1.0"
