"""The training run, once the job is checked: models, the encoded cache, then the steps.

Step s (1-based) trains on global batch s - 1 of the data order. Of its B samples, process r of N runs micro-batch
m (of A) on samples k = (m·N + r)·b ... + b - 1, b = B / (A·N); each sample's loss enters the gradient as
loss_k / B (DistributedDataParallel averages over the processes, so each process scales its sum by N). The step's
gradient is thus the mean over the global batch whatever N and A are, within float rounding."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from wurst.batch.folder import start_folder
from wurst.models.lora import attach_trainable_lora, lora_layers
from wurst.train import outputs
from wurst.train.cache import EncodedCache
from wurst.train.checkpoint import Metrics, load_checkpoint, save_checkpoint
from wurst.train.data import Sample
from wurst.train.objective import RECIPES, Objective, draw
from wurst.train.order import DataOrder
from wurst.weights.spec import COMPONENTS

# The text encoder's LoRA (--train-text-encoder): its attention projections, as diffusers' scripts choose them.
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def chosen_layers(component: str, model: nn.Module, targets: list[str]) -> dict:
    """The linear layers of `model` whose diffusers name ends with one of `targets` ('all': every one)."""
    from wurst.errors import ArgumentError

    key_map = COMPONENTS[component].key_map
    layers = lora_layers(model)
    names = {name: key_map.checkpoint_layer(name) for name in layers}
    if targets == ["all"]:
        return layers
    chosen = {name: layers[name] for name, file_name in names.items()
              if any(file_name == t or file_name.endswith(f".{t}") for t in targets)}
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names.values())]
    if unmatched:
        ends = sorted({".".join(n.split(".")[-2 if n.endswith(".0") else -1:]) for n in names.values()})
        raise ArgumentError(f"--lora-targets {unmatched[0]!r} names no linear layer of the {component}: its layers "
                            f"end in {', '.join(ends)}")
    return chosen


def lora_targets(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in args.lora_targets.split(",") if t.strip()]


def load_prior_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The prior pipeline (tokenizer, text encoder, prior, scheduler) the run trains: in float32 with --full, the
    trained weights' dtype. A text encoder that is not trained runs only to fill the cache (and for validation
    images and a --full output's repository): it is loaded only while it runs."""
    from wurst.pipelines.prior import WuerstchenPriorPipeline
    from wurst.weights.repository import read_repository

    loaded = torch.float32 if args.full else dtype
    prior = read_repository(args.prior, "prior").load("prior", dtype=loaded, device="cpu")
    pipe = WuerstchenPriorPipeline.from_pretrained(args.prior, torch_dtype=loaded, prior=prior,
                                                   low_memory=not args.train_text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The prior pipeline and Stage C's image encoder."""
    from wurst.weights.image_encoder import choose_image_encoder

    encoder = choose_image_encoder(args.image_encoder, prior=args.prior, dtype=dtype)
    return load_prior_pipeline(args, device, dtype), encoder.to(device)


def trainable_objective(args: argparse.Namespace, pipe,
                        dtype: torch.dtype) -> tuple[Objective, dict[str, nn.Parameter]]:
    """The objective over the pipeline's models, made trainable as the options say; its trained parameters by name."""
    torch.manual_seed(args.seed)  # the LoRA's initial factors: the same on every process and in every rerun
    text_encoder = None
    if args.full:
        for parameter in pipe.prior.parameters():  # fresh float32 copies: the loaded weights may be file mappings
            parameter.data = parameter.data.to(torch.float32, copy=True)
        pipe.prior.requires_grad_(True)
    else:
        attach_trainable_lora(chosen_layers("prior", pipe.prior, lora_targets(args)), rank=args.lora_rank,
                              alpha=args.lora_alpha or args.lora_rank)
        if args.train_text_encoder:
            attach_trainable_lora(chosen_layers("text_encoder", pipe.text_encoder, list(TEXT_TARGETS)),
                                  rank=args.lora_rank, alpha=args.lora_alpha or args.lora_rank)
            text_encoder = pipe.text_encoder
    pipe.prior.gradient_checkpointing = args.gradient_checkpointing
    autocast = dtype if args.full and dtype != torch.float32 else None
    objective = Objective(pipe.prior, text_encoder, recipe=RECIPES[args.recipe], s=pipe.scheduler.s,
                          scaler=pipe.scheduler.scaler, autocast=autocast)
    trained = {name: p for name, p in objective.named_parameters() if p.requires_grad}
    return objective, trained



def fill_cache(cache: EncodedCache, samples: list[Sample], *, pipe, encoder, device, dtype, rank: int,
               world: int) -> None:
    from tqdm.auto import tqdm

    def progress(items):
        return tqdm(items, desc="encoding the dataset", unit="image", disable=rank != 0 or not items)

    # The text encoder is loaded once for all captions (and only here, unless it is trained: see load_models).
    uses_text = cache.with_text and any(not cache.path(f"{s.index:06d}").exists() for s in samples)
    running = pipe.placement.running("text_encoder") if uses_text else contextlib.nullcontext()
    with running as text_encoder, torch.no_grad():
        def encode_text(captions: list[str]) -> torch.Tensor:
            ids, mask = pipe.tokenizer(captions)
            return text_encoder(ids.to(device), mask.to(device))

        cache.fill(samples, rank=rank, world=world, encode_image=lambda pixels: encoder(pixels.to(device, dtype)),
                   encode_text=encode_text, progress=progress)
    if world > 1:
        dist.barrier()


class Trainer:
    def __init__(self, args: argparse.Namespace, *, samples: list[Sample], pipe, objective: Objective,
                 trained: dict[str, nn.Parameter], cache: EncodedCache, device, rank: int, world: int):
        self.args, self.samples, self.pipe, self.cache = args, samples, pipe, cache
        self.objective, self.trained, self.device, self.rank, self.world = objective, trained, device, rank, world
        self.order = DataOrder(samples, batch_size=args.batch_size, seed=args.seed)
        self.optimizer = torch.optim.AdamW(trained.values(), lr=args.learning_rate, betas=(0.9, 0.999),
                                           weight_decay=0.0, eps=1e-8)
        warmup = args.lr_warmup_steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda done: min(1.0, (done + 1) / warmup) if warmup else 1.0)
        self.ema = ({name: p.detach().float().clone() for name, p in trained.items()}
                    if args.ema_decay is not None else None)
        self.model = objective
        if world > 1:
            frozen = [name for name, p in objective.named_parameters() if not p.requires_grad]
            frozen += [name for name, _ in objective.named_buffers()]
            # The frozen weights are the same file on every process (and may be read-only mappings): not broadcast.
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, frozen)
            self.model = nn.parallel.DistributedDataParallel(
                objective, device_ids=[device] if device.type == "cuda" else None)

    # -- the checkpoint ----------------------------------------------------------------------------------------

    def state(self, step: int) -> dict:
        return {"step": step, "trained": {name: p.detach().cpu() for name, p in self.trained.items()},
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "ema": self.ema,
                "rng": torch.get_rng_state()}

    def restore(self, state: dict) -> int:
        from wurst.errors import CheckpointError

        trained = state.get("trained", {})
        if set(trained) != set(self.trained) or any(trained[n].shape != p.shape for n, p in self.trained.items()):
            raise CheckpointError(f"{Path(self.args.out) / 'checkpoint.pt'} holds other weights than this job "
                                  "trains: remove it to start the job over")
        with torch.no_grad():
            for name, p in self.trained.items():
                p.copy_(trained[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.ema = state["ema"]
        torch.set_rng_state(state["rng"])
        return state["step"]

    # -- one step ----------------------------------------------------------------------------------------------

    def step(self, step: int) -> float:
        """Train step `step` (1-based); returns the global batch's mean loss."""
        args, batch = self.args, self.order.batch(step - 1)
        per_micro = args.batch_size // (args.gradient_accumulation * self.world)
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: nccl reduces nothing else
        for m in range(args.gradient_accumulation):
            ks = [(m * self.world + self.rank) * per_micro + j for j in range(per_micro)]
            last = m == args.gradient_accumulation - 1
            sync = self.model.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with sync:
                losses = self.model(**self.micro_batch(step, ks, batch))
                (losses.sum() * (self.world / args.batch_size)).backward()
            total += losses.detach().double().sum()
        if self.world > 1:
            dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(self.trained.values(), args.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for name, p in self.trained.items():
                    self.ema[name].lerp_(p.detach().float().to(self.ema[name].device), 1 - args.ema_decay)
        return float(total) / args.batch_size

    def micro_batch(self, step: int, ks: list[int], batch: list[int]) -> dict:
        latents = torch.stack([self.cache.latent(batch[k]) for k in ks])
        recipe = self.objective.recipe
        draws = [draw(seed=self.args.seed, step=step, k=k, latent_shape=tuple(latents.shape[1:]), recipe=recipe)
                 for k in ks]
        inputs = {"latents": latents.to(self.device), "noise": torch.stack([d.noise for d in draws]).to(self.device),
                  "t": torch.tensor([d.t for d in draws], dtype=torch.float32, device=self.device)}
        if self.objective.text_encoder is None:
            text = [self.cache.text(None if d.drop_caption else batch[k]) for d, k in zip(draws, ks, strict=True)]
            inputs["text"] = torch.stack(text).to(self.device)
        else:
            captions = ["" if d.drop_caption else self.samples[batch[k]].caption
                        for d, k in zip(draws, ks, strict=True)]
            ids, mask = self.pipe.tokenizer(captions)
            inputs.update(token_ids=ids.to(self.device), token_mask=mask.to(self.device))
        return inputs

    # -- outputs -----------------------------------------------------------------------------------------------

    def write_outputs(self, out: Path) -> None:
        if self.args.full:
            outputs.write_full_output(out, pipe=self.pipe, ema=self.ema)
        else:
            outputs.write_lora_output(out, prior=self.pipe.prior, text_encoder=self.objective.text_encoder,
                                      ema=self.ema)


def train(args: argparse.Namespace, *, samples: list[Sample], settings: dict, device: torch.device,
          dtype: torch.dtype, rank: int, world: int) -> None:
    from tqdm.auto import tqdm

    from wurst.runtime.distributed import decided_by_rank_zero
    from wurst.runtime.training_memory import check_training_memory
    from wurst.train.app import write_progress

    out = Path(args.out)
    pipe, encoder = load_models(args, device, dtype)

    validation = []  # rank 0's, where there are validation prompts

    def prepare() -> None:
        """Rank 0: what can still refuse the run, checked before anything is written; then job.json."""
        if not args.full:
            chosen_layers("prior", pipe.prior, lora_targets(args))
        if not args.force:
            check_training_memory(args, pipe=pipe, samples=samples, device=device, dtype=dtype, world=world)
        if args.validation_prompt:
            validation.append(Validation(args, pipe=pipe))
        start_folder(out, settings)

    decided_by_rank_zero(prepare, rank, world)
    validation = validation[0] if validation else None
    cache = EncodedCache(out / "cache", with_text=not args.train_text_encoder)
    fill_cache(cache, samples, pipe=pipe, encoder=encoder, device=device, dtype=dtype, rank=rank, world=world)
    del encoder
    objective, trained = trainable_objective(args, pipe, dtype)
    trainer = Trainer(args, samples=samples, pipe=pipe, objective=objective, trained=trained, cache=cache,
                      device=device, rank=rank, world=world)
    state = load_checkpoint(out)
    start = trainer.restore(state) if state is not None else 0
    del state
    metrics = Metrics(out, after_step=start) if rank == 0 else None
    writer = tensorboard_writer(out) if rank == 0 and args.report_to == "tensorboard" else None
    bar = tqdm(total=args.steps, initial=start, desc="train", unit="step", disable=rank != 0)
    for step in range(start + 1, args.steps + 1):
        began = time.perf_counter()
        loss = trainer.step(step)
        lr = trainer.schedule.get_last_lr()[0]
        if rank == 0:
            metrics.append({"step": step, "loss": loss, "lr": lr, "seconds": round(time.perf_counter() - began, 4)})
            if writer is not None:
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr, step)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # drawn by update, at most every 0.1 s
            bar.update(1)
            if step % args.checkpoint_every == 0 or step == args.steps:
                save_checkpoint(out, trainer.state(step))
                write_progress(out, step=step, finished=False)
            every = args.validation_every
            if validation is not None and step < args.steps and every and step % every == 0:
                validation.draw(out, step)
    bar.close()
    if rank == 0:
        trainer.write_outputs(out)
        if validation is not None:
            validation.draw(out, args.steps)
        write_progress(out, step=args.steps, finished=True)
        metrics.close()
        if writer is not None:
            writer.close()
    if world > 1:
        dist.barrier()


class Validation:
    """Validation images from the combined pipeline: the prior pipeline being trained, and the decoder (loaded
    when it runs: low-memory mode)."""

    def __init__(self, args: argparse.Namespace, *, pipe):
        from wurst.pipelines.combined import WuerstchenCombinedPipeline
        from wurst.pipelines.decoder import WuerstchenDecoderPipeline

        decoder = WuerstchenDecoderPipeline.from_pretrained(args.decoder, torch_dtype=pipe.dtype, low_memory=True)
        self.pipe = WuerstchenCombinedPipeline.from_pipes(pipe, decoder)
        self.pipe.set_progress_bar_config(disable=True)
        self.args = args

    def draw(self, out: Path, step: int) -> None:
        outputs.write_validation_images(out, pipe=self.pipe, prompts=self.args.validation_prompt, step=step,
                                        resolution=self.args.resolution, seed=self.args.seed)


def tensorboard_writer(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"))
