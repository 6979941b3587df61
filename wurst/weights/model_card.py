"""A decoder repository's model card (README.md): the prior its front matter names under `prior:`, which is how
diffusers' combined pipeline finds the prior, read and written."""

from __future__ import annotations

from pathlib import Path

from wurst.errors import ConfigError, ModelNotFoundError
from wurst.weights.repository import KINDS, MODEL_CARD


def card_metadata(card: Path) -> dict:
    """The front matter of a model card (README.md), {} where there is none."""
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(card)
    except Exception as e:  # a malformed YAML front matter; its parser's errors have no common base
        raise ConfigError(f"{card} has unreadable front matter ({type(e).__name__})") from e
    return metadata if isinstance(metadata, dict) else {}


def card_prior(decoder_folder: Path) -> str | None:
    """The prior a decoder repository's model card names (README.md front matter, `prior:`), as written there;
    None when there is no card or it names none."""
    card = decoder_folder / MODEL_CARD
    named = card_metadata(card).get("prior") if card.is_file() else None
    if isinstance(named, list):
        named = named[0] if named else None
    return named if isinstance(named, str) and named else None


def kept_prior(decoder_folder: Path) -> str | None:
    """The prior that a copy of this decoder repository saved elsewhere names in its card: the card's hub id or
    absolute path. None for a path relative to the folder (the copy does not carry that prior), or no card."""
    try:
        named = card_prior(decoder_folder)
    except ConfigError:  # an unreadable card does not stop the decoder loading; the copy gets none
        return None
    if named is None or (not Path(named).is_absolute() and (decoder_folder / named).is_dir()):
        return None
    return named


def prior_of(decoder_folder: Path) -> str:
    """The prior a decoder repository names in its model card (README.md front matter, `prior:`), as
    diffusers finds it for the combined pipeline. A relative path is taken from the decoder's folder."""
    named = card_prior(decoder_folder)
    if named is None:
        default = KINDS["prior"].default
        raise ModelNotFoundError(
            f"{decoder_folder} has no model card naming its prior (README.md front matter `prior: [{default}]`): "
            f"pass prior_repo='{default}' (or a local prior directory), or add such a card"
        )
    local = decoder_folder / named
    return str(local) if local.is_dir() else named


def card_text(old: Path, prior: str) -> str:
    """A decoder's model card naming `prior`: the card saved over with its `prior:` set, or a new one."""
    from huggingface_hub import ModelCard, ModelCardData

    if old.is_file():
        card_metadata(old)  # an unreadable front matter is refused, naming the card
        card = ModelCard(old.read_text(encoding="utf-8"))
        card.data.prior = [prior]
        return str(card)
    data = ModelCardData(prior=[prior], tags=["text-to-image", "wuerstchen"])
    return f"---\n{data.to_yaml()}\n---\n\nA Würstchen decoder saved by wurst; its prior is `{prior}`.\n"
