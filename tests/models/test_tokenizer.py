"""Tokenizer parity with transformers' CLIPTokenizer on the same files, for both hub folder layouts and both
pad tokens seen on the hub, using the real 49,408-token CLIP vocabulary."""

import warnings

import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer

from tests.prompts import LONG, PROMPTS
from tools.hub_fixtures import write_tokenizer
from wurst import PromptTruncatedWarning
from wurst.weights.tokenizer_files import read_tokenizer

CASES = [(layout, pad) for layout in ("json", "legacy") for pad in ("<|endoftext|>", "!")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{layout}-pad{pad}" for layout, pad in CASES])
def tokenizer_dir(request, tmp_path_factory):
    layout, pad = request.param
    folder = tmp_path_factory.mktemp(f"tok-{layout}")
    write_tokenizer(folder, layout, pad)
    return folder, layout, pad


def test_layout_files(tokenizer_dir):
    folder, layout, _ = tokenizer_dir
    names = {p.name for p in folder.iterdir()}
    if layout == "json":
        assert names == {"tokenizer.json", "tokenizer_config.json"}
    else:
        assert names == {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}


def test_ids_and_masks_match_transformers(tokenizer_dir):
    folder, _, pad = tokenizer_dir
    assert len(PROMPTS) >= 50
    ours = read_tokenizer(folder)
    ref = HFCLIPTokenizer.from_pretrained(folder)
    assert ref.pad_token == pad and ours.pad_token == pad and ours.pad_id == ref.pad_token_id
    assert ours.max_length == ref.model_max_length == 77
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ids, mask = ours(PROMPTS)
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    for i, prompt in enumerate(PROMPTS):
        assert ids[i].tolist() == expected["input_ids"][i].tolist(), prompt
        assert mask[i].tolist() == expected["attention_mask"][i].tolist(), prompt


def test_single_prompt_and_vocabulary_is_real(tokenizer_dir):
    folder, _, pad = tokenizer_dir
    ours = read_tokenizer(folder)
    ids, mask = ours("a photo of a cat")
    # Known ids of the real CLIP vocabulary: a=320, photo=1125, of=539, cat=2368.
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert mask[0].sum().item() == 7
    pad_id = 49407 if pad == "<|endoftext|>" else 0
    assert (ids[0, 7:] == pad_id).all()
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (1, 77)


def test_long_prompt_is_truncated_with_a_warning(tokenizer_dir):
    folder, _, _ = tokenizer_dir
    ours = read_tokenizer(folder)
    full = len(ours.tokenizer.encode(LONG).ids)
    assert full > 77
    with pytest.warns(PromptTruncatedWarning, match=rf"the last {full - 77} tokens were cut") as caught:
        ids, mask = ours([LONG, "short"])
    assert len(caught) == 1 and "trending" not in str(caught[0].message)  # only the tail beyond 75 tokens
    assert mask[0].all() and ids[0, -1].item() == 49407  # full, and closed by end-of-text
    assert mask[1].sum().item() == 3


def test_no_warning_at_exactly_the_limit(tokenizer_dir):
    folder, _, _ = tokenizer_dir
    ours = read_tokenizer(folder)
    prompt = " ".join(["cat"] * 75)  # 75 tokens + start + end = 77
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        ids, mask = ours(prompt)
    assert mask.sum().item() == 77


def test_missing_files_name_the_folder(tmp_path):
    from wurst import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="neither tokenizer.json nor vocab.json"):
        read_tokenizer(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not found"):
        read_tokenizer(tmp_path / "nope")
