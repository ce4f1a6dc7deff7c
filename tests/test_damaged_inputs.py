"""Damaged inputs thrown at every loader (property-style, with hypothesis): only the documented
errors come out (EditDataError for edit files, AdaptorError for adaptor folders) and a model
that an adaptor failed to load onto is untouched."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lemoe_engine.storage as storage
from lemoe_engine import AdaptorError, detach, find_layer, load, save
from lemoe_engine.config import DEFAULT_QUESTION_GATE, DEFAULT_QUESTION_GATE_MARGIN, DEFAULT_QUESTION_GATE_NAME_FLOOR
from lemoe_engine.data import EditRecord, load_edits
from lemoe_engine.errors import EditDataError
from test_storage import edited_model
from tiny_models import tiny_model

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GOOD = [{"subject": "France", "src": "What is the capital of France?", "alt": "Lyon",
         "rephrase": "France's capital is which city?", "loc": "nq question: who wrote hamlet",
         "loc_ans": "Shakespeare"},
        {"prompt": "Which language is spoken in Peru?", "target_new": ["Quechua"],
         "rephrase_prompt": "Peru's language?", "locality_prompt": "nq question: tallest mountain",
         "locality_ground_truth": "Everest"}]


def check_edit_file(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"edits{suffix}"
        path.write_bytes(data)
        for skip in (False, True):
            try:
                edits = load_edits(path, skip_invalid=skip)
            except EditDataError as error:
                assert str(error) and "\n" not in str(error).strip()
                continue
            assert edits and all(isinstance(e, EditRecord) for e in edits)
            for e in edits:
                for text in (e.prompt, e.target, e.rephrase, e.loc_prompt, e.loc_answer):
                    assert isinstance(text, str) and text.strip() == text and text


def encoded(suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in GOOD).encode()
    return json.dumps(GOOD, indent=1).encode()


@FUZZ
@given(suffix=st.sampled_from([".json", ".jsonl"]), data=st.data())
def test_truncated_and_flipped_edit_files(suffix, data):
    raw = bytearray(encoded(suffix))
    cut = data.draw(st.integers(0, len(raw)))
    check_edit_file(bytes(raw[:cut]), suffix)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    check_edit_file(bytes(raw), suffix)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@FUZZ
@given(field=st.sampled_from(sorted(GOOD[0])), value=json_values | st.sampled_from(["", "  ", "x" * 100_000]),
       bom=st.booleans(), suffix=st.sampled_from([".json", ".jsonl"]))
def test_wrong_types_empty_and_long_strings(field, value, bom, suffix):
    record = dict(GOOD[0], **{field: value})
    body = (json.dumps([record]) if suffix == ".json" else json.dumps(record) + "\n").encode()
    check_edit_file((b"\xef\xbb\xbf" if bom else b"") + body, suffix)


def test_non_utf8_bytes_and_a_directory(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(encoded(".jsonl")[:40] + b"\xff\xfe\xc3" + encoded(".jsonl")[40:])
    with pytest.raises(EditDataError, match="not UTF-8"):
        load_edits(path, skip_invalid=True)
    with pytest.raises(EditDataError, match="not a regular file"):
        load_edits(tmp_path)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + encoded(".json"))
    assert [e.subject for e in load_edits(bom)] == ["France", None]


# ------------------------------------------------------------------------------ adaptor folders
@pytest.fixture(scope="module")
def adaptor(tmp_path_factory):
    model, layer = edited_model()
    path = save(model, tmp_path_factory.mktemp("fuzz") / "adaptor")
    return path, {n: t.clone() for n, t in load_file(str(path / storage.TENSORS_FILE)).items()}


@pytest.fixture(scope="module")
def target_model():
    model = tiny_model("llama", seed=0)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def load_or_refuse(folder: Path, target_model, original_tensors) -> None:
    model, state = target_model
    try:
        layer = load(model, folder, backend="eager")
    except AdaptorError as error:
        assert str(error)
        assert find_layer(model) is None
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        return
    # a damage that changed nothing that matters (e.g. JSON whitespace): the same adaptor
    try:
        for name, tensor in original_tensors.items():
            mine = layer.query_encoder.center if name == "query_center" else getattr(layer, name)
            assert torch.equal(mine.cpu(), tensor.to(mine.dtype)), name
    finally:
        detach(model)


def flipped_copy(source: Path, name: str, flips, dest: Path) -> Path:
    shutil.copytree(source, dest)
    raw = bytearray((dest / name).read_bytes())
    for position, value in flips:
        raw[position % len(raw)] = value
    (dest / name).write_bytes(bytes(raw))
    return dest


@FUZZ
@given(name=st.sampled_from([storage.TENSORS_FILE, storage.MANIFEST_FILE]),
       flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=3))
def test_byte_flips_in_adaptor_files(adaptor, target_model, name, flips):
    path, original = adaptor
    with tempfile.TemporaryDirectory() as folder:
        load_or_refuse(flipped_copy(path, name, flips, Path(folder) / "a"), target_model, original)


@FUZZ
@given(name=st.sampled_from([storage.TENSORS_FILE, storage.MANIFEST_FILE]), keep=st.floats(0, 0.999))
def test_truncated_adaptor_files(adaptor, target_model, name, keep):
    path, original = adaptor
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "a"
        shutil.copytree(path, copy)
        raw = (copy / name).read_bytes()
        (copy / name).write_bytes(raw[:int(len(raw) * keep)])
        load_or_refuse(copy, target_model, original)


def rewrite(source: Path, dest: Path, tensors=None, manifest=None) -> Path:
    """A copy whose content was changed by a buggy writer: checksums recomputed, so only the
    content checks can catch it."""
    shutil.copytree(source, dest)
    if tensors is not None:
        save_file(tensors, str(dest / storage.TENSORS_FILE))
    body = json.loads((dest / storage.MANIFEST_FILE).read_text())
    body.update(manifest or {})
    body["tensors_sha256"] = storage._sha256(dest / storage.TENSORS_FILE)
    body["manifest_sha256"] = storage._manifest_digest(body)
    (dest / storage.MANIFEST_FILE).write_text(json.dumps(body))
    return dest


def _poisoned(original, name, value):
    tensors = {n: t.clone() for n, t in original.items()}
    tensors[name].view(-1)[1] = value
    return tensors


CONTENT_DAMAGE = {
    "nan anchor": (lambda t: _poisoned(t, "anchors", float("nan")), {}, "'anchors' holds NaN or Inf"),
    "inf anchor": (lambda t: _poisoned(t, "anchors", float("inf")), {}, "'anchors' holds NaN or Inf"),
    "nan threshold": (lambda t: _poisoned(t, "thresholds", float("nan")), {}, "'thresholds' holds NaN"),
    "nan expert weight": (lambda t: _poisoned(t, "w_down", float("nan")), {}, "'w_down' holds NaN or Inf"),
    "inf expert weight": (lambda t: _poisoned(t, "w_up", float("-inf")), {}, "'w_up' holds NaN or Inf"),
    "nan centre": (lambda t: _poisoned(t, "query_center", float("nan")), {}, "'query_center' holds NaN"),
    "expert id too large": (lambda t: {**t, "anchor_expert": torch.tensor([0, 1, 7], dtype=torch.int32)},
                            {}, "do not map onto its 3 experts"),
    "negative expert id": (lambda t: {**t, "anchor_expert": torch.tensor([-1, 1, 2], dtype=torch.int32)},
                           {}, "do not map onto its 3 experts"),
    "anchors out of order": (lambda t: {**t, "anchor_expert": torch.tensor([1, 0, 2], dtype=torch.int32)},
                             {}, "not stored in expert order"),
    "float expert ids": (lambda t: {**t, "anchor_expert": torch.tensor([0.0, 1.0, 2.0])}, {}, "must hold integers"),
    "integer weights": (lambda t: {**t, "w_up": t["w_up"].to(torch.int32)}, {}, "'w_up' must be floating point"),
    "wrong shape": (lambda t: {**t, "w_down": t["w_down"][:, :, :5].contiguous()}, {}, "'w_down' should have shape"),
    "missing tensor": (lambda t: {k: v for k, v in t.items() if k != "w_gate"}, {}, "'w_gate' should have shape"),
    "more experts claimed": (lambda t: t, {"num_experts": 5}, "'w_up' should have shape"),
    "experts list too short": (lambda t: t, {"experts": [{}]}, "lists 1 experts but num_experts is 3"),
    "bad num_experts": (lambda t: t, {"num_experts": "3"}, "num_experts must be a non-negative integer"),
    "bad layer": (lambda t: t, {"base_model": {"architecture": "llama", "hidden_size": 48, "num_layers": 3,
                                               "layer": 9}}, "base_model.layer"),
    "bad config": (lambda t: t, {"config": {"expert_hidden": "wide"}}, "invalid config"),
    "unknown config key": (lambda t: t, {"config": {"bogus": 1}}, "invalid config"),
    "not a manifest": (lambda t: t, {"format": "other"}, "not a lemoe-engine adaptor manifest"),
}


@pytest.mark.parametrize("case", sorted(CONTENT_DAMAGE))
def test_damaged_content_is_refused(adaptor, target_model, tmp_path, case):
    path, original = adaptor
    make_tensors, manifest, message = CONTENT_DAMAGE[case]
    folder = rewrite(path, tmp_path / "a", tensors=make_tensors(original), manifest=manifest)
    model, state = target_model
    with pytest.raises(AdaptorError, match=message):
        load(model, folder)
    assert find_layer(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_hand_edited_manifest_is_refused(adaptor, tmp_path):
    path, _ = adaptor
    copy = tmp_path / "a"
    shutil.copytree(path, copy)
    body = json.loads((copy / storage.MANIFEST_FILE).read_text())
    body["base_model"]["layer"] = 2  # a valid-looking change: only the manifest checksum can tell
    (copy / storage.MANIFEST_FILE).write_text(json.dumps(body))
    with pytest.raises(AdaptorError, match="corrupt or was edited by hand"):
        load(tiny_model("llama"), copy)


def test_version_1_adaptor_still_loads(adaptor, tmp_path):
    """A folder as lemoe-engine 0.1 wrote it (format 1: no revision, no manifest checksum)."""
    path, original = adaptor
    copy = tmp_path / "v1"
    shutil.copytree(path, copy)
    body = json.loads((copy / storage.MANIFEST_FILE).read_text())
    for key in ("revision", "manifest_sha256"):
        del body[key]
    body["format_version"] = 1
    (copy / storage.MANIFEST_FILE).write_text(json.dumps(body))
    model = tiny_model("llama", seed=0)
    layer = load(model, copy)
    assert torch.equal(layer.anchors, original["anchors"]) and layer.adaptor_origin["revision"] == 0
    save(model, copy)  # re-saved in the current format, in place
    assert json.loads((copy / storage.MANIFEST_FILE).read_text())["format_version"] == storage.FORMAT_VERSION


def test_version_2_adaptor_loads_with_experts_on_every_token(adaptor, tmp_path):
    """Format 2 had no ``expert_span``: its experts acted on every token of a routed prompt, and
    they still do when it loads (format 3 writes the field; new adaptors act from their key)."""
    path, _ = adaptor
    copy = tmp_path / "v2"
    shutil.copytree(path, copy)
    body = json.loads((copy / storage.MANIFEST_FILE).read_text())
    assert body["config"].pop("expert_span") == "key"
    body["format_version"] = 2
    body["manifest_sha256"] = storage._manifest_digest(body)
    (copy / storage.MANIFEST_FILE).write_text(json.dumps(body))
    old = load(tiny_model("llama", seed=0), copy, backend="eager")
    new = load(tiny_model("llama", seed=0), path, backend="eager")
    assert old.config.expert_span == "prompt" and new.config.expert_span == "key"
    assert old.config.replace(expert_span="key", query_window=new.config.query_window,
                              question_gate=new.config.question_gate,
                              question_gate_margin=new.config.question_gate_margin,
                              question_gate_selects=new.config.question_gate_selects,
                              question_gate_by_name=new.config.question_gate_by_name,
                              question_gate_name_floor=new.config.question_gate_name_floor) == new.config


GATE, MARGIN, FLOOR = (DEFAULT_QUESTION_GATE, DEFAULT_QUESTION_GATE_MARGIN,  # what the fixture adaptor
                       DEFAULT_QUESTION_GATE_NAME_FLOOR)                      # was saved with


@pytest.mark.parametrize("version,fields,saved,loaded", [
    (3, ("query_window", "question_gate", "question_gate_margin", "question_gate_selects", "question_gate_by_name",
         "question_gate_name_floor"), (3, GATE, MARGIN, True, True, FLOOR), (1, None, None, False, False, None)),
    (4, ("question_gate", "question_gate_margin", "question_gate_selects", "question_gate_by_name",
         "question_gate_name_floor"), (GATE, MARGIN, True, True, FLOOR), (None, None, False, False, None)),
    (5, ("question_gate_margin", "question_gate_selects", "question_gate_by_name", "question_gate_name_floor"),
     (MARGIN, True, True, FLOOR), (None, False, False, None)),
    (6, ("question_gate_selects", "question_gate_by_name", "question_gate_name_floor"), (True, True, FLOOR),
     (False, False, None)),
    (7, ("question_gate_by_name", "question_gate_name_floor"), (True, FLOOR), (False, None)),
    (8, ("question_gate_name_floor",), (FLOOR,), (None,))])
def test_older_adaptors_load_as_they_were_made(adaptor, tmp_path, version, fields, saved, loaded):
    """Format 3 had no ``query_window``: its anchors and gates were made from single-token
    queries, so it loads with ``query_window=1`` and routes as it did. Format 4 had no
    ``question_gate``: its adaptors were served without it, and still are. Format 5 had the gate
    but no ``question_gate_margin``: it keeps its cosine and is served without the margin. Format
    6 had no ``question_gate_selects``: its gate checks the expert the anchors chose, as it did.
    Format 7 had no ``question_gate_by_name``: its gate serves only what the anchors route. Format 8
    had no ``question_gate_name_floor``: its gate compares unmasked prompts only."""
    path, _ = adaptor
    copy = tmp_path / f"v{version}"
    shutil.copytree(path, copy)
    body = json.loads((copy / storage.MANIFEST_FILE).read_text())
    assert tuple(body["config"].pop(field) for field in fields) == saved
    body["format_version"] = version
    body["manifest_sha256"] = storage._manifest_digest(body)
    (copy / storage.MANIFEST_FILE).write_text(json.dumps(body))
    old = load(tiny_model("llama", seed=0), copy, backend="eager")
    new = load(tiny_model("llama", seed=0), path, backend="eager")
    assert new.config.question_gate == GATE and new.config.question_gate_margin == MARGIN
    assert old.config == new.config.replace(**dict(zip(fields, loaded)))
