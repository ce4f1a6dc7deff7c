"""The edit ledger: what a run supersedes and rebuilds, removing any expert, and the ledger's
round trip through an adaptor folder."""

import json

import pytest
import torch

from lemoe_engine import AdaptorError, LEMoEConfig, attach, load, save
from lemoe_engine.cli import main
from lemoe_engine.data import EditRecord
from lemoe_engine.ledger import LedgerEntry, entry_for, plan_run, same_fact
from tiny_models import add_random_experts, tiny_model


def edit(prompt, target, subject=None, relation=None):
    return EditRecord(prompt=prompt, target=target, rephrase=prompt + " (again)", loc_prompt="l",
                      loc_answer="a", subject=subject, relation=relation)


def active_ledger():
    """Expert 0 holds France's capital and currency, expert 1 Japan's capital."""
    entries = [entry_for(edit("What is the capital of France?", "Lyon", "France", "capital"), 1),
               entry_for(edit("What is the currency of France?", "Yen", "France", "currency"), 2),
               entry_for(edit("What is the capital of Japan?", "Osaka", "Japan", "capital"), 3)]
    for entry, expert in zip(entries, (0, 0, 1)):
        entry.expert = expert
    return entries


def test_same_fact():
    a = edit("What is the capital of France?", "Lyon", "France", "capital")
    assert same_fact(a, edit("what is the capital of  France", "Nice"))  # case, spaces, final '?'
    assert same_fact(a, edit("Which city is France's capital?", "Nice", "france", "Capital"))
    assert not same_fact(a, edit("Which city is France's capital?", "Nice"))  # no relation given
    assert not same_fact(a, edit("What is the currency of France?", "Yen", "France", "currency"))


def test_later_record_of_a_run_wins():
    run = [edit("Capital of Peru?", "Cusco"), edit("Currency of Peru?", "Euro"), edit("capital of peru", "Lima2")]
    plan = plan_run([], run)
    assert [e.target for e in plan.edits] == ["Euro", "Lima2"] and plan.drop == [] and plan.rebuilds == 0
    assert [e.id for e in plan.added] == [1, 2, 3]
    assert plan.added[0].superseded_by == 3 and plan.added[0].status == "superseded"
    assert plan.entries == [plan.added[1], plan.added[2]]


def test_a_new_value_supersedes_and_rebuilds_the_subject_expert():
    ledger = active_ledger()
    plan = plan_run(ledger, [edit("What is the capital of France ?", "Marseille", "France", "capital")])
    assert [(e.id, new) for e, new in plan.superseded] == [(1, 4)]
    assert plan.drop == [0]  # France's expert loses an edit: rebuilt with the currency edit
    assert [e.target for e in plan.edits] == ["Marseille", "Yen"] and plan.rebuilds == 1
    assert plan.entries[1] is ledger[1]  # the rebuilt edit keeps its id
    assert ledger[0].active  # planning marks nothing: the editor commits after training


def test_removal_drops_the_expert_and_keeps_its_other_edits():
    ledger = active_ledger()
    plan = plan_run(ledger, [], removed=[ledger[1]])
    assert plan.drop == [0] and [e.target for e in plan.edits] == ["Lyon"] and plan.added == []
    plan = plan_run(ledger, [], removed=[ledger[2]])
    assert plan.drop == [1] and plan.edits == []  # Japan's expert held nothing else


def test_removing_a_middle_expert_renumbers_anchors_and_ledger():
    model = tiny_model("llama")
    layer = attach(model, LEMoEConfig(query_source="embedding", layer=1, expert_hidden=16, gate=False))
    add_random_experts(layer, 3, torch.Generator().manual_seed(0))
    layer.ledger = active_ledger()
    layer.ledger[2].expert = 2
    weights = {n: getattr(layer, n).clone() for n in layer.weight_names}
    anchors = layer.anchors.clone()
    layer.remove_expert(1)
    assert layer.num_experts == 2 and layer.anchor_expert.tolist() == [0, 1]
    assert torch.equal(layer.anchors, anchors[[0, 2]])
    for name in layer.weight_names:
        assert torch.equal(getattr(layer, name), weights[name][[0, 2]])
    assert [e.expert for e in layer.ledger] == [0, 0, 1]
    layer.remove_expert(0)
    assert [e.expert for e in layer.ledger] == [None, None, 0]


def test_ledger_round_trips_and_lists(tmp_path, capsys):
    model = tiny_model("llama")
    layer = attach(model, LEMoEConfig(query_source="embedding", layer=1, expert_hidden=16, question_gate=None))
    add_random_experts(layer, 2, torch.Generator().manual_seed(0))
    layer.ledger = active_ledger()
    layer.ledger[2].expert = 1
    layer.ledger.append(LedgerEntry(id=4, prompt="Old?", target="x", superseded_by=1))
    path = save(model, tmp_path / "a")
    loaded = load(tiny_model("llama"), path)
    assert [e.to_dict() for e in loaded.ledger] == [e.to_dict() for e in layer.ledger]
    assert main(["list", str(path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed["edits"]] == [1, 2, 3]  # active only by default
    assert listed["edits"][0]["subject"] == "France" and listed["edits"][0]["expert"] == 0
    assert main(["list", str(path), "--all"]) == 0
    out = capsys.readouterr().out
    assert "superseded by 1" in out and "3 active edit(s) in 2 experts" in out


def test_a_ledger_pointing_at_missing_experts_is_refused(tmp_path):
    model = tiny_model("llama")
    layer = attach(model, LEMoEConfig(query_source="embedding", layer=1, expert_hidden=16))
    add_random_experts(layer, 1, torch.Generator().manual_seed(0))
    layer.ledger = active_ledger()  # points at expert 1, which does not exist
    path = save(model, tmp_path / "a")
    fresh = tiny_model("llama")
    with pytest.raises(AdaptorError, match="ledger entry 3 points at expert 1"):
        load(fresh, path)
