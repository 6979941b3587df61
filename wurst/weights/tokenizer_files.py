"""The tokenizer's files: a hub `tokenizer/` folder read into a models.tokenizer.CLIPTokenizer, and written from one.
Two layouts exist on the hub: `tokenizer.json` (the whole pipeline, serialised), and the older `vocab.json` +
`merges.txt`; either has `tokenizer_config.json` / `special_tokens_map.json` beside it, read as transformers reads
them."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from wurst.errors import ConfigError, ModelNotFoundError
from wurst.models.tokenizer import BOS, DEFAULT_MAX_LENGTH, EOS, CLIPTokenizer, clip_bpe
from wurst.weights.configs import read_json, read_text


def _token_text(value: object) -> str | None:
    """Special tokens appear either as plain strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = read_text(path).splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise ConfigError(f"{path} is malformed: every line must hold two symbols")
    return merges  # type: ignore[return-value]


def read_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The CLIPTokenizer of a hub `tokenizer/` folder: tokenizer.json, or vocab.json + merges.txt, with the
    padding, special tokens and maximum length its tokenizer_config.json / special_tokens_map.json give."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"tokenizer folder not found: {folder}")
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        if (folder / name).exists():  # a pipe or a device there is refused by read_json, not skipped
            settings.update(read_json(folder / name))
    pad = _token_text(settings.get("pad_token")) or EOS
    unk = _token_text(settings.get("unk_token")) or EOS
    bos = _token_text(settings.get("bos_token")) or BOS
    eos = _token_text(settings.get("eos_token")) or EOS
    max_length = settings.get("model_max_length")
    if not isinstance(max_length, int) or not 0 < max_length <= 4096:  # absent, or transformers' 1e30
        max_length = DEFAULT_MAX_LENGTH
    source = folder / "tokenizer.json"
    if source.exists():
        try:
            tokenizer = Tokenizer.from_str(read_text(source))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ConfigError(f"{source} cannot be read: {e}") from e
    elif (folder / "vocab.json").exists():
        source = folder / "vocab.json"
        tokenizer = clip_bpe(read_json(source), _read_merges(folder / "merges.txt"), unk)
    else:
        raise ModelNotFoundError(f"{folder} holds neither tokenizer.json nor vocab.json + merges.txt")
    # transformers matches every configured special token whole, before BPE (so with pad "!", "!!!" is
    # three pad-token ids, not one "!!!" merge); do the same.
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys((bos, eos, unk, pad))])
    check_tokenizes(tokenizer, source)
    return CLIPTokenizer(tokenizer, pad, max_length)


def check_tokenizes(tokenizer: Tokenizer, source: Path) -> None:
    """A tokenizer of another kind (WordPiece, Unigram, WordLevel) loads, then fails or gives ids the text encoder
    was not trained on: refuse it now, and any that cannot tokenize a prompt, rather than at the first prompt."""
    kind = type(tokenizer.model).__name__
    if kind != "BPE":
        raise ConfigError(f"{source} holds a {kind} tokenizer, not CLIP's BPE: it belongs to another model")
    try:
        tokenizer.encode("A photo of 2 cats, 猫 & ✓!")
    except Exception as e:  # the tokenizers library's errors are bare Exceptions
        raise ConfigError(f"{source} cannot tokenize a prompt ({str(e).splitlines()[0] if str(e) else e!r})") from e


def write_tokenizer(folder: str | Path, tokenizer: CLIPTokenizer) -> None:
    """A `tokenizer/` folder in both layouts, which read_tokenizer and transformers' CLIPTokenizer read back as
    `tokenizer`: tokenizer.json, vocab.json + merges.txt (for a BPE model), and tokenizer_config.json /
    special_tokens_map.json with the published repositories' fields, naming the special tokens the pipeline uses."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    serialised = tokenizer.tokenizer.to_str()
    (folder / "tokenizer.json").write_text(serialised, encoding="utf-8")
    pipeline = json.loads(serialised)
    if (pipeline.get("model") or {}).get("type") == "BPE":
        tokenizer.tokenizer.model.save(str(folder))  # vocab.json and merges.txt
    ends = pipeline.get("post_processor") or {}  # CLIP's: RobertaProcessing, with cls (start) and sep (end)
    bos = (ends.get("cls") or [BOS])[0]
    eos = (ends.get("sep") or [EOS])[0]
    special = {"bos_token": bos, "eos_token": eos, "pad_token": tokenizer.pad_token,
               "unk_token": (pipeline.get("model") or {}).get("unk_token") or eos}
    config = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": tokenizer.max_length, "tokenizer_class": "CLIPTokenizer",
              **special}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
