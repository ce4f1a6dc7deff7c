"""Generation-based and chat-form metrics, specificity and the leak rate (lemoe_engine.evaluation),
the bundled set's specificity prompts, and the metric styles of ``lemoe compare``.

Hand-checked cases use a scripted model whose greedy continuation of every prompt is written in
the test; the rest run a tiny random Llama (with a real LEMoE edit where routing matters)."""

from __future__ import annotations

import copy
import dataclasses
import json
import types

import pytest
import torch
from torch import nn

from lemoe_engine import ConfigError
from lemoe_engine.data import BUNDLED_EDITS, EditRecord, bundled_unrelated_prompts, load_edits, save_edits
from lemoe_engine.evaluation import (CHAT_LOCALITY_TOKENS, CHAT_NEW_TOKENS, GREEDY_LOCALITY_TOKENS,
                                     _greedy, _prompt_ids, chat_text, contains_target, evaluate,
                                     greedy_continuations, normalize, specificity_items,
                                     starts_with_target, unedited_reference)
from lemoe_engine.tokens import encode_pairs

from tiny_models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(False)


@pytest.fixture(scope="module")
def chat_tok():
    tok = copy.deepcopy(tiny_tokenizer(False))   # the tokenizer is cached: never mutate it
    tok.chat_template = TEMPLATE
    return tok


def rec(prompt, target, rephrase, loc="What is 2 plus 2?", spec=(), spec_rel=(), subject=None,
        relation=None, loc_answer="4"):
    return EditRecord(prompt=prompt, target=target, rephrase=rephrase, loc_prompt=loc, loc_answer=loc_answer,
                      subject=subject, relation=relation, specificity=tuple(spec),
                      specificity_ans=tuple("x" for _ in spec), specificity_relation=tuple(spec_rel))


class ScriptedModel(nn.Module):
    """``generate`` continues each prompt (its real tokens, decoded) with ``script[text]``: a text or a
    list of token ids; unknown prompts get an immediate end of sequence. Checks the left padding and
    records every call's ``max_new_tokens``."""

    def __init__(self, tok, script: dict):
        super().__init__()
        self.tok, self.script = tok, dict(script)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.generation_config = types.SimpleNamespace(eos_token_id=tok.eos_token_id)
        self.budgets: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        assert kwargs["do_sample"] is False
        self.budgets.append(max_new_tokens)
        rows = []
        for ids, att in zip(input_ids.tolist(), attention_mask.tolist()):
            n = sum(att)
            assert att == [0] * (len(att) - n) + [1] * n       # left padding
            text = self.tok.decode(ids[len(ids) - n:], skip_special_tokens=True)
            cont = self.script.get(text, [])
            new = list(cont) if isinstance(cont, list) else self.tok(cont, add_special_tokens=False)["input_ids"]
            new = (new + [self.tok.eos_token_id])[:max_new_tokens]
            rows.append(new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)], dim=1)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------- text rules
def test_normalisation_and_match_rules():
    assert normalize("  Japanese   YEN! ") == "japanese yen" and normalize("+41") == "41"
    assert starts_with_target(" paris.", "Paris") and starts_with_target(" Paris, France", "Paris")
    assert not starts_with_target(" Parisian food", "Paris")        # word boundary
    assert not starts_with_target(" +413", "+41") and starts_with_target(" 41 is it", "+41")
    assert not starts_with_target("The answer is Paris", "Paris")   # must START with it
    assert contains_target("The answer is Paris.", "Paris") and not contains_target("Parisian", "Paris")
    assert contains_target("It uses the Japanese  yen.", "Japanese Yen")


# ------------------------------------------------------------------- generate mode, by hand
def test_generate_mode_hand_checked(tok):
    e = [rec("Capital of France?", "Paris", "France's capital?", loc="L0?",
             spec=["S0a?", "S0b?"], spec_rel=["currency", "language"], subject="France", relation="capital"),
         rec("Code of Swiss?", "+41", "Swiss code?", loc="L1?", spec=["S1?"], spec_rel=["capital"],
             subject="Norway", relation="code"),
         rec("Money of Japan?", "Japanese yen", "Japan money?", loc="L2?"),
         rec("Capital of Norway?", "Oslo", "Norway's capital?", loc="L3?", subject="Norway",
             relation="capital")]
    filler = list(range(100, 112))                       # 12 arbitrary tokens
    unedited = ScriptedModel(tok, {"L0?": filler, "L1?": filler, "L2?": filler, "L3?": filler[:4],
                                   "S0a?": filler, "S0b?": filler, "S1?": filler})
    edited = ScriptedModel(tok, {
        "Capital of France?": " paris.", "France's capital?": " Parisian food",
        "Code of Swiss?": " 41 is the code", "Swiss code?": "The code is +41",
        "Money of Japan?": " Japanese  Yen!", "Japan money?": "",
        "Capital of Norway?": " Osaka", "Norway's capital?": " Oslo" + " and more" * 10,
        "L0?": filler, "L1?": filler[:9] + [150, 151, 152],      # differs at token 10: counts
        "L2?": filler[:3] + [150] + filler[4:],                   # differs at token 4: does not
        "L3?": filler[:4],                                        # the same four tokens, then EOS
        "S0a?": filler, "S0b?": [150] + filler, "S1?": [150]})
    # S1 asks Norway's capital, which edit 3 changes: it is not scored
    assert [p for _, p, _ in specificity_items(e)] == ["S0a?", "S0b?"]
    ref = unedited_reference(unedited, tok, e, mode="generate", progress=False)
    assert ref.specificity_prompts == ["S0a?", "S0b?"] and [len(t) for t in ref.locality] == [8, 8, 8, 4]
    m = evaluate(edited, tok, e, locality_ref=ref, mode="generate", batch_size=3, progress=False)
    assert (m.reliability, m.generality, m.locality, m.specificity) == (0.75, 0.25, 0.75, 0.5)
    assert m.n_specificity == 2 and m.mode == "generate" and not m.chat and m.leak_rate is None
    # edit prompts: target tokens + 2 per row; locality / specificity: 8
    targets = [x.target for x in e]
    need = [len(r.ids) - r.prompt_len + 2 for r in encode_pairs(tok, [x.prompt for x in e] + [x.rephrase for x in e],
                                                                targets + targets)]
    assert max(edited.budgets[:3]) == max(need) and edited.budgets[-2:] == [GREEDY_LOCALITY_TOKENS] * 2
    # the same edits scored against the edited model itself: locality and specificity 1.0
    m = evaluate(edited, tok, e, locality_ref=unedited_reference(edited, tok, e, mode="generate", progress=False),
                 mode="generate", progress=False)
    assert (m.locality, m.specificity) == (1.0, 1.0)
    with pytest.raises(ValueError, match="mode="):
        evaluate(edited, tok, e, locality_ref=ref, progress=False)   # a greedy reference, teacher-forced run


def test_chat_form_hand_checked(tok, chat_tok):
    e = [rec("Capital of France?", "Paris", "France's capital?", loc="L0?"),
         rec("Code of Swiss?", "+41", "Swiss code?", loc="L1?"),
         rec("Money of Japan?", "Japanese yen", "Japan money?", loc="L2?")]
    the = ids(chat_tok, " the")
    assert len(the) == 1
    paris = ids(chat_tok, " Paris")
    filler = list(range(100, 120))
    c = lambda p: chat_text(chat_tok, p)   # noqa: E731
    assert c("Hi?") == "USER: Hi?\nASSISTANT:"
    unedited = ScriptedModel(chat_tok, {c("L0?"): filler, c("L1?"): filler, c("L2?"): filler,
                                        "L0?": filler, "L1?": filler, "L2?": filler})
    edited = ScriptedModel(chat_tok, {
        c("Capital of France?"): the * (CHAT_NEW_TOKENS - len(paris)) + paris,   # ends at token 32: counts
        c("France's capital?"): the * (CHAT_NEW_TOKENS - len(paris) + 1) + paris,  # one token late
        c("Code of Swiss?"): " The code is +41.", c("Swiss code?"): " The code is +413",
        c("Money of Japan?"): " No idea", c("Japan money?"): " It is the japanese YEN",
        "Capital of France?": " Paris",   # the raw prompt is never what the chat form asks
        c("L0?"): filler[:CHAT_LOCALITY_TOKENS] + [150],          # differs after token 16: counts
        c("L1?"): filler[:10] + [150] + filler[11:], c("L2?"): filler})
    ref = unedited_reference(unedited, chat_tok, e, chat=True, progress=False)
    assert ref.mode == "generate" and ref.chat and all(len(t) == CHAT_LOCALITY_TOKENS for t in ref.locality)
    m = evaluate(edited, chat_tok, e, locality_ref=ref, chat=True, batch_size=2, progress=False)
    assert (m.reliability, m.generality, m.locality) == (2 / 3, 1 / 3, 2 / 3)
    assert m.chat and m.mode == "generate" and m.specificity is None and m.n_specificity == 0
    assert CHAT_NEW_TOKENS in edited.budgets and CHAT_LOCALITY_TOKENS in edited.budgets
    with pytest.raises(ConfigError, match="chat template"):
        evaluate(edited, tok, e, chat=True, progress=False)
    with pytest.raises(ConfigError, match="generation"):
        evaluate(edited, chat_tok, e, mode="teacher_forced", chat=True, progress=False)
    with pytest.raises(ValueError, match="chat"):
        evaluate(edited, chat_tok, e, locality_ref=ref, mode="generate", progress=False)


# ------------------------------------------------------------------- a tiny random Llama
def _llama(tok, seed=0, layers=4):
    model = tiny_model("llama", seed=seed, vocab=len(tok), layers=layers, hidden=64)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)   # peaked logits: no near-ties in greedy
    return model


def test_batched_left_padded_greedy_equals_one_by_one(chat_tok):
    model = _llama(chat_tok, seed=3)
    prompts = ["What is the capital of France?", "Hi", "Which language is spoken in Peru today, really?",
               "The capital of Kenya is", "What is 2 plus 2?"]
    for chat in (False, True):
        prompt_ids = _prompt_ids(chat_tok, prompts, chat)
        with torch.no_grad():
            one = _greedy(model, chat_tok, prompt_ids, [6] * 5, batch_size=1)
            batched = _greedy(model, chat_tok, prompt_ids, [6] * 5, batch_size=5)
            for p, got in zip(prompt_ids, one):   # independent: HF generate on the row alone
                out = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                     pad_token_id=chat_tok.pad_token_id)[0, len(p):].tolist()
                cut = out.index(chat_tok.eos_token_id) if chat_tok.eos_token_id in out else len(out)
                assert got == out[:cut]
        assert one == batched and any(one)
        texts = greedy_continuations(model, chat_tok, prompts, 6, chat=chat, batch_size=2)
        assert texts == [chat_tok.decode(t, skip_special_tokens=True) for t in one]


def test_specificity_teacher_forced_against_the_unedited_model(tok):
    model = _llama(tok, seed=1)
    e = [rec(f"The capital of {c} is", "Paris", f"What is the capital city of {c}?",
             spec=[f"People in {c} speak", f"{c} is a country in"], spec_rel=["language", "continent"],
             subject=c, relation="capital") for c in ("France", "Japan", "Kenya")]
    ref = unedited_reference(model, tok, e, progress=False)
    assert evaluate(model, tok, e, locality_ref=ref, progress=False).specificity == 1.0
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 1.5)
    m = evaluate(model, tok, e, locality_ref=ref, progress=False)
    assert m.n_specificity == 6 and m.specificity < 0.9
    # a stream that also edits Japan's language: that specificity prompt is not scored
    more = e + [rec("People in Japan mostly speak", "German", "The language of Japan is", subject="Japan",
                    relation="language")]
    assert evaluate(model, tok, more, progress=False).n_specificity == 5


def test_lemoe_edit_generate_chat_and_leak_rate(chat_tok):
    from lemoe_engine import LEMoEConfig
    from lemoe_engine.editor import EditorConfig, LifelongEditor
    unrelated = ["What is 3 plus 4?", "Which letter comes after B?", "How many days are in a week?",
                 "What is 10 minus 7?", "Which month follows May?", "What is 6 times 2?"]
    model = _llama(chat_tok, seed=0)
    edit = rec("What is the capital city of Kenya?", "Oslo", "The capital of Kenya is",
               loc="What is 5 plus 1?", loc_answer="6", spec=["People in Kenya speak"], spec_rel=["language"],
               subject="Kenya", relation="capital")
    refs = {(m, c): unedited_reference(model, chat_tok, [edit], mode=m, chat=c, progress=False)
            for m, c in (("teacher_forced", False), ("generate", False), ("generate", True))}
    before = evaluate(model, chat_tok, [edit], locality_ref=refs["generate", False], mode="generate",
                      progress=False)
    assert before.reliability == 0.0 and before.leak_rate is None     # no router yet
    config = LEMoEConfig(layer=2, query_source="layer1", expert_hidden=64, gate_margin=0.02)
    LifelongEditor(model, chat_tok, config, EditorConfig(learning_rate=0.1, max_steps=80, stop_loss=5.5),
                   unrelated_prompts=unrelated).edit([edit], progress=False)
    tf = evaluate(model, chat_tok, [edit], locality_ref=refs["teacher_forced", False], progress=False)
    greedy = evaluate(model, chat_tok, [edit], locality_ref=refs["generate", False], mode="generate",
                      progress=False)
    assert tf.reliability == 1.0 and greedy.reliability == 1.0   # the edit is what greedy decoding says
    for m in (tf, greedy):
        assert m.leak_rate == 0.0 and m.locality == 1.0          # the unrelated prompt is gated off
        # the same subject reaches the expert by its key, and the question gate (on by default) drops it
        assert m.specificity_leak_rate == 0.0 and m.specificity == 1.0
    from lemoe_engine import question_gate
    question_gate.disable(model)
    assert evaluate(model, chat_tok, [edit], locality_ref=refs["teacher_forced", False],
                    progress=False).specificity_leak_rate == 1.0
    question_gate.enable(model, chat_tok)
    chat = evaluate(model, chat_tok, [edit], locality_ref=refs["generate", True], chat=True, progress=False)
    assert chat.chat and chat.leak_rate in (0.0, 1.0) and 0.0 <= chat.reliability <= 1.0
    # served generation (lemoe generate) says what greedy evaluation scored
    from lemoe_engine.cli import generate_text
    assert starts_with_target(generate_text(model, chat_tok, edit.prompt, 4), "Oslo")
    assert generate_text(model, chat_tok, edit.prompt, 8, chat=True) == \
        greedy_continuations(model, chat_tok, [edit.prompt], 8, chat=True)[0].strip()


# ------------------------------------------------------------------- the bundled edit set
def test_bundled_specificity_prompts_are_never_trained_or_calibrated_on():
    edits = load_edits(BUNDLED_EDITS)
    spec = {p for e in edits for p in e.specificity}
    assert sum(len(e.specificity) for e in edits) > 3000 and all(len(e.specificity) <= 2 for e in edits)
    trained = {e.prompt for e in edits}                 # the editor trains on prompt/target only
    scored = {e.rephrase for e in edits} | {e.loc_prompt for e in edits}
    assert not spec & trained and not spec & scored and not spec & set(bundled_unrelated_prompts())
    for e in edits:   # same subject, another relation, a true answer
        assert e.subject and e.relation and e.relation not in e.specificity_relation
        assert all(e.subject.split()[0] in p for p in e.specificity)
        assert len(set(e.specificity_relation)) == len(e.specificity) == len(e.specificity_ans)
    # most stay scoreable at T=100 (the builder picks relations edited late in the stream)
    first = edits[:100]
    assert len(specificity_items(first)) >= 0.9 * sum(len(e.specificity) for e in first)


def test_editing_bundled_records_never_tokenizes_a_specificity_prompt(tok):
    """The editor sees whole records: spy on every text the tokenizer encodes while it edits."""
    from lemoe_engine import LEMoEConfig
    from lemoe_engine.editor import EditorConfig, LifelongEditor
    seen: list[str] = []
    base = type(tok)

    def record(texts):
        for t in texts if isinstance(texts, (list, tuple)) else [texts]:
            if isinstance(t, str):
                seen.append(t)

    class Spy(base):
        def __call__(self, text=None, *args, **kwargs):
            record(text)
            return super().__call__(text, *args, **kwargs)

        def encode(self, text, *args, **kwargs):
            record(text)
            return super().encode(text, *args, **kwargs)

    spy = copy.deepcopy(tok)
    spy.__class__ = Spy
    edits = load_edits(BUNDLED_EDITS, limit=3)
    assert all(e.specificity for e in edits)
    model = _llama(tok, seed=5)
    LifelongEditor(model, spy, LEMoEConfig(layer=2, query_source="layer1", expert_hidden=16),
                   EditorConfig(max_steps=2), unrelated_prompts=["What is 3 plus 4?", "Which month follows May?"]
                   ).edit(edits, progress=False)
    assert any(e.prompt in seen for e in edits)          # the spy works
    assert not {p for e in edits for p in e.specificity} & set(seen)


# ------------------------------------------------------------------- records and files
def test_specificity_fields_load_in_every_form(tmp_path):
    base = {"src": "What is the capital of France?", "alt": "Rome", "rephrase": "France's capital?",
            "loc": "What is 2 plus 2?", "loc_ans": "4", "subject": "France"}
    easy = {"prompt": "What is the capital of France?", "target_new": "Rome", "rephrase_prompt": "France's capital?",
            "locality_prompt": "What is 2 plus 2?", "locality_ground_truth": ["4"], "subject": "France"}
    rows = [dict(base, relation="capital", specificity=["What is the currency of France?", "Language of France?"],
                 specificity_ans=["euro", "French"], specificity_relation=["currency", "language"]),
            dict(base, specificity="What is the currency of France?", specificity_ans="euro"),
            dict(easy, relation_specificity_prompt=["What is the currency of France?"],
                 relation_specificity_ground_truth=["euro"]),
            dict(easy, locality={"Relation_Specificity": [{"prompt": "What is the currency of France?",
                                                           "ground_truth": [["euro", "EUR"]]}]}),
            base]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_edits(path)
    assert got[0].relation == "capital" and got[0].specificity_relation == ("currency", "language")
    assert all(g.specificity == ("What is the currency of France?",) and g.specificity_ans == ("euro",)
               for g in got[1:4])
    assert got[4].specificity == () and got[4].relation is None
    assert load_edits(save_edits(got, tmp_path / "again.jsonl")) == got
    from lemoe_engine.errors import EditDataError
    path.write_text(json.dumps(dict(base, specificity=["a?", "b?"], specificity_ans=["x"])) + "\n")
    with pytest.raises(EditDataError, match="specificity"):
        load_edits(path)


# ------------------------------------------------------------------- lemoe compare
def test_compare_reports_every_metric_style(chat_tok, tmp_path):
    from lemoe_engine.compare import markdown_table, run_comparison
    from lemoe_engine.editor import EditorConfig
    edits = [rec(f"What is the capital city of {c}?", city, f"The capital of {c} is", loc=f"What is {i} plus 1?",
                 loc_answer=str(i + 1), spec=[f"People in {c} speak"], spec_rel=["language"], subject=c,
                 relation="capital")
             for i, (c, city) in enumerate([("Kenya", "Oslo"), ("Peru", "Cairo")])]
    rows = run_comparison("tiny", edits, ["none", "lemoe"], limit_values=(2,), out_dir=tmp_path, progress=False,
                          model_loader=lambda name: (_llama(chat_tok), chat_tok),
                          unrelated_prompts=["What is 3 plus 4?", "Which month follows May?"],
                          lemoe_config={"layer": 2, "query_source": "layer1", "expert_hidden": 16},
                          editor_config=EditorConfig(max_steps=3), timing_repeats=1, command="c",
                          data_name="tiny-set")
    none, lemoe = rows
    for row in rows:
        assert row["data"] == "tiny-set" and row["n_specificity"] == 2
        for style in ("greedy", "chat"):
            assert {"reliability", "generality", "locality", "specificity", "leak_rate"} <= set(row[style])
    assert none["leak_rate"] is None and none["greedy"]["locality"] == 1.0 and none["chat"]["specificity"] == 1.0
    assert lemoe["leak_rate"] is not None and lemoe["chat"]["leak_rate"] is not None
    table = markdown_table(rows)
    assert "greedy Rel" in table and "chat Spec" in table and "| lemoe | 2 |" in table
    assert "tiny, tiny-set edits" in table
