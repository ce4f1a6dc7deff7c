"""Load an adaptor folder for a serving engine, with exactly the checks of ``lemoe_engine.load``.

A serving engine builds its own model classes, so there is no Hugging Face model to call
``lemoe_engine.load`` on. ``load_adaptor_layer`` calls it on a weightless stand-in with the
model's Hugging Face config (architecture, width, depth): the adaptor is read, verified
(format version, checksums, base-model identity, shapes, values) and put into a LEMoELayer,
which the engine then uses as the holder of routing state and expert weights.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn

from ..layer import LEMoELayer
from ..patching import SUPPORTED_ARCHITECTURES, detach
from ..storage import load


class _Block(nn.Module):
    def __init__(self, device, dtype) -> None:
        super().__init__()
        self.mlp = _NoMLP(device, dtype)


class _NoMLP(nn.Module):
    """Stands in for a decoder layer's MLP: its one parameter tells ``attach`` device and dtype."""

    def __init__(self, device, dtype) -> None:
        super().__init__()
        self.marker = nn.Parameter(torch.zeros(1, device=device, dtype=dtype), requires_grad=False)


class _Decoder(nn.Module):
    def __init__(self, num_layers: int, device, dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(device, dtype) for _ in range(num_layers))
        self.embed_tokens = nn.Identity()
        self.norm = nn.Identity()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):  # pragma: no cover
        raise RuntimeError("a stand-in model is never called")


class ConfigOnlyModel(nn.Module):
    """A model with a Hugging Face config and the module layout ``attach`` expects, no weights."""

    def __init__(self, hf_config: Any, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = hf_config
        layers_path = SUPPORTED_ARCHITECTURES.get(getattr(hf_config, "model_type", None), ("model.layers",))[0]
        if layers_path != "model.layers":  # pragma: no cover - only decoder-stack families are served
            raise ValueError(f"{hf_config.model_type} models cannot be served with LEMoE")
        self.model = _Decoder(int(hf_config.num_hidden_layers), device, dtype)

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens


def load_adaptor_layer(hf_config: Any, path: Union[str, os.PathLike], device=None,
                       dtype: torch.dtype = torch.float32, backend: str = "auto", tokenizer: Any = None) -> LEMoELayer:
    """The adaptor in folder ``path``, checked against a model with config ``hf_config``, as a
    LEMoELayer on ``device`` (expert weights in ``dtype`` unless the adaptor fixes one), with its
    question gate on when its config says so (``tokenizer``: default, the model folder's).
    Raises AdaptorError (or UnsupportedModelError) exactly where ``lemoe_engine.load`` would."""
    stand_in = ConfigOnlyModel(hf_config, device=device, dtype=dtype)
    layer = load(stand_in, path, backend=backend, tokenizer=tokenizer)
    detach(stand_in)  # drop the hooks: the engine feeds the layer itself
    layer.eval()
    return layer


def hf_config_of(model_folder: Union[str, os.PathLike], overrides: Optional[dict] = None) -> Any:
    """The Hugging Face config of a local model folder (no weights are read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_folder), local_files_only=True)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config
