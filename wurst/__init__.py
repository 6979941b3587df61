"""wurst: a from-scratch, pure-PyTorch Würstchen v2 text-to-image model."""

from .clip import CLIPTextConfig, CLIPTextEncoder, load_clip_text_encoder
from .errors import CheckpointError, ConfigError, GenerationStopped, ModelNotFoundError, NumericalError, WurstError
from .pipeline import Decoder, Pipeline, Prior, generate
from .sampler import DEFAULT_STAGE_C_TIMESTEPS
from .stage_a import StageA, StageAConfig, load_stage_a
from .stage_b import StageB, StageBConfig, load_stage_b
from .stage_c import StageC, StageCConfig, load_stage_c
from .tokenizer import CLIPTokenizer, PromptTruncatedWarning

__all__ = [
    "DEFAULT_STAGE_C_TIMESTEPS",
    "Decoder",
    "GenerationStopped",
    "NumericalError",
    "Pipeline",
    "generate",
    "Prior",
    "StageA",
    "StageAConfig",
    "load_stage_a",
    "StageB",
    "StageBConfig",
    "load_stage_b",
    "StageC",
    "StageCConfig",
    "load_stage_c",
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
