"""A disk cache of the gate pool's query-source vectors, so that each edit run does not embed
the same thousands of unrelated prompts again.

Every run calibrates its gate on a pool of unrelated prompts (3,435 bundled ones): their token
vectors at the query source (decoder layer ``query_layer``, or the embeddings) cost about 30 s on
a 2-core CPU for SmolLM2-135M, as much as training a dozen experts, and they are the same in
every run of the same model. The cache stores them once per (model, pool), unrounded (the values
the run that wrote the entry computed; in the model's half dtype when that holds them exactly,
else fp32; about 140 MB for the bundled pool and SmolLM2-135M in fp32), in ``cache_dir()``:

* ``$LEMOE_POOL_CACHE`` if set (``off`` disables the disk cache),
* else ``pool-vectors`` in the engine's cache folder (``$LEMOE_CACHE``, else
  ``~/.cache/lemoe-engine``: ``models.cache_root``, where converted models live too).

A file is named by a key over everything the vectors depend on: the prompts (in order), the
token ids a run feeds for them, the model's configuration and attention implementation, a
fingerprint of the weights that compute them (per-row sums and sampled values of every tensor
below the query source, so a fine-tuned copy at the same path gets its own entry), dtype, the
device (the GPU's name), the query source, and the torch / transformers versions. A fresh
computation on the same machine can still differ from an entry in the last bits where its
batches are composed differently (a run embeds a pool prompt that is also an edit prompt with
the edits).
A file that cannot be read or does not match is recomputed and rewritten, never trusted. Only
files named ``pool-<key>.pt`` in that folder are ever written; nothing is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

FORMAT = 1
"""Bumped whenever what the cached vectors mean changes (the key includes it)."""
SAMPLES_PER_TENSOR = 4096
MAX_ENTRY_BYTES = 2 * 2**30
"""A pool whose vectors would take more than this on disk is not cached (a warning says so): a
user's own pool of a hundred thousand prompts on a 7B model would otherwise write gigabytes."""


def cache_dir() -> Optional[Path]:
    """The folder of the disk cache, or None when it is off (``LEMOE_POOL_CACHE=off``)."""
    configured = os.environ.get("LEMOE_POOL_CACHE")
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "0", "none") else Path(configured).expanduser()
    from .models import cache_root
    return cache_root() / "pool-vectors"


def _weights_fingerprint(modules: Sequence[nn.Module], skip: Sequence[nn.Module] = ()) -> str:
    """Shapes, dtypes, per-row sums and evenly spaced sampled values of every parameter and
    buffer of ``modules`` (outside the ``skip`` modules): cheap at any model size, and a changed
    row (a fine-tune, a retrained token embedding) changes its row's sum."""
    skipped = {id(p) for m in skip for p in list(m.parameters()) + list(m.buffers())}
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if id(tensor) in skipped:
                continue
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            rows = tensor.detach().reshape(tensor.shape[0], -1) if tensor.dim() > 1 else flat[:, None]
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(flat[::step][:SAMPLES_PER_TENSOR].float().cpu().numpy().tobytes())
            digest.update(rows.float().sum(dim=1).cpu().numpy().tobytes())
    return digest.hexdigest()


def pool_key(model: nn.Module, lower_modules: Sequence[nn.Module], skip_modules: Sequence[nn.Module],
             query_source: str, prompts: Sequence[str], encoded: Sequence) -> str:
    """The cache key of a pool's vectors (see the module docstring): ``lower_modules`` compute
    them (but the ``skip_modules`` inside them do not: the adaptor), ``encoded`` is what the runs
    feed for ``prompts`` (token ids and prompt lengths)."""
    import transformers

    parameter = next(model.parameters())
    config = getattr(model, "config", None)
    config_text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    device = parameter.device
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    digest = hashlib.sha256()
    for part in (f"format {FORMAT}", query_source, str(parameter.dtype), hardware,
                 str(getattr(config, "_attn_implementation", None)),
                 torch.__version__, transformers.__version__, type(model).__name__,
                 config_text, _weights_fingerprint(lower_modules, skip_modules)):
        digest.update(part.encode() + b"\0")
    digest.update(json.dumps(list(encoded)).encode())
    digest.update(json.dumps(list(prompts)).encode())
    return digest.hexdigest()[:32]


def load_pool(key: str, count: int) -> Optional[list[torch.Tensor]]:
    """The cached vectors of a pool of ``count`` prompts, or None (no cache, no entry, or an entry
    that does not read back as ``count`` float tensors of one width: then it is recomputed)."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"pool-{key}.pt"
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        lengths, vectors = stored["lengths"], stored["vectors"]
        if (stored.get("key") != key or lengths.dim() != 1 or lengths.numel() != count
                or vectors.dim() != 2 or vectors.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                or int(lengths.sum()) != vectors.shape[0] or bool((lengths < 1).any())):
            raise ValueError("the entry does not hold this pool")
        return list(torch.split(vectors.float(), lengths.tolist()))
    except Exception as exc:  # a damaged entry is recomputed, never trusted
        warnings.warn(f"lemoe_engine: ignoring the unreadable pool-vector cache entry {path} ({exc}); "
                      "recomputing it", stacklevel=2)
        return None


def _compact(vectors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``vectors`` in ``dtype`` when that holds them exactly (a bf16 model's vectors take half the
    space of their fp32 copies), else unchanged: the cache never rounds."""
    if dtype in (torch.float16, torch.bfloat16):
        compact = vectors.to(dtype)
        if torch.equal(compact.float(), vectors):
            return compact
    return vectors


def store_pool(key: str, vectors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> Optional[Path]:
    """Write a pool's vectors under ``key`` (atomically: a reader never sees half a file), in
    ``dtype`` (the model's) when that is exact. A cache folder that cannot be written costs the
    cache, not the run: a warning, None."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"pool-{key}.pt"
    payload = {"key": key, "lengths": torch.tensor([v.shape[0] for v in vectors], dtype=torch.int64),
               "vectors": _compact(torch.cat([v.float() for v in vectors]).contiguous(), dtype)}
    size = payload["vectors"].numel() * payload["vectors"].element_size()
    if size > MAX_ENTRY_BYTES:
        warnings.warn(f"lemoe_engine: the gate pool's vectors take {size / 2**30:.1f} GiB, more than the "
                      f"pool-vector cache keeps ({MAX_ENTRY_BYTES / 2**30:.0f} GiB): not cached, every run "
                      "embeds the pool again", stacklevel=2)
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pool-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        warnings.warn(f"lemoe_engine: could not write the pool-vector cache in {folder} ({exc}); "
                      "set LEMOE_POOL_CACHE to a writable folder, or LEMOE_POOL_CACHE=off", stacklevel=2)
        return None
