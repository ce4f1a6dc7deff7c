"""Adaptor folders: ``adaptor.safetensors`` (tensors) + ``adaptor.json`` (manifest).

Guarantees (README "Safety"):

* Saving is atomic: both files are written into a temporary sibling folder which then takes the
  target's name, so a crash leaves either the old adaptor or the new one, never half of one.
* Saving replaces a folder only if it is empty or an adaptor folder (nothing in it but adaptor
  files): any other folder is refused before anything is written, and no file that
  lemoe-engine did not write is ever deleted.
* Writers of one folder exclude each other with a lock file next to it (``.NAME.lock``, an
  ``flock`` released by the OS if the process dies), and a save into the folder an adaptor was
  loaded from is refused if another writer saved there since (the manifest's ``revision``).
* Loading checks everything (version, checksums of both files, base-model identity, shapes,
  dtypes, finite values, expert ids) before it touches the model, so a bad adaptor leaves the
  model unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LEMoEConfig
from .errors import AdaptorError, LEMoEError
from .layer import LEMoELayer
from .ledger import entries_from_manifest
from .patching import attach, base_identity, find_layer

FORMAT_VERSION = 9
"""Version written. 9 added ``config.question_gate_name_floor`` (the gate also compares the prompt
and the edit prompts with their subjects masked; versions 1-8 load with it off). 8 added ``config.question_gate_by_name`` (the gate serves a prompt the anchors
miss by the edited subject it names; versions 1-7 load with it off, as they were served). 7 added ``config.question_gate_selects`` (the gate picks, among the experts
keyed on one subject, the one holding the question asked; versions 1-6 load with it off, as they
were served). 6 added ``config.question_gate_margin`` (the gate also compares a prompt with
the expert's same-subject negatives; versions 1-5 load with it off, as they were served). 5 added ``config.question_gate`` (the question gate's cosine, on by default;
versions 1-4 load with it off, as they were served). 4 added ``config.query_window`` and the tensor ``anchor_window`` (how many
prompt tokens each anchor's key pools); versions 1-3 load with ``query_window=1`` and one-token
keys. 3 added ``config.expert_span`` (experts act from
their key token on, by default); versions 1-2 load with ``expert_span='prompt'``, the only
behaviour they knew. 2 added ``revision``, ``manifest_sha256`` and the edit ledger (``edits``);
version 1 loads with an empty ledger."""
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
TENSORS_FILE = "adaptor.safetensors"
MANIFEST_FILE = "adaptor.json"
ADAPTOR_FILES = (MANIFEST_FILE, TENSORS_FILE)
"""Every file an adaptor folder holds; ``save`` replaces a folder holding nothing else."""

PathLike = Union[str, os.PathLike]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _layer_tensors(layer: LEMoELayer) -> dict[str, torch.Tensor]:
    tensors = {"anchors": layer.anchors, "anchor_expert": layer.anchor_expert, "thresholds": layer.thresholds,
               "anchor_window": layer.anchor_window, "query_center": layer.query_encoder.center}
    if layer.query_encoder.has_projection:
        tensors["query_down"] = layer.query_encoder.down
        tensors["query_up"] = layer.query_encoder.up
    for name in layer.weight_names:
        tensors[name] = getattr(layer, name)
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


# ------------------------------------------------------------------------------ target folders
def adaptor_folder(path: PathLike) -> Path:
    """The absolute folder ``path`` names ('.' and '..' included), or AdaptorError."""
    try:
        folder = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, TypeError) as error:
        raise AdaptorError(f"invalid adaptor folder {path!r}: {error}") from None
    if folder.parent == folder:
        raise AdaptorError(f"{folder} is the filesystem root: choose a folder for the adaptor")
    return folder


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_save_target(path: PathLike) -> Path:
    """Raise AdaptorError unless ``save`` may write folder ``path``: it does not exist, is empty,
    or is an adaptor folder. Call it before long work, so a bad ``--out`` fails first."""
    folder = adaptor_folder(path)
    if not folder.exists():
        if folder.is_symlink():
            raise AdaptorError(f"{folder} is a dangling symbolic link; choose another output folder")
        return folder
    if not folder.is_dir():
        raise AdaptorError(f"{folder} exists and is not a folder; choose another output folder")
    if _is_within(Path.cwd().resolve(), folder):
        raise AdaptorError(f"{folder} is (or holds) the current working directory, which saving would "
                           f"replace: save to a folder below it, or run from elsewhere")
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError as error:
        raise AdaptorError(f"cannot read folder {folder}: {error.strerror or error}") from None
    foreign = [name for name in names if name not in ADAPTOR_FILES]
    if not foreign and MANIFEST_FILE in names and _read_manifest(folder, quiet=True) is None:
        foreign = [MANIFEST_FILE + " (not a lemoe-engine manifest)"]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise AdaptorError(f"{folder} is not an adaptor folder (it holds {shown}): saving there would "
                           f"delete those files. Choose a new or empty folder, or an existing adaptor folder")
    return folder


@contextlib.contextmanager
def adaptor_lock(path: PathLike, timeout: Optional[float] = None,
                 on_wait: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    """Hold the writer lock of adaptor folder ``path`` (a ``.NAME.lock`` file beside it).

    Another process holding it makes this wait (``on_wait`` gets a message once; default: print
    to stderr), or raise AdaptorError after ``timeout`` seconds. The OS releases the lock when
    its process dies. Re-entrant within one process. Hold it from reading an adaptor until its
    edited version is saved, so that two writers cannot lose each other's edits.
    """
    folder = adaptor_folder(path)
    if folder in _HELD:
        _HELD[folder] += 1
        try:
            yield folder
        finally:
            _HELD[folder] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        raise AdaptorError("adaptor locking needs a POSIX system (fcntl)") from None
    lock_file = folder.parent / f".{folder.name}.lock"
    notify = on_wait or (lambda text: print(text, file=sys.stderr, flush=True))
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = False
    while True:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise AdaptorError(f"cannot create the lock file {lock_file}: {error.strerror or error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            if not waited:
                notify(f"waiting for another lemoe-engine process writing {folder} (lock file {lock_file})")
                waited = True
            if deadline is not None and time.monotonic() >= deadline:
                raise AdaptorError(f"{folder} is being written by another lemoe-engine process "
                                   f"(lock file {lock_file}); gave up after {timeout:g} s") from None
            time.sleep(0.05)
            continue
        # the holder before us deletes the file as it releases: a lock on a deleted file excludes nobody
        try:
            same = os.fstat(handle).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    _HELD[folder] = 1
    try:
        yield folder
    finally:
        del _HELD[folder]
        with contextlib.suppress(OSError):
            os.unlink(lock_file)  # before the release, so a waiter re-opens a fresh file
        os.close(handle)  # releases the flock


_HELD: dict[Path, int] = {}  # folders whose lock this process holds (a second flock would deadlock)


def _read_manifest(folder: Path, quiet: bool = False) -> Optional[dict[str, Any]]:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if quiet:
            return None
        raise AdaptorError(f"{folder / MANIFEST_FILE} is corrupt: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lemoe-adaptor":
        if quiet:
            return None
        raise AdaptorError(f"{folder / MANIFEST_FILE} is not a lemoe-engine adaptor manifest")
    return manifest


def save(model_or_layer: nn.Module, path: PathLike) -> Path:
    """Write the attached adaptor to folder ``path`` (created, or an adaptor folder replaced
    atomically) and return the folder. See the module docstring for what it refuses."""
    layer = model_or_layer if isinstance(model_or_layer, LEMoELayer) else find_layer(model_or_layer)
    if layer is None:
        raise AdaptorError("nothing to save: the model has no LEMoE adaptor attached")
    if len(layer.trainable):
        raise AdaptorError("an expert is still being trained: call layer.freeze_expert() before saving")
    with adaptor_lock(path) as target:
        check_save_target(target)
        existing = _read_manifest(target, quiet=True) if target.is_dir() else None
        origin = layer.adaptor_origin
        if origin is not None and origin["path"] == str(target) and existing is not None:
            found = (existing.get("revision", 0), existing.get("tensors_sha256"))
            if found != (origin["revision"], origin["tensors_sha256"]):
                raise AdaptorError(
                    f"{target} changed since this adaptor was read from it (revision {origin['revision']} "
                    f"-> {found[0]}): another writer saved there, and saving now would lose its edits. "
                    f"Load the adaptor again and redo these edits, or save to another folder")
        revision = int(existing.get("revision", 0)) + 1 if existing is not None else 1
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            save_file(_layer_tensors(layer), str(staging / TENSORS_FILE))
            manifest = {
                "format": "lemoe-adaptor",
                "format_version": FORMAT_VERSION,
                "revision": revision,
                "config": layer.config.to_dict(),
                "base_model": layer.base_info,
                "num_experts": layer.num_experts,
                "experts": layer.expert_info,
                "edits": [entry.to_dict() for entry in layer.ledger],
                "tensors_sha256": _sha256(staging / TENSORS_FILE),
            }
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            with open(staging / MANIFEST_FILE, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            _swap_into_place(staging, target)
        finally:
            _remove_adaptor_files(staging)
    layer.adaptor_origin = {"path": str(target), "revision": revision,
                            "tensors_sha256": manifest["tensors_sha256"]}
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    """Give ``staging`` the name ``target``; an existing (adaptor) target is moved aside first
    and put back if the final rename fails, so the path holds the old or the new adaptor."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove_adaptor_files(old)


def _remove_adaptor_files(folder: Path) -> None:
    """Delete the adaptor files in ``folder`` and the folder if that empties it; never anything else."""
    if not folder.is_dir():
        return
    for name in ADAPTOR_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    with contextlib.suppress(OSError):  # someone put another file there: leave it
        folder.rmdir()


def read_adaptor(path: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify an adaptor folder: (manifest, tensors). Raises AdaptorError."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if folder.exists():
            raise AdaptorError(f"{folder} is not a folder; an adaptor is a folder holding "
                               f"{MANIFEST_FILE} and {TENSORS_FILE}")
        left = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.name else []
        hint = (f"; an interrupted save left the previous adaptor at {left[0]}: rename it to {folder}"
                if left else "")
        raise AdaptorError(f"adaptor folder {folder} does not exist{hint}")
    for name in ADAPTOR_FILES:
        if not (folder / name).is_file():
            raise AdaptorError(f"{folder} is not an adaptor folder: {name} is missing")
    manifest = _read_manifest(folder)
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise AdaptorError(f"{folder} has adaptor format version {version!r}; this lemoe-engine reads "
                           f"versions {', '.join(map(str, READABLE_VERSIONS))}: upgrade lemoe-engine "
                           f"or re-save the adaptor")
    if version >= 2 and manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise AdaptorError(f"{folder / MANIFEST_FILE} is corrupt or was edited by hand (checksum mismatch)")
    if _sha256(folder / TENSORS_FILE) != manifest.get("tensors_sha256"):
        raise AdaptorError(f"{folder / TENSORS_FILE} is corrupt or truncated (checksum mismatch)")
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as error:  # safetensors raises several types for damaged files
        raise AdaptorError(f"{folder / TENSORS_FILE} cannot be read: {error}") from None
    return manifest, tensors


def _check_compatible(manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                      config: LEMoEConfig, model: nn.Module, folder: Path) -> None:
    saved = manifest.get("base_model")
    saved = saved if isinstance(saved, dict) else {}
    current = base_identity(model, saved.get("layer", 0) if isinstance(saved.get("layer"), int) else 0)
    for key in ("architecture", "hidden_size", "num_layers"):
        if saved.get(key) != current[key]:
            raise AdaptorError(f"adaptor {folder} was made for a model with {key}={saved.get(key)!r}, "
                               f"but this model has {key}={current[key]!r}")
    layer = saved.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < current["num_layers"]:
        raise AdaptorError(f"adaptor {folder}: base_model.layer must be a layer index of this model "
                           f"(0..{current['num_layers'] - 1}), got {layer!r}")
    count = manifest.get("num_experts")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise AdaptorError(f"adaptor {folder}: num_experts must be a non-negative integer, got {count!r}")
    d, width = current["hidden_size"], config.expert_hidden
    key_dim = config.anchor_dim(d)
    anchors = tuple(tensors["anchors"].shape) if "anchors" in tensors else ()
    n_anchors = anchors[0] if anchors else -1
    expected = {"anchors": (n_anchors, key_dim), "anchor_expert": (n_anchors,),
                "thresholds": (n_anchors,), "query_center": (d,),
                "w_up": (count, d, width), "w_down": (count, width, d)}
    if config.expert_gated:
        expected["w_gate"] = (count, d, width)
    if manifest.get("format_version", 0) >= 4:
        expected["anchor_window"] = (n_anchors,)
    if config.query_hidden > 0:
        expected["query_down"] = (d, config.query_hidden)
        expected["query_up"] = (config.query_hidden, config.key_dim)
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            found = tuple(tensors[name].shape) if name in tensors else "missing"
            raise AdaptorError(f"adaptor {folder}: tensor '{name}' should have shape {shape}, found {found}")
        tensor = tensors[name]
        if name in ("anchor_expert", "anchor_window"):
            if tensor.dtype not in (torch.int32, torch.int64):
                raise AdaptorError(f"adaptor {folder}: tensor '{name}' must hold integers, "
                                   f"found {tensor.dtype}")
            if name == "anchor_window" and tensor.numel() and (tensor.min() < 1 or tensor.max() > config.query_window):
                raise AdaptorError(f"adaptor {folder}: tensor 'anchor_window' must hold values in "
                                   f"1..query_window ({config.query_window})")
        elif not tensor.is_floating_point():
            raise AdaptorError(f"adaptor {folder}: tensor '{name}' must be floating point, found {tensor.dtype}")
        elif name == "thresholds":
            if tensor.isnan().any():  # -inf (never gated) and +inf (never routed) are meaningful
                raise AdaptorError(f"adaptor {folder}: tensor 'thresholds' holds NaN")
        elif not torch.isfinite(tensor).all():
            raise AdaptorError(f"adaptor {folder}: tensor '{name}' holds NaN or Inf values; "
                               f"a non-finite {'anchor would route' if name == 'anchors' else 'weight would give'} "
                               f"garbage")
    owners = tensors["anchor_expert"].long()
    if n_anchors < count or (owners.numel() and (owners.min() < 0 or owners.max() >= count)):
        raise AdaptorError(f"adaptor {folder}: anchors do not map onto its {count} experts")
    if owners.numel() > 1 and (owners[1:] < owners[:-1]).any():
        raise AdaptorError(f"adaptor {folder}: anchors are not stored in expert order")
    if not isinstance(manifest.get("experts"), list) or len(manifest["experts"]) != count:
        listed = len(manifest["experts"]) if isinstance(manifest.get("experts"), list) else 0
        raise AdaptorError(f"adaptor {folder}: manifest lists {listed} experts but num_experts is {count}")
    if not all(isinstance(info, dict) for info in manifest["experts"]):
        raise AdaptorError(f"adaptor {folder}: every entry of 'experts' must be an object")
    entries_from_manifest(manifest.get("edits"), count, f"adaptor {folder}")


def saved_config(manifest: dict) -> Any:
    """The manifest's config dict, with what older formats left implicit made explicit."""
    config = manifest.get("config")
    version = manifest.get("format_version", 0)
    if isinstance(config, dict) and version < 3:
        config = {"expert_span": "prompt", **config}
    if isinstance(config, dict) and version < 4:
        config = {"query_window": 1, **config}
    if isinstance(config, dict) and version < 5:
        config = {"question_gate": None, **config}
    if isinstance(config, dict) and version < 6:
        config = {"question_gate_margin": None, **config}
    if isinstance(config, dict) and version < 7:
        config = {"question_gate_selects": False, **config}
    if isinstance(config, dict) and version < 8:
        config = {"question_gate_by_name": False, **config}
    if isinstance(config, dict) and version < 9:
        config = {"question_gate_name_floor": None, **config}
    return config


def load(model: nn.Module, path: PathLike, backend: str = "auto", tokenizer: Any = None) -> LEMoELayer:
    """Attach the adaptor saved in folder ``path`` to ``model`` and return its layer.

    ``backend`` ('auto', 'eager', 'triton') overrides the saved one. ``tokenizer``: the model's,
    for the question gate when the adaptor has it on (default: the tokenizer saved in the model's
    folder; without one the gate is off, with a warning). Any problem raises AdaptorError before
    the model is touched.
    """
    folder = Path(path)
    manifest, tensors = read_adaptor(folder)
    try:
        config = LEMoEConfig.from_dict(saved_config(manifest)).replace(backend=backend)
    except (LEMoEError, TypeError, ValueError) as error:
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
        # format 4 added per-anchor key windows; older anchors are single-token keys
        window = tensors.get("anchor_window")
        layer.anchor_window = (window.to(layer.anchor_window) if window is not None
                               else torch.ones_like(layer.anchor_expert))
        layer.query_encoder.center.copy_(tensors["query_center"])
        if layer.query_encoder.has_projection:
            layer.query_encoder.down.copy_(tensors["query_down"])
            layer.query_encoder.up.copy_(tensors["query_up"])
        for name in layer.weight_names:
            stack = getattr(layer, name)
            setattr(layer, name, nn.Parameter(tensors[name].to(device=stack.device, dtype=stack.dtype),
                                              requires_grad=False))
    layer.expert_info = list(manifest["experts"])
    layer.ledger = entries_from_manifest(manifest.get("edits"), layer.num_experts, f"adaptor {folder}")
    layer.adaptor_origin = {"path": str(adaptor_folder(folder)), "revision": manifest.get("revision", 0),
                            "tensors_sha256": manifest.get("tensors_sha256")}
    if layer.config.gates_questions:  # warns when it cannot run (no tokenizer, no encoder)
        from . import question_gate
        question_gate.sync(layer, tokenizer if tokenizer is not None else
                           saved_tokenizer(getattr(model, "config", None)))
    return layer


def saved_tokenizer(model_config: Any) -> Any:
    """The tokenizer saved in the folder a model was loaded from, or None (no folder, no files)."""
    name = getattr(model_config, "_name_or_path", None)
    if not name or not Path(name).is_dir():
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # no tokenizer files there: the caller says what to do
        return None

