"""wurst: a from-scratch, pure-PyTorch Würstchen v2 text-to-image model.

The documented diffusers classes (WuerstchenCombinedPipeline, WuerstchenPriorPipeline,
WuerstchenDecoderPipeline, AutoPipelineForText2Image) run with only the import line changed; `generate` is one
call from prompt to images.
"""

from wurst.api import generate, load_pipeline
from wurst.errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    InsufficientMemoryError,
    ModelNotFoundError,
    NumericalError,
    WurstError,
)
from wurst.models.clip import CLIPTextConfig, CLIPTextEncoder
from wurst.models.stage_a import StageA, StageAConfig
from wurst.models.stage_b import StageB, StageBConfig
from wurst.models.stage_c import StageC, StageCConfig
from wurst.models.tokenizer import CLIPTokenizer, PromptTruncatedWarning
from wurst.pipelines.combined import AutoPipelineForText2Image, WuerstchenCombinedPipeline
from wurst.pipelines.decoder import WuerstchenDecoderPipeline
from wurst.pipelines.img2img import AutoPipelineForImage2Image, WuerstchenImg2ImgPipeline
from wurst.pipelines.outputs import ImagePipelineOutput, WuerstchenPriorPipelineOutput
from wurst.pipelines.prior import WuerstchenPriorPipeline
from wurst.sampler import DEFAULT_STAGE_C_TIMESTEPS
from wurst.weights.spec import load_clip_text_encoder, load_stage_a, load_stage_b, load_stage_c

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
__version__ = "0.3.0"
