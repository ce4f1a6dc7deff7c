"""LEMoE variants of vLLM's Llama, Mistral and Qwen2 model classes (imported by vLLM only).

The plugin (``lemoe_engine.serving.register``) registers them with
``ModelRegistry.register_model`` as lazy ``"module:Class"`` strings; vLLM builds one when the
model's config names it in ``architectures`` (``load_vllm`` and ``lemoe serve`` set that, and the
adaptor folder, through ``hf_overrides``).

What the classes add to the stock ones:

1. the target decoder layer's MLP keeps its module (so checkpoint weights load by their usual
   names) but its forward becomes ``base MLP + routed experts`` (``RequestRouter.apply``);
2. a forward pre-hook on the query layer keeps that layer's input, which in vLLM's fused-residual
   layout is ``hidden_states + residual`` (the embeddings for layer 0), as the query vectors;
3. vLLM hands a model no request ids, so (as its LoRA path builds its token-to-adapter mapping in
   the model runner) a wrapper of the runner's ``_prepare_inputs`` tells the router, before each
   forward, which rows belong to which request, how many of its tokens are cached, and its
   prompt length.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
import vllm
from torch import nn
from vllm.config import CompilationMode, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .. import question_gate
from ..errors import ConfigError
from .adaptor import load_adaptor_layer
from .batch import RequestRouter, RequestSlice

logger = init_logger(__name__)

ADAPTOR_KEY = "lemoe_adaptor"
"""hf_config attribute (set through hf_overrides) holding the adaptor folder."""
CHECKSUM_KEY = "lemoe_adaptor_sha256"
"""hf_config attribute holding the adaptor's tensors checksum, checked again at load."""
BACKEND_KEY = "lemoe_backend"
QUESTION_GATE_KEY = "lemoe_question_gate"
"""hf_config attribute: "off" or a cosine chosen at load_vllm / lemoe serve (absent: as saved)."""

_ROUTERS: list[RequestRouter] = []  # the router of the LEMoE model built last in this process


def check_engine_config(vllm_config: VllmConfig) -> None:
    """Refuse engine settings under which per-request routing cannot equal the HF path's."""
    problems = []
    if vllm_config.scheduler_config.enable_chunked_prefill:
        problems.append("chunked prefill is on (enable_chunked_prefill=False): a request is routed on its "
                        "whole prompt, so no prompt token can be computed before the last one is seen")
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching is on (enable_prefix_caching=False): the KV of a shared prefix "
                        "depends on the route, which depends on the rest of each prompt")
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        problems.append("torch.compile / CUDA graphs are on (enforce_eager=True): routing keeps "
                        "per-request state on the host")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is on: not supported with a LEMoE adaptor")
    if problems:
        raise ConfigError("LEMoE serving cannot run with these vLLM settings: " + "; ".join(problems)
                          + ". lemoe_engine.serving.load_vllm and `lemoe serve` set them for you.")


def _install_runner_hook() -> None:
    """Wrap GPUModelRunner._prepare_inputs (the CPU runner inherits it) once per process."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_lemoe_wrapped", False):
        return
    parameters = list(inspect.signature(original).parameters)[:3]
    if parameters != ["self", "scheduler_output", "num_scheduled_tokens"]:
        raise ConfigError(f"this vLLM ({vllm.__version__}) has a model runner LEMoE serving does not know "
                          f"(_prepare_inputs{tuple(parameters)}); it is tested with vLLM 0.32")

    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        if _ROUTERS:
            batch = self.input_batch
            num_reqs = batch.num_reqs
            counts = [int(c) for c in num_scheduled_tokens[:num_reqs]]
            computed = batch.num_computed_tokens_cpu[:num_reqs].tolist()
            prompt = batch.num_prompt_tokens[:num_reqs].tolist()
            wants_ids = any(router.layer.route_filter is not None for router in _ROUTERS)
            slices, start = [], 0
            for i, (req_id, count, done, prompt_len) in enumerate(zip(batch.req_ids, counts, computed, prompt)):
                # a new request's prompt tokens, for the question gate
                ids = batch.token_ids_cpu[i, :prompt_len].tolist() if wants_ids and done == 0 else None
                slices.append(RequestSlice(req_id, start, count, int(done), int(prompt_len), ids))
                start += count
            live = self.requests.keys()
            for router in _ROUTERS:
                router.set_plan(slices, live)
        return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    _prepare_inputs._lemoe_wrapped = True
    GPUModelRunner._prepare_inputs = _prepare_inputs


def _tokenizer(model_config) -> Any:
    """The served model's tokenizer (the question gate decodes prompts with it), or None
    (``load_vllm`` / ``lemoe serve`` checked that it loads before the engine started)."""
    if not model_config.tokenizer:
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(model_config.tokenizer, revision=model_config.tokenizer_revision,
                                             trust_remote_code=model_config.trust_remote_code)
    except Exception as error:  # the gate's sync then warns that it is not running
        logger.warning("LEMoE: cannot load the tokenizer %s for the question gate (%s)", model_config.tokenizer,
                       error)
        return None


class LEMoEServingMixin:
    """Turns a stock vLLM causal-LM (``self.model.layers[i].mlp``) into a LEMoE-edited one."""

    def _lemoe_setup(self, vllm_config: VllmConfig) -> None:
        hf_config = vllm_config.model_config.hf_config
        path = getattr(hf_config, ADAPTOR_KEY, None)
        if not path:
            raise ConfigError(f"{type(self).__name__} needs the adaptor folder in hf_overrides "
                              f"({{'{ADAPTOR_KEY}': FOLDER}}): use lemoe_engine.serving.load_vllm or "
                              "`lemoe serve`")
        check_engine_config(vllm_config)
        backend = getattr(hf_config, BACKEND_KEY, None) or "auto"
        device = torch.get_default_device()
        tokenizer = _tokenizer(vllm_config.model_config)
        layer = load_adaptor_layer(hf_config, path, device=device, dtype=vllm_config.model_config.dtype,
                                   backend=backend, tokenizer=tokenizer)
        chosen = getattr(hf_config, QUESTION_GATE_KEY, None)  # load_vllm(question_gate=...) over the saved one
        if chosen == "off":
            question_gate.disable(layer)
        elif chosen is not None:
            question_gate.enable(layer, tokenizer, float(chosen))
        expected = getattr(hf_config, CHECKSUM_KEY, None)
        found = (getattr(layer, "adaptor_origin", None) or {}).get("tensors_sha256")
        if expected and found and expected != found:
            from ..errors import AdaptorError
            raise AdaptorError(f"adaptor {path} changed on disk after it was checked (tensors checksum "
                               f"{found[:12]} != {expected[:12]}); restart serving")
        config = layer.config
        target = layer.base_info.get("layer")
        decoder = self.model
        start, end = getattr(decoder, "start_layer", 0), getattr(decoder, "end_layer", len(decoder.layers))
        self._lemoe_router = RequestRouter(layer)
        self._lemoe_vectors: dict[str, Optional[torch.Tensor]] = {"rows": None}
        if not start <= target < end:
            logger.info("LEMoE: layer %d is on another pipeline stage; nothing to do here", target)
            return
        source_layer = 0 if config.query_source == "embedding" else config.query_layer
        if source_layer is not None:
            if not start <= source_layer < end:
                raise ConfigError(f"LEMoE: query_source={config.query_source!r} reads decoder layer "
                                  f"{source_layer}, which is on another pipeline stage than the target layer "
                                  f"{target}; use a pipeline split that keeps layers {source_layer}..{target} "
                                  "on one stage")
            decoder.layers[source_layer].register_forward_pre_hook(self._lemoe_keep_query_vectors)
        mlp = decoder.layers[target].mlp
        mlp.forward = functools.partial(self._lemoe_mlp_forward, mlp.forward)
        _ROUTERS[:] = [self._lemoe_router]  # one served model per worker process
        _install_runner_hook()
        logger.info("LEMoE adaptor %s: %d experts at layer %d (routing=%s, query_source=%s, backend=%s, "
                    "question gate %s)", path, layer.num_experts, target, config.routing, config.query_source,
                    backend, "on" if layer.route_filter is not None else "off")

    def _lemoe_keep_query_vectors(self, module: nn.Module, args: tuple) -> None:
        # a decoder layer is called as layer(positions, hidden_states, residual)
        hidden_states, residual = args[1], args[2] if len(args) > 2 else None
        self._lemoe_vectors["rows"] = hidden_states if residual is None else hidden_states + residual

    def _lemoe_mlp_forward(self, base_forward, x: torch.Tensor) -> torch.Tensor:
        out = base_forward(x)
        vectors = self._lemoe_vectors["rows"]
        self._lemoe_vectors["rows"] = None
        if self._lemoe_router.layer.config.query_source == "hidden":
            vectors = None
        elif vectors is None or vectors.shape[0] != x.shape[0]:
            raise RuntimeError("LEMoE: the query layer's input was not seen in this forward call")
        shape = out.shape
        result = self._lemoe_router.apply(x.reshape(-1, x.shape[-1]), out.reshape(-1, shape[-1]), vectors)
        return result.reshape(shape)


def _make(base: type) -> type:
    class LEMoEModel(LEMoEServingMixin, base):
        def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs: Any) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self._lemoe_setup(vllm_config)

    LEMoEModel.__name__ = LEMoEModel.__qualname__ = f"LEMoE{base.__name__}"
    return LEMoEModel


LEMoELlamaForCausalLM = _make(LlamaForCausalLM)
LEMoEMistralForCausalLM = _make(MistralForCausalLM)
LEMoEQwen2ForCausalLM = _make(Qwen2ForCausalLM)
