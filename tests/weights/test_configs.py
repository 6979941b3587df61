"""The published configs in configs/ describe the models the reference notes count, and wurst reads them."""

import json
from pathlib import Path

import pytest
import torch

from tools.hub_fixtures import CONFIGS, REPOS, component_config
from wurst import CLIPTextConfig
from wurst.weights.configs import read_config

# Parameter counts of the published checkpoints (../shared/reference/wuerstchen-in-diffusers.md, section 3).
COUNTS = {
    ("prior", "prior"): 993_636_896,
    ("decoder", "decoder"): 1_055_365_280,
    ("decoder", "vqgan"): 18_406_894,
    ("prior", "text_encoder"): 693_021_440,
    ("decoder", "text_encoder"): 352_984_064,
}


@pytest.mark.parametrize("repo,component", list(COUNTS))
def test_published_parameter_counts(repo, component):
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel

    config = component_config(repo, component, "published")
    with torch.device("meta"):
        if component == "text_encoder":
            model = CLIPTextModel(HFConfig(**config))
        else:
            model_cls = {"prior": WuerstchenPrior, "decoder": WuerstchenDiffNeXt, "vqgan": PaellaVQModel}[component]
            model = model_cls(**config)
    assert sum(p.numel() for p in model.parameters()) == COUNTS[(repo, component)]


def test_every_published_component_has_its_files():
    for hub_name, components in REPOS.values():
        root = CONFIGS / hub_name
        index = json.loads((root / "model_index.json").read_text())
        for component in components:
            assert component in index, (hub_name, component)
            assert any((root / component).iterdir()), (hub_name, component)


def test_text_encoder_configs_read_into_dataclass():
    bigg = read_config(CLIPTextConfig, CONFIGS / "wuerstchen-prior" / "text_encoder" / "config.json")
    vith = read_config(CLIPTextConfig, CONFIGS / "wuerstchen" / "text_encoder" / "config.json")
    assert (bigg.hidden_size, bigg.num_hidden_layers, bigg.num_attention_heads) == (1280, 32, 20)
    assert (vith.hidden_size, vith.num_hidden_layers, vith.num_attention_heads) == (1024, 24, 16)
    assert bigg.hidden_act == vith.hidden_act == "gelu"
    with pytest.raises(AttributeError):
        bigg.hidden_size = 1  # frozen


def test_tokenizer_configs_pad_with_end_of_text():
    for hub_name in ("wuerstchen-prior", "wuerstchen"):
        config = json.loads((CONFIGS / hub_name / "tokenizer" / "tokenizer_config.json").read_text())
        assert config["pad_token"] == "<|endoftext|>" and config["model_max_length"] == 77


def test_published_fixtures_are_built_from_the_configs_in_the_repository():
    """The published-size fixtures take each component's config.json in configs/warp-ai/ (found here from this
    file's place, not through tools.hub_fixtures.CONFIGS), less diffusers' `_`-prefixed bookkeeping, unchanged."""
    root = Path(__file__).resolve().parents[2] / "configs" / "warp-ai"
    components = [("prior", "wuerstchen-prior", "prior"), ("prior", "wuerstchen-prior", "text_encoder"),
                  ("decoder", "wuerstchen", "decoder"), ("decoder", "wuerstchen", "vqgan"),
                  ("decoder", "wuerstchen", "text_encoder")]
    for repo, hub_name, component in components:
        on_disk = json.loads((root / hub_name / component / "config.json").read_text())
        assert component_config(repo, component, "published") == {k: v for k, v in on_disk.items()
                                                                  if not k.startswith("_")}, (repo, component)
    # And they are the published models: Stage C 1536 wide and 32 deep, Stage B's four levels, bigG and ViT-H.
    prior = component_config("prior", "prior", "published")
    assert (prior["c"], prior["depth"], prior["nhead"]) == (1536, 32, 24)
    assert component_config("decoder", "decoder", "published")["c_hidden"] == [320, 640, 1280, 1280]
    assert component_config("decoder", "vqgan", "published")["bottleneck_blocks"] == 12
    assert component_config("prior", "text_encoder", "published")["hidden_size"] == 1280
    assert component_config("decoder", "text_encoder", "published")["hidden_size"] == 1024
