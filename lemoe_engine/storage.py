"""Adaptor folders: ``adaptor.safetensors`` (tensors) + ``adaptor.json`` (manifest).

Saving is atomic: both files are written into a temporary sibling folder which then takes the
target's name, so a crash leaves either the old adaptor or the new one, never half of one.
Loading checks everything (version, base-model identity, checksum, shapes) before it touches
the model, so a bad adaptor leaves the model unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LEMoEConfig
from .errors import AdaptorError, LEMoEError
from .layer import LEMoELayer
from .patching import attach, base_identity, find_layer

FORMAT_VERSION = 1
TENSORS_FILE = "adaptor.safetensors"
MANIFEST_FILE = "adaptor.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _layer_tensors(layer: LEMoELayer) -> dict[str, torch.Tensor]:
    tensors = {"anchors": layer.anchors, "anchor_expert": layer.anchor_expert, "thresholds": layer.thresholds,
               "query_center": layer.query_encoder.center}
    if layer.query_encoder.has_projection:
        tensors["query_down"] = layer.query_encoder.down
        tensors["query_up"] = layer.query_encoder.up
    for name in layer.weight_names:
        tensors[name] = getattr(layer, name)
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


def save(model_or_layer: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the attached adaptor to folder ``path`` (created or replaced atomically)."""
    layer = model_or_layer if isinstance(model_or_layer, LEMoELayer) else find_layer(model_or_layer)
    if layer is None:
        raise AdaptorError("nothing to save: the model has no LEMoE adaptor attached")
    if len(layer.trainable):
        raise AdaptorError("an expert is still being trained: call layer.freeze_expert() before saving")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        save_file(_layer_tensors(layer), str(staging / TENSORS_FILE))
        manifest = {
            "format": "lemoe-adaptor",
            "format_version": FORMAT_VERSION,
            "config": layer.config.to_dict(),
            "base_model": layer.base_info,
            "num_experts": layer.num_experts,
            "experts": layer.expert_info,
            "tensors_sha256": _sha256(staging / TENSORS_FILE),
        }
        with open(staging / MANIFEST_FILE, "w") as handle:
            json.dump(manifest, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise AdaptorError(f"{target} exists and is not a folder; choose another output path")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_adaptor(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify an adaptor folder: (manifest, tensors). Raises AdaptorError."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdaptorError(f"adaptor folder {folder} does not exist")
    for name in (MANIFEST_FILE, TENSORS_FILE):
        if not (folder / name).is_file():
            raise AdaptorError(f"{folder} is not an adaptor folder: {name} is missing")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdaptorError(f"{folder / MANIFEST_FILE} is corrupt: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lemoe-adaptor":
        raise AdaptorError(f"{folder / MANIFEST_FILE} is not a lemoe-engine adaptor manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise AdaptorError(f"{folder} has adaptor format version {version!r}; this lemoe-engine reads "
                           f"version {FORMAT_VERSION}: upgrade lemoe-engine or re-save the adaptor")
    if _sha256(folder / TENSORS_FILE) != manifest.get("tensors_sha256"):
        raise AdaptorError(f"{folder / TENSORS_FILE} is corrupt or truncated (checksum mismatch)")
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as error:  # safetensors raises several types for damaged files
        raise AdaptorError(f"{folder / TENSORS_FILE} cannot be read: {error}") from None
    return manifest, tensors


def _check_compatible(manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                      config: LEMoEConfig, model: nn.Module, folder: Path) -> None:
    saved = manifest.get("base_model", {})
    current = base_identity(model, saved.get("layer", 0) if isinstance(saved.get("layer"), int) else 0)
    for key in ("architecture", "hidden_size", "num_layers"):
        if saved.get(key) != current[key]:
            raise AdaptorError(f"adaptor {folder} was made for a model with {key}={saved.get(key)!r}, "
                               f"but this model has {key}={current[key]!r}")
    count = manifest.get("num_experts")
    d, width = current["hidden_size"], config.expert_hidden
    key_dim = config.anchor_dim(d)
    anchors = tuple(tensors["anchors"].shape) if "anchors" in tensors else ()
    n_anchors = anchors[0] if anchors else -1
    expected = {"anchors": (n_anchors, key_dim), "anchor_expert": (n_anchors,),
                "thresholds": (n_anchors,), "query_center": (d,),
                "w_up": (count, d, width), "w_down": (count, width, d)}
    if config.expert_gated:
        expected["w_gate"] = (count, d, width)
    if config.query_hidden > 0:
        expected["query_down"] = (d, config.query_hidden)
        expected["query_up"] = (config.query_hidden, config.key_dim)
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            found = tuple(tensors[name].shape) if name in tensors else "missing"
            raise AdaptorError(f"adaptor {folder}: tensor '{name}' should have shape {shape}, found {found}")
    owners = tensors["anchor_expert"]
    if n_anchors < count or (owners.numel() and (owners.min() < 0 or owners.max() >= count)):
        raise AdaptorError(f"adaptor {folder}: anchors do not map onto its {count} experts")
    if not isinstance(manifest.get("experts"), list) or len(manifest["experts"]) != count:
        raise AdaptorError(f"adaptor {folder}: manifest lists {len(manifest.get('experts') or [])} "
                           f"experts but num_experts is {count}")


def load(model: nn.Module, path: Union[str, os.PathLike], backend: str = "auto") -> LEMoELayer:
    """Attach the adaptor saved in folder ``path`` to ``model`` and return its layer.

    ``backend`` ('auto', 'eager', 'triton') overrides the saved one. Any problem raises
    AdaptorError before the model is touched.
    """
    folder = Path(path)
    manifest, tensors = read_adaptor(folder)
    try:
        config = LEMoEConfig.from_dict(manifest.get("config")).replace(backend=backend)
    except LEMoEError as error:
        raise AdaptorError(f"adaptor {folder}: invalid config: {error}") from None
    if find_layer(model) is not None:
        raise AdaptorError("this model already has a LEMoE adaptor attached: call detach(model) first")
    _check_compatible(manifest, tensors, config, model, folder)
    saved_layer = manifest["base_model"].get("layer")
    layer = attach(model, config.replace(layer=saved_layer))
    with torch.no_grad():
        layer.anchors = tensors["anchors"].to(layer.anchors)
        layer.anchor_expert = tensors["anchor_expert"].to(layer.anchor_expert)
        layer.thresholds = tensors["thresholds"].to(layer.thresholds)
        layer.query_encoder.center.copy_(tensors["query_center"])
        if layer.query_encoder.has_projection:
            layer.query_encoder.down.copy_(tensors["query_down"])
            layer.query_encoder.up.copy_(tensors["query_up"])
        for name in layer.weight_names:
            stack = getattr(layer, name)
            setattr(layer, name, nn.Parameter(tensors[name].to(device=stack.device, dtype=stack.dtype),
                                              requires_grad=False))
    layer.expert_info = list(manifest["experts"])
    return layer
