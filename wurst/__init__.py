"""wurst: a from-scratch, pure-PyTorch Würstchen v2 text-to-image model.

The documented diffusers classes (WuerstchenCombinedPipeline, WuerstchenPriorPipeline,
WuerstchenDecoderPipeline, AutoPipelineForText2Image) run with only the import line changed; `generate` is one
call from prompt to images.
"""

from .clip import CLIPTextConfig, CLIPTextEncoder
from .components import load_clip_text_encoder, load_stage_a, load_stage_b, load_stage_c
from .errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    GenerationStopped,
    InsufficientMemoryError,
    ModelNotFoundError,
    NumericalError,
    WurstError,
)
from .pipeline import Decoder, Pipeline, Prior, generate, load_pipeline
from .pipeline_base import ImagePipelineOutput, WuerstchenPriorPipelineOutput
from .pipeline_combined import AutoPipelineForText2Image, WuerstchenCombinedPipeline
from .pipeline_decoder import WuerstchenDecoderPipeline
from .pipeline_img2img import AutoPipelineForImage2Image, WuerstchenImg2ImgPipeline
from .pipeline_prior import WuerstchenPriorPipeline
from .sampler import DEFAULT_STAGE_C_TIMESTEPS
from .stage_a import StageA, StageAConfig
from .stage_b import StageB, StageBConfig
from .stage_c import StageC, StageCConfig
from .tokenizer import CLIPTokenizer, PromptTruncatedWarning

__all__ = [
    "AutoPipelineForText2Image",
    "AutoPipelineForImage2Image",
    "WuerstchenImg2ImgPipeline",
    "WuerstchenCombinedPipeline",
    "WuerstchenPriorPipeline",
    "WuerstchenDecoderPipeline",
    "WuerstchenPriorPipelineOutput",
    "ImagePipelineOutput",
    "DEFAULT_STAGE_C_TIMESTEPS",
    "generate",
    "load_pipeline",
    "Pipeline",
    "Prior",
    "Decoder",
    "GenerationStopped",
    "NumericalError",
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
    "ArgumentError",
    "CheckpointError",
    "InsufficientMemoryError",
    "ConfigError",
    "ModelNotFoundError",
    "PromptTruncatedWarning",
    "WurstError",
    "load_clip_text_encoder",
]
__version__ = "0.2.0"
