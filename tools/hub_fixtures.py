"""Random-weight checkpoints in the exact layout of the hub repositories warp-ai/wuerstchen-prior and
warp-ai/wuerstchen, written with diffusers' and transformers' own classes and save_pretrained.

Two sizes: "tiny" (a few MB, seconds to build) and "published" (the real configs from configs/, about 12 GB).
Both are built once per machine into a cache directory outside the repository ($WURST_FIXTURES, default
~/.cache/wurst/fixtures), one component at a time, so a test only pays for the components it uses.

Every parameter and persistent buffer is re-randomised, including those diffusers initialises to zero (GRN
gamma/beta, timestep mappers, output heads, Paella gammas): a zero there makes a block an identity and a
parity test blind to it.

    python -m tools.hub_fixtures --size published            # build everything, print the two repo paths
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "warp-ai"
BPE_VOCAB = Path(__file__).resolve().parent / "data" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"

# repo key -> (hub name, components)
REPOS = {
    "prior": ("wuerstchen-prior", ("prior", "text_encoder", "tokenizer", "scheduler")),
    "decoder": ("wuerstchen", ("decoder", "vqgan", "text_encoder", "tokenizer", "scheduler")),
}


def _tiny_clip(width: int, layers: int, heads: int) -> dict:
    published = json.loads((CONFIGS / "wuerstchen-prior" / "text_encoder" / "config.json").read_text())
    return {**published, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "projection_dim": width}


# Tiny configs keep every structural feature of the published ones (all four decoder levels, attention,
# effnet injection, both text widths different, so a prior/decoder mix-up shows as a shape error).
TINY = {
    "prior": {
        "prior": {"c_in": 16, "c": 32, "c_cond": 32, "c_r": 16, "depth": 2, "nhead": 2, "dropout": 0.1},
        "text_encoder": _tiny_clip(32, 2, 4),
    },
    "decoder": {
        "decoder": {"c_in": 4, "c_out": 4, "c_r": 16, "patch_size": 2, "c_cond": 32, "c_hidden": [16, 32, 32, 32],
                    "nhead": [-1, 2, 2, 2], "blocks": [1, 1, 2, 1], "level_config": ["CT", "CTA", "CTA", "CTA"],
                    "inject_effnet": [False, True, True, True], "effnet_embd": 16, "clip_embd": 24,
                    "kernel_size": 3, "dropout": 0.1},
        "vqgan": {"in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2, "levels": 2,
                  "bottleneck_blocks": 2, "embed_dim": 16, "latent_channels": 4, "num_vq_embeddings": 64,
                  "scale_factor": 0.3764},
        "text_encoder": _tiny_clip(24, 2, 2),
    },
}

# Output heads get a smaller gain. For the prior it keeps (x - a) / (|1 - b| + 1e-5) away from a zero divisor
# and keeps a random-weight sampling chain from being chaotic: at gain 0.25 diffusers disagreed with itself by
# 1e-4 after 29 guided steps merely from swapping its attention kernel; at 0.1 by 3e-7. A bug in the body still
# moves the output by ~0.1 relative, far above every tolerance.
# Output biases get an offset on part of their channels: name -> (first fraction left alone, offset).
# - Stage B's head gives (a, b), noise = (x - a) / (sigmoid(b)·0.998 + 0.001). Raising the b half by 3 makes
#   sigmoid(b) ≈ 0.95, so the model predicts noise ≈ x - a as a trained denoiser does at high noise. Left at
#   sigmoid(b) ≈ 0.5 it predicts ≈ 2x, and a short sampling chain blows its latents up ~40-fold.
# - The VQGAN's output conv gets a small gain and a bias centred on 0.5, so that decoded images sit mid-range
#   (std about 0.1) instead of half of them clamped at 0, where a parity test could not see them.
HEAD_GAIN = {"out.1.weight": 0.1, "clf.1.weight": 0.5, "out_block.0.weight": 0.3}
HEAD_OFFSET = {"clf.1.bias": (0.5, 3.0), "out_block.0.bias": (0.0, 0.5)}

SEEDS = {"prior": 1, "decoder": 2, "vqgan": 3, "prior/text_encoder": 4, "decoder/text_encoder": 5}


def component_config(repo: str, component: str, size: str) -> dict:
    if size == "tiny":
        return dict(TINY[repo][component])
    path = CONFIGS / REPOS[repo][0] / component / "config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------------
# Randomisation


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, head_gain: dict[str, float] | None = None) -> None:
    """Give every persistent parameter and buffer a random value of a sensible scale: matrices and kernels
    N(0, gain^2 / fan_in); norm weights 1 + N(0, 0.1^2); biases, GRN gamma/beta and Paella gammas N(0, 0.1^2);
    BatchNorm running statistics a random mean and a positive variance."""
    generator = torch.Generator().manual_seed(seed)
    head_gain = head_gain or {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        leaf = name.rsplit(".", 1)[-1]
        if not tensor.is_floating_point():
            tensor.copy_(torch.randint(1, 1000, tensor.shape, generator=generator))
        elif leaf == "running_var":
            tensor.uniform_(0.5, 1.5, generator=generator)
        elif tensor.ndim >= 2 and leaf not in ("gamma", "beta"):
            fan_in = tensor[0].numel()
            tensor.normal_(0.0, head_gain.get(name, 1.0) / math.sqrt(fan_in), generator=generator)
        elif leaf == "weight":
            tensor.normal_(1.0, 0.1, generator=generator)
        else:
            tensor.normal_(0.0, 0.1, generator=generator)
        if name in HEAD_OFFSET:
            left_alone, offset = HEAD_OFFSET[name]
            tensor[int(left_alone * len(tensor)) :] += offset


# ---------------------------------------------------------------------------------------------------------
# Components


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The real 49,408-token CLIP BPE vocabulary, rebuilt from OpenAI's merge list the way CLIP does:
    the 256 byte symbols, the same with the end-of-word mark, one token per merge, then the two specials."""
    lines = gzip.open(BPE_VOCAB).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    byte_symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408 == len(set(tokens))
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, layout: str = "json", pad_token: str = "<|endoftext|>") -> None:
    """layout "json": tokenizer.json + tokenizer_config.json, as transformers 5 saves it. layout "legacy":
    vocab.json + merges.txt + special_tokens_map.json + tokenizer_config.json (with AddedToken dicts), as the
    transformers 4 era hub repositories hold them."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              pad_token=pad_token, model_max_length=77)
    if layout == "json":
        tokenizer.save_pretrained(folder)
        for name in ("vocab.json", "merges.txt"):
            (folder / name).unlink()
    elif layout == "legacy":
        def added(content: str) -> dict:
            return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                    "rstrip": False, "single_word": False}
        config = {"add_prefix_space": False, "bos_token": added("<|startoftext|>"),
                  "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": added("<|endoftext|>"),
                  "errors": "replace", "model_max_length": 77, "pad_token": pad_token,
                  "tokenizer_class": "CLIPTokenizer", "unk_token": added("<|endoftext|>")}
        special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
                   "pad_token": pad_token, "unk_token": added("<|endoftext|>")}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    else:
        raise ValueError(f"unknown tokenizer layout {layout!r}")


def write_text_encoder(folder: Path, config: dict, seed: int, key_style: str = "hub") -> None:
    """key_style "hub": names prefixed with "text_model.", as the warp-ai files (saved by transformers 4)
    carry them. "transformers5": exactly what transformers 5's save_pretrained writes (no prefix), sharded
    when `shard` is given."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    randomize_(model, seed)
    if key_style == "hub":
        model.config.save_pretrained(folder)
        state = {"text_model." + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif key_style.startswith("transformers5"):
        shard = key_style.partition(":")[2] or "50GB"
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        raise ValueError(f"unknown key style {key_style!r}")


def write_component(repo_dir: Path, repo: str, component: str, size: str, tokenizer_layout: str) -> None:
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    folder = repo_dir / component
    if component == "tokenizer":
        write_tokenizer(folder, tokenizer_layout)
        return
    if component == "scheduler":
        DDPMWuerstchenScheduler().save_pretrained(folder)
        return
    config = component_config(repo, component, size)
    if component == "text_encoder":
        write_text_encoder(folder, config, SEEDS[f"{repo}/text_encoder"])
        return
    model_cls = {"prior": WuerstchenPrior, "decoder": WuerstchenDiffNeXt, "vqgan": PaellaVQModel}[component]
    model = model_cls(**config).eval()
    randomize_(model, SEEDS[component], HEAD_GAIN)
    model.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# The cache


def fixture_root() -> Path:
    return Path(os.environ.get("WURST_FIXTURES", Path.home() / ".cache" / "wurst" / "fixtures"))


def _digest() -> str:
    """Changes whenever what the fixtures would contain could change."""
    import diffusers
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(CONFIGS.rglob("*.json")):
        h.update(path.read_bytes())
    h.update(f"{diffusers.__version__} {transformers.__version__} {torch.__version__}".encode())
    return h.hexdigest()[:12]


def ensure(size: str, repo: str, components: tuple[str, ...] | None = None) -> Path:
    """Return the directory of one hub-layout repo ("prior" or "decoder") at `size`, building the requested
    components (default: all) if they are not cached yet."""
    hub_name, all_components = REPOS[repo]
    base = fixture_root()
    root = base / f"{size}-{_digest()}"
    repo_dir = root / hub_name
    repo_dir.mkdir(parents=True, exist_ok=True)
    for stale in base.glob(f"{size}-*"):  # an older builder's output: up to 12 GB each
        if stale != root:
            shutil.rmtree(stale, ignore_errors=True)
    shutil.copyfile(CONFIGS / hub_name / "model_index.json", repo_dir / "model_index.json")
    if (CONFIGS / hub_name / "README.md").is_file():  # the decoder's model card, which names its prior
        shutil.copyfile(CONFIGS / hub_name / "README.md", repo_dir / "README.md")
    # The prior repo carries the tokenizer.json layout and the decoder repo the older vocab/merges layout,
    # so that the pipeline exercises both.
    layout = "json" if repo == "prior" else "legacy"
    for component in components or all_components:
        done = repo_dir / f".{component}.complete"  # outside the folder, which stays exactly as the hub's
        if done.exists():
            continue
        partial = repo_dir / f".{component}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        print(f"building {size} {hub_name}/{component} in {repo_dir}", file=sys.stderr, flush=True)
        write_component(partial, repo, component, size, layout)
        shutil.rmtree(repo_dir / component, ignore_errors=True)
        (partial / component).rename(repo_dir / component)
        partial.rmdir()
        done.touch()
    return repo_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "published"), default="tiny")
    parser.add_argument("--repo", choices=tuple(REPOS), action="append", help="default: both")
    parser.add_argument("--component", action="append", help="default: all of the repo's")
    args = parser.parse_args()
    for repo in args.repo or REPOS:
        wanted = tuple(c for c in args.component if c in REPOS[repo][1]) if args.component else None
        print(ensure(args.size, repo, wanted))


if __name__ == "__main__":
    main()


def offline_hub_cache(cache_dir: Path, size: str = "tiny") -> Path:
    """A Hugging Face hub cache (the layout of HF_HUB_CACHE) holding the fixtures under the real hub ids,
    warp-ai/wuerstchen-prior and warp-ai/wuerstchen, so that code naming those ids runs offline on them.
    Each snapshot is a link to the fixture folder. Returns cache_dir."""
    commit = "0" * 40
    for repo in REPOS:
        hub_name = REPOS[repo][0]
        repo_cache = cache_dir / f"models--warp-ai--{hub_name}"
        (repo_cache / "refs").mkdir(parents=True, exist_ok=True)
        (repo_cache / "refs" / "main").write_text(commit)
        (repo_cache / "snapshots").mkdir(exist_ok=True)
        snapshot = repo_cache / "snapshots" / commit
        if not snapshot.exists():
            snapshot.symlink_to(ensure(size, repo), target_is_directory=True)
    return cache_dir
