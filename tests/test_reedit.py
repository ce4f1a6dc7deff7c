"""Facts that change again and edits that are taken back (tiny models, real training):
a newer edit of the same fact wins everywhere, across a save and reload too; `remove` of any edit
restores the unedited answer for it and keeps every other edit, also of the same subject."""

import json

import torch

from lemoe_engine import find_layer, load, query_mask, save
from lemoe_engine.cli import main
from lemoe_engine.data import EditRecord, save_edits
from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.evaluation import greedy_token_ids
from test_editor import CONFIG, FAST, UNRELATED, llama_for, target_argmax_hits
from tiny_models import tiny_tokenizer


def fact(prompt, target, subject, relation):
    return EditRecord(prompt=prompt, target=target, rephrase=prompt, loc_prompt="What is 2 plus 2?",
                      loc_answer="4", subject=subject, relation=relation)


CAPITAL = "What is the capital city of {}?"
LANGUAGE = "Which language do people speak in {}?"


def answer_tokens(model, tok, edit):
    """The model's greedy answer to the edit's prompt (its first 3 tokens)."""
    return greedy_token_ids(model, tok, [edit.prompt], 3)[0]


def test_a_newer_value_wins_across_save_and_reload(tmp_path):
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=3)
    old = fact(CAPITAL.format("Kenya"), "Paris", "Kenya", "capital")
    language = fact(LANGUAGE.format("Kenya"), "Norwegian", "Kenya", "language")
    other = fact(CAPITAL.format("Peru"), "Oslo", "Peru", "capital")
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    editor.edit([old, language, other])
    assert all(target_argmax_hits(model, tok, e) for e in (old, language, other))
    path = save(model, tmp_path / "a")
    experts_before = find_layer(model).num_experts

    fresh = llama_for(tok, seed=3)
    load(fresh, path, backend="eager", tokenizer=tok)
    new = fact(CAPITAL.format("Kenya"), "Tokyo", "Kenya", "capital")
    LifelongEditor(fresh, tok, editor_config=FAST, unrelated_prompts=UNRELATED).edit([new], save_to=path)
    assert target_argmax_hits(fresh, tok, new)
    assert not target_argmax_hits(fresh, tok, old)  # the old value is gone, not outvoted
    assert target_argmax_hits(fresh, tok, language) and target_argmax_hits(fresh, tok, other)
    ledger = {e.id: e for e in find_layer(fresh).ledger}
    assert ledger[1].status == "superseded" and ledger[1].superseded_by == 4 and ledger[1].expert is None
    assert ledger[4].active and ledger[4].expert is not None
    # the old value's expert was dropped and one expert (the new value, with whatever else the old
    # expert held) replaced it
    assert sum(e.active for e in ledger.values()) == 3 and find_layer(fresh).num_experts == experts_before

    reloaded = llama_for(tok, seed=3)
    load(reloaded, path, tokenizer=tok)
    assert target_argmax_hits(reloaded, tok, new) and not target_argmax_hits(reloaded, tok, old)


def test_within_a_run_the_later_record_wins():
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=4)
    first = fact(CAPITAL.format("Chile"), "Paris", "Chile", "capital")
    second = fact(CAPITAL.format("Chile") + " ", "Tokyo", "Chile", "capital")
    LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED).edit([first, second])
    assert target_argmax_hits(model, tok, second) and not target_argmax_hits(model, tok, first)
    statuses = [(e.target, e.status) for e in find_layer(model).ledger]
    assert statuses == [("Paris", "superseded"), ("Tokyo", "active")]


def test_remove_any_edit_restores_it_and_keeps_the_others(tmp_path, capsys):
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=5)
    model_dir = tmp_path / "model"  # the base model, for the CLI part below
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    edits = [fact(CAPITAL.format("Ghana"), "Berlin", "Ghana", "capital"),
             fact(LANGUAGE.format("Ghana"), "Hindi", "Ghana", "language"),
             fact(CAPITAL.format("Nepal"), "Lima", "Nepal", "capital"),
             fact(LANGUAGE.format("Egypt"), "Swahili", "Egypt", "language")]
    unedited = [answer_tokens(model, tok, e) for e in edits]
    # a random tiny model hardly tells its prompts apart: give the negatives time to converge
    editor = LifelongEditor(model, tok, CONFIG, EditorConfig(learning_rate=0.1, max_steps=300, stop_loss=5.5),
                            unrelated_prompts=UNRELATED)
    editor.edit(edits, plan="none", batch_size=2)  # experts {Ghana x2}, {Nepal, Egypt}
    assert all(target_argmax_hits(model, tok, e) for e in edits)
    assert [e.expert for e in editor.layer.ledger] == [0, 0, 1, 1]
    # one edit of each two-edit expert: both are rebuilt from their other edit
    report = editor.remove([3, 1])
    assert report.removed == [1, 3] and report.rebuilt == 2 and report.dropped_experts == 2
    for i in (0, 2):
        assert answer_tokens(model, tok, edits[i]) == unedited[i]
    assert target_argmax_hits(model, tok, edits[1]) and target_argmax_hits(model, tok, edits[3])
    assert editor.layer.num_experts == 2

    # the same through the CLI, by subject, on a saved adaptor
    path = save(model, tmp_path / "adaptor")
    assert main(["remove", str(path), "--model", str(model_dir), "--subject", "egypt", "--out", str(path),
                 "--no-progress"]) == 0
    assert "removed 1 edit(s) (4)" in capsys.readouterr().out
    assert main(["list", str(path), "--json", "--all"]) == 0
    listed = {e["id"]: e["status"] for e in json.loads(capsys.readouterr().out)["edits"]}
    assert listed == {1: "removed", 2: "active", 3: "removed", 4: "removed"}
    assert main(["remove", str(path), "--model", str(model_dir), "--edit", "3", "--out", str(path)]) == 2
    assert "no active edit with id 3 (removed)" in capsys.readouterr().err


def test_edits_file_round_trip_keeps_relation(tmp_path):
    edit = fact(CAPITAL.format("Cuba"), "Lima", "Cuba", "capital")
    path = save_edits([edit], tmp_path / "e.jsonl")
    assert '"relation": "capital"' in path.read_text()
