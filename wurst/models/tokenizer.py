"""CLIP BPE tokenizer on the `tokenizers` library: prompts -> fixed-length ids and attention masks.

A hub `tokenizer/` folder (read by wurst/weights/tokenizer_files.py) holds either a `tokenizer.json`, the whole
pipeline serialised, or the older `vocab.json` + `merges.txt`. For the second, clip_bpe assembles the pipeline CLIP
uses: NFC, whitespace runs collapsed, lower-case; CLIP's split pattern; byte-level BPE with a `</w>` end-of-word
suffix; and `<|startoftext|> ... <|endoftext|>` around the ids.
"""

from __future__ import annotations

import warnings

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from wurst.errors import ConfigError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77  # CLIP's context length, when the folder does not say

# Contractions, letter runs, single digits, and runs of anything else; whitespace is dropped.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and its tail was cut."""


def clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str) -> Tokenizer:
    """CLIP's tokenizer pipeline around a BPE vocabulary and its merges (the older vocab.json + merges.txt
    layout, where no tokenizer.json spells it out)."""
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
