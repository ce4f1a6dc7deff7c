"""Data safety: save never deletes a user's files, writers of one adaptor lose no edits, invalid
edit records can be skipped (and are reported), and damaged inputs give only documented errors."""

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import lemoe_engine.storage as storage
from lemoe_engine import AdaptorError, find_layer, load, save
from lemoe_engine.cli import main
from lemoe_engine.data import load_edits, save_edits
from lemoe_engine.errors import EditDataError
from test_editor import tiny_edits
from test_storage import edited_model
from tiny_models import add_random_experts, tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LEMOE_SHARED_DATA", REPO.parent / "shared" / "data"))
ZSRE = SHARED_DATA / "zsre_mend_train-1k.json"


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ 1. save
def test_save_refuses_a_folder_that_is_not_an_adaptor(tmp_path):
    model, _ = edited_model()
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "config.json").write_text("{}")
    (folder / "adaptor.json").write_text("{}")  # an adaptor file name alone does not make it ours
    before = snapshot(folder)
    with pytest.raises(AdaptorError, match=r"my-llama is not an adaptor folder .*config\.json, notes\.txt"):
        save(model, folder)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-llama"]  # no staging or lock debris


def test_save_refuses_a_foreign_manifest_and_the_working_directory(tmp_path, monkeypatch):
    model, _ = edited_model()
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adaptor.json").write_text('{"format": "something-else"}')
    with pytest.raises(AdaptorError, match="not a lemoe-engine manifest"):
        save(model, folder)
    assert (folder / "adaptor.json").read_text() == '{"format": "something-else"}'
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("1,2")
    monkeypatch.chdir(work)
    with pytest.raises(AdaptorError, match="current working directory"):
        save(model, ".")
    assert (work / "data.csv").read_text() == "1,2"
    assert save(model, "sub") == work / "sub"  # a relative path below it is fine


def test_save_writes_new_empty_and_adaptor_folders(tmp_path):
    model, layer = edited_model()
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "new" / "deep", empty):
        save(model, folder)
        assert sorted(p.name for p in folder.iterdir()) == ["adaptor.json", "adaptor.safetensors"]
    layer.remove_expert()
    save(model, empty)  # an adaptor folder is replaced
    assert json.loads((empty / "adaptor.json").read_text())["num_experts"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_final_rename_keeps_the_old_adaptor(tmp_path, monkeypatch):
    model, layer = edited_model()
    path = save(model, tmp_path / "adaptor")
    before = snapshot(path)
    layer.remove_expert()
    real_replace = os.replace

    def failing_final_rename(src, dst):
        if Path(src).name.endswith(".tmp"):  # staging -> target: the rename that publishes
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", failing_final_rename)
    with pytest.raises(OSError, match="No space"):
        save(model, path)
    monkeypatch.undo()
    assert snapshot(path) == before  # the old adaptor, whole, under its name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adaptor"]  # staging and .old cleaned up
    fresh = tiny_model("llama", seed=0)
    assert load(fresh, path).num_experts == 3


def test_interrupted_swap_is_reported_with_the_way_back(tmp_path):
    model, _ = edited_model()
    path = save(model, tmp_path / "adaptor")
    os.replace(path, tmp_path / ".adaptor.old-1234abcd")  # what a power cut between two renames leaves
    with pytest.raises(AdaptorError, match=r"does not exist; an interrupted save left the previous "
                                           r"adaptor at .*\.adaptor\.old-1234abcd"):
        load(tiny_model("llama"), path)


def test_cli_out_that_is_not_an_adaptor_exits_2_before_loading(tmp_path, capsys):
    folder = tmp_path / "model-folder"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x")
    edits = tmp_path / "e.jsonl"
    save_edits(tiny_edits(2, seed=1), edits)
    code = main(["edit", "--model", str(tmp_path / "no-such-model"), "--edits", str(edits),
                 "--out", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "weights.bin" in err, err
    assert (folder / "weights.bin").read_bytes() == b"x"


# ------------------------------------------------------------------------------ 2. writers
def test_a_save_over_a_changed_adaptor_is_refused(tmp_path):
    model, _ = edited_model()
    path = save(model, tmp_path / "adaptor")
    first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    layer_one, layer_two = load(first, path), load(second, path)
    for layer, seed in ((layer_one, 5), (layer_two, 6)):
        add_random_experts(layer, 1, torch.Generator().manual_seed(seed))
    save(second, path)  # the other writer lands first
    landed = snapshot(path)
    with pytest.raises(AdaptorError, match=r"changed since .*revision 1 -> 2.*would lose its edits"):
        save(first, path)
    assert snapshot(path) == landed
    assert json.loads((path / "adaptor.json").read_text())["revision"] == 2
    save(first, tmp_path / "elsewhere")  # saving to another folder stays possible
    save(second, path)  # the writer that saved last may save again
    assert json.loads((path / "adaptor.json").read_text())["revision"] == 3


def test_lock_waits_times_out_and_is_reentrant(tmp_path):
    folder = tmp_path / "a"
    messages = []
    with storage.adaptor_lock(folder):
        with storage.adaptor_lock(folder):  # same process: no deadlock
            pass
        script = textwrap.dedent(f"""
            import sys
            from lemoe_engine.storage import adaptor_lock
            from lemoe_engine.errors import AdaptorError
            try:
                with adaptor_lock({str(folder)!r}, timeout=0.3):
                    print("got it")
            except AdaptorError as error:
                print("refused:", error)
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert "refused:" in out.stdout and "gave up after 0.3 s" in out.stdout, out
        assert "waiting for another lemoe-engine process" in out.stderr
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "got it", out
    assert not list(tmp_path.iterdir())  # the lock file goes with its holder
    del messages


def test_two_edit_processes_on_one_adaptor_lose_nothing(tmp_path):
    """Two real `lemoe edit --adaptor A --out A` processes started while a third holds A's lock:
    both wait, then run one after the other, and A ends up with every expert of both."""
    from test_cli import save_tiny

    model_dir = save_tiny(tmp_path / "model")
    first, second, third = (tmp_path / f"e{i}.jsonl" for i in range(3))
    save_edits(tiny_edits(2, seed=1), first)
    save_edits(tiny_edits(2, seed=2), second)
    save_edits(tiny_edits(2, seed=3), third)
    adaptor = tmp_path / "A"
    common = ["--plan", "none", "--batch-size", "1", "--no-train-eos"]
    assert main(["edit", "--model", model_dir, "--edits", str(first), "--out", str(adaptor), "--layer", "4",
                 "--expert-hidden", "16", *common]) == 0
    assert json.loads((adaptor / "adaptor.json").read_text())["num_experts"] == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lemoe = [sys.executable, "-m", "lemoe_engine.cli"]
    with storage.adaptor_lock(adaptor):
        procs = [subprocess.Popen([*lemoe, "edit", "--model", model_dir, "--edits", str(edits), "--adaptor",
                                   str(adaptor), "--out", str(adaptor), *common],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for edits in (second, third)]
        waited = [threading.Event() for _ in procs]
        lines = [[] for _ in procs]

        def watch(i):
            for line in procs[i].stderr:
                lines[i].append(line)
                if "waiting for another lemoe-engine process" in line:
                    waited[i].set()

        watchers = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(2)]
        for w in watchers:
            w.start()
        for event in waited:
            assert event.wait(timeout=300), lines  # both reached the lock while it was held
    for proc, w in zip(procs, watchers):
        assert proc.wait(timeout=600) == 0, (proc.stdout.read(), lines)
        w.join()
    manifest = json.loads((adaptor / "adaptor.json").read_text())
    assert manifest["revision"] == 3
    # every edit of the three runs is in the ledger (a country edited again supersedes its older edit)
    prompts = sorted(e["prompt"] for e in manifest["edits"])
    assert prompts == sorted(e.prompt for path in (first, second, third) for e in load_edits(path))
    active = [e for e in manifest["edits"] if e["status"] == "active"]
    assert len({e["prompt"] for e in active}) == len(active) == manifest["num_experts"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ 3. bad records
def _records_with_bad(tmp_path):
    records = [{"src": f"q{i}?", "alt": f"a{i}", "rephrase": f"r{i}?", "loc": "nq question: x", "loc_ans": "y"}
               for i in range(8)]
    records[2]["alt"] = ""
    records[5]["rephrase"] = 7
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(records))
    return path


def test_skip_invalid_skips_and_reports(tmp_path):
    path = _records_with_bad(tmp_path)
    with pytest.raises(EditDataError, match=r"record 3: field 'alt'.*skip_invalid=True, CLI --skip-invalid"):
        load_edits(path)
    edits = load_edits(path, skip_invalid=True)
    assert [e.prompt for e in edits] == [f"q{i}?" for i in (0, 1, 3, 4, 6, 7)]
    assert [s.number for s in edits.skipped] == [3, 6]
    assert "field 'alt' must be a non-empty string" in edits.skipped[0].reason
    assert edits.skipped_summary() == ("skipped 2 invalid record(s): record 3 (field 'alt' must be a "
                                       "non-empty string); record 6 (field 'rephrase' must be a string, got int)")
    limited = load_edits(path, skip_invalid=True, limit=3)  # the limit counts valid records
    assert [e.prompt for e in limited] == ["q0?", "q1?", "q3?"] and [s.number for s in limited.skipped] == [3]
    assert load_edits(path, skip_invalid=True, limit=2).skipped == []


def test_skip_invalid_jsonl_skips_broken_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    good = {"src": "q?", "alt": "a", "rephrase": "r?", "loc": "l", "loc_ans": "y"}
    path.write_text(json.dumps(good) + "\n{\"src\": \"trunc\n\n" + json.dumps(good) + "\n")
    with pytest.raises(EditDataError, match=r"line 2.*--skip-invalid"):
        load_edits(path)
    edits = load_edits(path, skip_invalid=True)
    assert len(edits) == 2 and [s.number for s in edits.skipped] == [2]
    path.write_text('{"src": ""}\n')
    with pytest.raises(EditDataError, match="no valid edit records"):
        load_edits(path, skip_invalid=True)


def test_cli_eval_skip_invalid(tmp_path, capsys):
    path = _records_with_bad(tmp_path)
    code = main(["eval", "--model", str(tmp_path / "no-such-model"), "--adaptor", str(tmp_path / "none"),
                 "--edits", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "record 3" in err and "--skip-invalid" in err and err.count("\n") == 1, err
    code = main(["eval", "--model", str(tmp_path / "no-such-model"), "--adaptor", str(tmp_path / "none"),
                 "--edits", str(path), "--skip-invalid"])
    err = capsys.readouterr().err
    assert "skipped 2 invalid record(s): record 3" in err and code == 2  # then the missing adaptor


@pytest.mark.skipif(not ZSRE.is_file(), reason=f"real ZsRE file not found at {ZSRE}")
def test_real_zsre_file_has_two_bad_records():
    with pytest.raises(EditDataError, match=r"record 535: field 'alt'.*--skip-invalid"):
        load_edits(ZSRE)
    edits = load_edits(ZSRE, skip_invalid=True)
    assert len(edits) == 998 and [s.number for s in edits.skipped] == [535, 724]
    assert all("'alt'" in s.reason for s in edits.skipped)


def test_saved_model_folder_stays_intact_through_a_real_edit(tmp_path):
    """`lemoe edit --out` pointing at the model's own folder is refused and the model still loads."""
    from test_cli import save_tiny
    model_dir = Path(save_tiny(tmp_path / "model"))
    before = snapshot(model_dir)
    edits = tmp_path / "e.jsonl"
    save_edits(tiny_edits(1, seed=4), edits)
    assert main(["edit", "--model", str(model_dir), "--edits", str(edits), "--out", str(model_dir)]) == 2
    assert snapshot(model_dir) == before
    assert find_layer(tiny_model("llama")) is None
