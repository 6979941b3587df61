"""The diffusers / transformers side of the parity tests: reference pipelines built from the same hub-layout
folders wurst reads. diffusers >= 0.38 cannot load these repositories with DiffusionPipeline.from_pretrained
(its model_index.json names a module that moved), so each component is loaded on its own."""

import torch
from diffusers import (
    DDPMWuerstchenScheduler,
    WuerstchenCombinedPipeline,
    WuerstchenDecoderPipeline,
    WuerstchenPriorPipeline,
)
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from transformers import CLIPTextModel, CLIPTokenizer


def prior_pipeline(repo_dir, dtype=torch.float32) -> WuerstchenPriorPipeline:
    pipe = WuerstchenPriorPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(repo_dir / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(repo_dir / "text_encoder").eval().to(dtype),
        prior=WuerstchenPrior.from_pretrained(repo_dir / "prior").eval().to(dtype),
        scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoder_pipeline(repo_dir, dtype=torch.float32) -> WuerstchenDecoderPipeline:
    pipe = WuerstchenDecoderPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(repo_dir / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(repo_dir / "text_encoder").eval().to(dtype),
        decoder=WuerstchenDiffNeXt.from_pretrained(repo_dir / "decoder").eval().to(dtype),
        vqgan=PaellaVQModel.from_pretrained(repo_dir / "vqgan").eval().to(dtype),
        scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def combined_pipeline(prior_dir, decoder_dir, dtype=torch.float32) -> WuerstchenCombinedPipeline:
    prior, decoder = prior_pipeline(prior_dir, dtype), decoder_pipeline(decoder_dir, dtype)
    pipe = WuerstchenCombinedPipeline(
        tokenizer=decoder.tokenizer, text_encoder=decoder.text_encoder, decoder=decoder.decoder,
        scheduler=decoder.scheduler, vqgan=decoder.vqgan, prior_tokenizer=prior.tokenizer,
        prior_text_encoder=prior.text_encoder, prior_prior=prior.prior, prior_scheduler=prior.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
