"""CLIP BPE tokenizer on the `tokenizers` library, loaded from a hub `tokenizer/` folder.

Two folder layouts exist on the hub: a `tokenizer.json` (the whole pipeline, serialised), and the older
`vocab.json` + `merges.txt` with `tokenizer_config.json` / `special_tokens_map.json`. For the second we
assemble the same pipeline CLIP uses: NFC, whitespace runs collapsed, lower-case; CLIP's split pattern;
byte-level BPE with a `</w>` end-of-word suffix; and `<|startoftext|> ... <|endoftext|>` around the ids.
Padding and the maximum length come from the folder's config, as transformers reads them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from wurst.errors import ConfigError, ModelNotFoundError
from wurst.weights.configs import read_json

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77  # CLIP's context length, when the folder does not say

# Contractions, letter runs, single digits, and runs of anything else; whitespace is dropped.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and its tail was cut."""


def _token_text(value: object) -> str | None:
    """Special tokens appear either as plain strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_from_vocab(folder: Path, unk: str) -> Tokenizer:
    vocab = read_json(folder / "vocab.json")
    merges_path = folder / "merges.txt"
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"missing file: {merges_path}") from e
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise ConfigError(f"{merges_path} is malformed: every line must hold two symbols")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # Arguments: sep (end), cls (start), trim_offsets, add_prefix_space.
    tok.post_processor = processors.RobertaProcessing((EOS, tok.token_to_id(EOS)), (BOS, tok.token_to_id(BOS)),
                                                      False, False)
    return tok


class CLIPTokenizer:
    """Turns prompts into fixed-length id and attention-mask tensors, padded to `max_length`."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str, max_length: int):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ConfigError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_token, self.pad_id, self.max_length = pad_token, pad_id, max_length

    @classmethod
    def from_dir(cls, folder: str | Path) -> CLIPTokenizer:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"tokenizer folder not found: {folder}")
        settings: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (folder / name).is_file():
                settings.update(read_json(folder / name))
        pad = _token_text(settings.get("pad_token")) or EOS
        unk = _token_text(settings.get("unk_token")) or EOS
        bos = _token_text(settings.get("bos_token")) or BOS
        eos = _token_text(settings.get("eos_token")) or EOS
        max_length = settings.get("model_max_length")
        if not isinstance(max_length, int) or not 0 < max_length <= 4096:  # absent, or transformers' 1e30
            max_length = DEFAULT_MAX_LENGTH
        if (folder / "tokenizer.json").is_file():
            try:
                tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises a bare Exception on bad files
                raise ConfigError(f"{folder / 'tokenizer.json'} cannot be read: {e}") from e
        elif (folder / "vocab.json").is_file():
            tokenizer = _tokenizer_from_vocab(folder, unk)
        else:
            raise ModelNotFoundError(f"{folder} holds neither tokenizer.json nor vocab.json + merges.txt")
        # transformers matches every configured special token whole, before BPE (so with pad "!", "!!!" is
        # three pad-token ids, not one "!!!" merge); do the same.
        tokenizer.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys((bos, eos, unk, pad))])
        return cls(tokenizer, pad, max_length)

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (input_ids, attention_mask), each (len(prompts), max_length) int64."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encodings = self.tokenizer.encode_batch(list(prompts))
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.max_length), dtype=torch.long)
        for row, enc in enumerate(encodings):
            tokens = enc.ids
            if len(tokens) > self.max_length:
                # Keep the head of the prompt and the closing end-of-text token, as CLIP was trained.
                cut = len(tokens) - self.max_length
                dropped = self.tokenizer.decode(tokens[self.max_length - 1 : -1]).replace("</w>", " ").strip()
                warnings.warn(
                    f"prompt is {len(tokens)} tokens, over the limit of {self.max_length}: "
                    f"the last {cut} tokens were cut ({dropped!r})",
                    PromptTruncatedWarning,
                    stacklevel=2,
                )
                tokens = tokens[: self.max_length - 1] + tokens[-1:]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"CLIPTokenizer(pad_token={self.pad_token!r}, max_length={self.max_length})"
