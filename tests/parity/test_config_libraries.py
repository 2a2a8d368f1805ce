"""UNet, VAE and CLIP configs against the reference libraries: parameter names and shapes, and files they load."""
import json
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from mlx.utils import tree_flatten
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from mlx_unet import PRESETS, CLIPTextConfig, UNet2DConditionModel, UNetConfig, VAEConfig
from mlx_unet.weights import torch_to_mlx_layout


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_names_and_shapes_match_diffusers(preset):
    """The whole point of mirroring diffusers: a converted checkpoint loads by plain key match."""
    config = UNetConfig.from_preset(preset)
    with torch.device("meta"):
        reference = TorchUNet(**config.to_diffusers_dict())
    # A zero-strided stand-in of each tensor's shape: meta tensors have no data to lay out.
    theirs = {k: torch_to_mlx_layout(np.broadcast_to(np.float32(0), v.shape)).shape
              for k, v in reference.state_dict().items()}
    ours = {k: v.shape for k, v in tree_flatten(UNet2DConditionModel(config).parameters())}
    assert ours.keys() == theirs.keys()
    assert {k: tuple(v) for k, v in ours.items()} == {k: tuple(v) for k, v in theirs.items()}


def test_the_libraries_load_our_config_files(tmp_path):
    """diffusers and transformers read past our section, and what they read back is accepted."""
    for name, config, library in (("unet", UNetConfig.from_preset("tiny"), TorchUNet),
                                  ("vae", VAEConfig.from_preset("tiny"), TorchVAE)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config.to_dict()))
        loaded = library.load_config(tmp_path / name)
        with torch.device("meta"):
            theirs = library.from_config(loaded)
        assert type(config).from_dict(dict(theirs.config)) == config
    config = CLIPTextConfig.from_preset("tiny-clip-l")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(config.to_dict()))
    assert CLIPTextConfig.from_dict(TorchCLIPTextConfig.from_pretrained(tmp_path / "text_encoder").to_dict()) == config
