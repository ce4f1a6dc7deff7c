"""Model patching: put a LEMoELayer in place of one decoder layer's MLP, and take it out again.

Two hooks connect the layer to the model it lives in: a forward hook on the input embedding
module hands it the token embeddings (its query source), and a pre-hook on the decoder stack
tells it the attention mask and whether the call continues sequences already in the KV cache
(then the route decided at the prompt is reused, token after token).
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .config import LEMoEConfig
from .errors import ConfigError, UnsupportedModelError
from .layer import LEMoELayer, RouteContext

# model_type -> attribute paths (relative to the *ForCausalLM model) of the decoder layer list
# and of the final norm before the LM head
SUPPORTED_ARCHITECTURES = {
    "llama": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "gpt2": ("transformer.h", "transformer.ln_f"),
}


def _module_at(model: nn.Module, path: str) -> nn.Module:
    module = model
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no '{path}': pass the *ForCausalLM model")
    return module


def _architecture(model: nn.Module) -> tuple[str, str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    paths = SUPPORTED_ARCHITECTURES.get(model_type)
    if paths is None:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); LEMoE layers can be "
            f"attached to: {', '.join(sorted(SUPPORTED_ARCHITECTURES))} (Hugging Face *ForCausalLM models)")
    return paths


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a supported model."""
    return _module_at(model, _architecture(model)[0])


def layer_index(model: nn.Module, layer: nn.Module) -> int:
    """The position in ``decoder_layers(model)`` of the decoder layer whose MLP is ``layer``."""
    for i, block in enumerate(decoder_layers(model)):
        if block.mlp is layer:
            return i
    raise ConfigError("this adaptor layer is not attached to the model: attach or load it first")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last hidden state before the LM head."""
    return _module_at(model, _architecture(model)[1])


def base_identity(model: nn.Module, index: int) -> dict:
    """What an adaptor must match to be loaded onto ``model``."""
    config = model.config
    return {
        "architecture": config.model_type,
        "hidden_size": int(config.hidden_size),
        "num_layers": len(decoder_layers(model)),
        "layer": index,
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
    }


def find_layer(model: nn.Module) -> Optional[LEMoELayer]:
    """The LEMoELayer attached to ``model``, or None."""
    for module in model.modules():
        if isinstance(module, LEMoELayer):
            return module
    return None


def attach(model: nn.Module, config: Optional[LEMoEConfig] = None) -> LEMoELayer:
    """Replace the target layer's MLP of ``model`` by an (empty) LEMoELayer, in place.

    With no experts the patched model computes exactly what it computed before.
    """
    config = config if config is not None else LEMoEConfig()
    if not isinstance(config, LEMoEConfig):
        raise ConfigError(f"config must be a LEMoEConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"attach expects a torch model, got {type(model).__name__}")
    layers = decoder_layers(model)
    if find_layer(model) is not None:
        raise ConfigError("this model already has a LEMoE adaptor attached: call detach(model) first")
    index = config.resolved_layer(len(layers))
    if config.query_layer is not None and config.query_layer > index:
        raise ConfigError(f"query_source={config.query_source!r} reads decoder layer {config.query_layer}, "
                          f"which comes after the target layer {index}: use a layer <= {index}")
    parent = layers[index]
    base_mlp = getattr(parent, "mlp", None)
    if base_mlp is None:
        raise UnsupportedModelError(f"decoder layer {index} of {type(model).__name__} has no 'mlp' module")
    layer = LEMoELayer(base_mlp, int(model.config.hidden_size), config)
    layer.base_info = base_identity(model, index)
    layer.train(base_mlp.training)  # a new module starts in training mode; follow the model's
    parent.mlp = layer
    layer._handles = _install_hooks(model, layer)  # plain attribute: not part of the module tree
    layer._parent = (parent,)
    return layer


def detach(model: nn.Module) -> nn.Module:
    """Remove the LEMoE adaptor: the original MLP module object is put back. Returns it."""
    layer = find_layer(model)
    if layer is None:
        raise ConfigError("this model has no LEMoE adaptor attached")
    for handle in layer._handles:
        handle.remove()
    layer._parent[0].mlp = layer.base_layer
    return layer.base_layer


def watch_calls(model: nn.Module, callback) -> "torch.utils.hooks.RemovableHandle":
    """Before each forward of ``model``'s decoder stack, call ``callback(attention_mask,
    inputs_embeds, continuing, input_ids)``; ``continuing`` is True when the call extends
    sequences already in its KV cache (a decode step). Returns the hook handle."""
    decoder = model.base_model
    parameters = inspect.signature(decoder.forward).parameters

    def before_decoder(module, args, kwargs):
        bound = dict(zip(parameters, args))
        bound.update(kwargs)
        # transformers < 5.20 names the KV cache past_key_values, later versions cache
        cache = bound.get("past_key_values", bound.get("cache"))
        cached = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            cached = int(cache.get_seq_length())
        elif isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            cached = int(cache[0][0].shape[-2])
        callback(bound.get("attention_mask"), bound.get("inputs_embeds"), cached > 0, bound.get("input_ids"))

    return decoder.register_forward_pre_hook(before_decoder, with_kwargs=True)


def _install_hooks(model: nn.Module, layer: LEMoELayer) -> list:
    """The decoder pre-hook tells the layer about the call; a second hook hands it its query
    source vectors (token embeddings, or the input of decoder layer N)."""

    def on_call(attention_mask, inputs_embeds, continuing, input_ids):
        layer.set_route_context(RouteContext(attention_mask=attention_mask, embeddings=inputs_embeds,
                                             continuing=continuing, input_ids=input_ids))

    def after_embedding(module, args, output):
        layer._context.embeddings = output

    def before_query_layer(module, args, kwargs):
        layer._context.embeddings = args[0] if args else kwargs["hidden_states"]

    handles = [watch_calls(model, on_call)]
    source = layer.config.query_source
    if source == "embedding":
        handles.append(model.get_input_embeddings().register_forward_hook(after_embedding))
    elif layer.config.query_layer is not None:
        block = decoder_layers(model)[layer.config.query_layer]
        handles.append(block.register_forward_pre_hook(before_query_layer, with_kwargs=True))
    return handles


@contextmanager
def query_mask(model: nn.Module, mask: Optional[torch.Tensor]) -> Iterator[None]:
    """Route sequences by the positions where ``mask`` is 1 (the prompt, when scoring
    prompt+target teacher-forced). Applies to every module of ``model`` that routes by the
    prompt (it has a ``query_mask(mask)`` context manager: the LEMoE layer, the GRACE baseline);
    a no-op when there is none."""
    with ExitStack() as stack:
        for module in model.modules():
            if module is not model and callable(getattr(module, "query_mask", None)):
                stack.enter_context(module.query_mask(mask))
        yield


@contextmanager
def adaptors_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as if unedited (the adaptor adds nothing). A no-op when none is attached."""
    layer = find_layer(model)
    if layer is None:
        yield
        return
    previous, layer.disabled = layer.disabled, True
    try:
        yield
    finally:
        layer.disabled = previous
