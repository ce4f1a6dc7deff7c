"""The question gate (``question_gate``): a route is served only when the prompt asks one of its
expert's edited questions (sentence-embedding cosine); otherwise the output is the unedited
model's, bit for bit."""

import pytest
import torch

from lemoe_engine import ConfigError, LEMoEConfig, attach, question_gate
from lemoe_engine.ledger import LedgerEntry
from lemoe_engine.patching import adaptors_disabled
from tiny_models import tiny_model, tiny_tokenizer

EDITED = "What is the capital city of France?"
PARAPHRASE = "What's the capital city of France?"
OTHER_RELATION = "Which currency does France use?"
UNRELATED = "What is 3 plus 4?"


def _edited(top_k=1, experts=1):
    """A tiny model whose adaptor routes every prompt to its experts (gate off, random non-zero
    weights), expert 0 holding the edit ``EDITED`` and expert 1 (if any) an unrelated one."""
    tok = tiny_tokenizer(False)
    model = tiny_model("llama", seed=3, vocab=len(tok), layers=3, hidden=48)
    model.config.pad_token_id = tok.pad_token_id
    layer = attach(model, LEMoEConfig(layer=1, query_source="layer1", expert_hidden=16, top_k=top_k,
                                      gate=False))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    for e in range(experts):
        layer.add_expert(torch.randn(layer.anchors.shape[1], generator=g), trainable=False)
        for name in layer.weight_names:
            getattr(layer, name).data[e] = torch.randn(getattr(layer, name).shape[1:], generator=g) * 0.5
    prompts = [EDITED, "How many legs does a spider have?"]
    layer.ledger = [LedgerEntry(id=e + 1, prompt=prompts[e], target="x", expert=e) for e in range(experts)]
    return model, tok, layer


def _route_and_logits(model, tok, prompt):
    ids = tok([prompt], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    route = tuple(t.clone() for t in find_route(model))
    return route, logits


def find_route(model):
    from lemoe_engine import find_layer
    return find_layer(model)._sequence_route


def test_the_gate_serves_the_edited_question_and_its_paraphrase_only():
    model, tok, layer = _edited()
    question_gate.enable(model, tok)
    for prompt, served in ((EDITED, True), (PARAPHRASE, True), (OTHER_RELATION, False), (UNRELATED, False)):
        (ids, weights), logits = _route_and_logits(model, tok, prompt)
        with adaptors_disabled(model), torch.no_grad():
            unedited = model(input_ids=tok([prompt], return_tensors="pt").input_ids).logits
        assert (int(ids[0, 0]) == 0) == served, prompt
        if served:
            assert float(weights[0, 0]) == 1.0
            assert not torch.equal(logits, unedited), f"{prompt}: the expert changed nothing"
        else:
            assert float(weights[0, 0]) == 0.0
            assert torch.equal(logits, unedited), f"{prompt}: a gated prompt must get the unedited output"
    question_gate.disable(model)
    (ids, _), _ = _route_and_logits(model, tok, OTHER_RELATION)
    assert int(ids[0, 0]) == 0, "without the gate, subject routing serves every prompt"


def test_generation_keeps_the_gated_route_over_its_decode_steps():
    model, tok, layer = _edited()
    question_gate.enable(model, tok)
    ids = tok([OTHER_RELATION], return_tensors="pt").input_ids
    with torch.no_grad():
        gated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        with adaptors_disabled(model):
            unedited = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(gated, unedited)


def test_top2_keeps_the_matching_expert_with_the_whole_weight():
    model, tok, layer = _edited(top_k=2, experts=2)
    question_gate.enable(model, tok)
    (ids, weights), _ = _route_and_logits(model, tok, EDITED)
    assert 0 in ids[0].tolist() and 1 not in ids[0].tolist()
    assert float(weights[0][ids[0] == 0]) == pytest.approx(1.0)
    assert float(weights[0][ids[0] == -1]) == 0.0


@pytest.mark.parametrize("by_name", [True, False])
def test_a_prompt_the_anchors_miss_is_served_by_the_edited_subject_it_names(by_name):
    """The anchors key on a subject's hidden states, which carry no context when the subject opens
    the prompt, so they can miss an edited question. With ``question_gate_by_name`` the gate serves
    such a prompt the expert whose edit's subject it names (here guessed from the edit prompt:
    "France"), when the question is that edit's; never a question about another relation, a
    longer name containing the subject, another subject, an unrelated prompt or a superseded edit."""
    model, tok, layer = _edited(experts=2)
    layer.config = layer.config.replace(gate=True, question_gate_by_name=by_name)
    layer.set_threshold(0, 2.0)  # above any cosine: the anchors never route to the edit's expert
    layer.set_threshold(1, 2.0)
    question_gate.enable(model, tok)
    cases = ((EDITED, True), ("France's capital city is which city?", True), (OTHER_RELATION, False),
             ("What is the capital city of New France?", False), ("New France's capital city is which city?", False),
             ("What is the capital city of Spain?", False), (UNRELATED, False))
    for prompt, named in cases:
        _assert_served(model, tok, prompt, 0 if named and by_name else -1)
    layer.ledger[0].superseded_by = 2  # a superseded (or removed) edit is never served by its name
    _assert_served(model, tok, EDITED, -1)


@pytest.mark.parametrize("by_name", [True, False])
def test_a_route_the_gate_drops_is_served_by_the_edited_subject_the_prompt_names(by_name):
    """The anchors send the edited question to another expert (here the unrelated edit's, which
    every prompt reaches); the gate drops that route and, with ``question_gate_by_name``, serves
    the expert of the subject the prompt names instead."""
    model, tok, layer = _edited(experts=2)
    layer.config = layer.config.replace(gate=True, question_gate_by_name=by_name)
    layer.set_threshold(0, 2.0)
    layer.set_threshold(1, -2.0)  # every prompt reaches expert 1
    question_gate.enable(model, tok)
    assert int(layer._route(_query_input(model, tok, EDITED))[0][0, 0]) == 1
    _assert_served(model, tok, EDITED, 0 if by_name else -1)
    _assert_served(model, tok, "How many legs does a spider have?", 1)
    _assert_served(model, tok, OTHER_RELATION, -1)


def _assert_served(model, tok, prompt, expert):
    """``prompt`` is served by ``expert`` (weight 1, the output changed) or, for -1, by none (the
    output is the unedited model's, bit for bit)."""
    (ids, weights), logits = _route_and_logits(model, tok, prompt)
    with adaptors_disabled(model), torch.no_grad():
        unedited = model(input_ids=tok([prompt], return_tensors="pt").input_ids).logits
    assert int(ids[0, 0]) == expert, prompt
    if expert >= 0:
        assert float(weights[0, 0]) == 1.0
        assert not torch.equal(logits, unedited), f"{prompt}: the expert changed nothing"
    else:
        assert torch.equal(logits, unedited), f"{prompt}: not served, yet the output changed"


@pytest.mark.parametrize("floor", [None, 0.55])
def test_the_name_floor_drops_a_short_question_close_to_an_edit_only_through_the_name(floor):
    """The sentence encoder weighs a rare name heavily in a short sentence: "Is Andorra mentioned
    often in the news?" is within the gate's cosine of "What is the word for someone from
    Andorra?". With ``question_gate_name_floor`` the two are also compared with the subject masked,
    and only the edit's own question (any wording) stays served (margin off: the floor alone)."""
    model, tok, layer = _edited()
    layer.ledger[0].prompt = "What is the word for someone from Andorra?"
    layer.config = layer.config.replace(question_gate_by_name=False, question_gate_name_floor=floor)
    question_gate.enable(model, tok, margin=None)
    _assert_served(model, tok, "What do you call a person from Andorra?", 0)
    _assert_served(model, tok, "Andorra's people are called what?", 0)
    _assert_served(model, tok, "Is Andorra mentioned often in the news?", -1 if floor is not None else 0)


def test_a_padded_batch_is_gated_as_each_prompt_alone():
    """The floor's masked prompts of a batch are embedded in one call: each sequence must still get
    its own verdict (the Andorra setting of the test above, by name on: the anchors route every
    prompt to expert 0, and the gate decides)."""
    model, tok, layer = _edited()
    layer.ledger[0].prompt = "What is the word for someone from Andorra?"
    question_gate.enable(model, tok, margin=None)
    prompts = ["Is Andorra mentioned often in the news?", "What do you call a person from Andorra?", UNRELATED,
               "Andorra's people are called what?"]
    alone = [int(_route_and_logits(model, tok, p)[0][0][0, 0]) for p in prompts]
    assert alone == [-1, 0, -1, 0]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert find_route(model)[0][:, 0].tolist() == alone


def test_the_name_floor_compares_each_prompt_masked_with_its_experts_subjects():
    """The floor's masked prompt comes from the batch's one encoder call when the route's expert
    holds the subjects the prompt names, from a second call when it holds others or fewer: either
    way the cosine is the one of that prompt with that expert's subjects masked (reference: each
    text embedded alone)."""
    model, tok, layer = _edited(experts=2)
    layer.ledger[0].prompt, layer.ledger[0].subject = "What is the word for someone from Andorra?", "Andorra"
    layer.ledger[1].prompt, layer.ledger[1].subject = "Which currency does Peru use?", "Peru"
    layer.config = layer.config.replace(question_gate_name_floor=0.55)
    gate = question_gate.enable(model, tok)
    view = gate.ledger_view(layer)
    texts = ["Is Andorra mentioned often in the news?", "What do you call a person from Andorra?",
             "Is Andorra smaller than Peru?", "What money do people in Peru pay with?", UNRELATED]
    prompts = question_gate.PromptBatch(texts, view, layer.config, routed=[True] * len(texts))
    pairs = [(e, b) for b in range(len(texts)) for e in (0, 1)]
    got = gate.over_name_floor(layer, view, pairs, prompts)
    for (e, b), verdict in zip(pairs, got):
        subject = ["Andorra", "Peru"][e]
        edit = question_gate._embed([layer.ledger[e].prompt.replace(subject, "X")])[0]
        cosine = float(edit @ question_gate._embed([texts[b].replace(subject, "X")])[0])
        if abs(cosine - 0.55) > 1e-3:  # not on the boundary, where batching may move the last digits
            assert verdict == (cosine >= 0.55), (texts[b], e, cosine)
    assert got[0] is False and got[2 * 1] is True and got[2 * 3 + 1] is True  # news / own questions


def test_prompts_the_gate_cannot_serve_cost_no_encoder_call(monkeypatch):
    """A prompt without an anchored route that names no edited subject gets no route whatever
    the encoder says: a batch of such prompts is not embedded (and still gets the unedited
    output); a prompt naming an edited subject is."""
    model, tok, layer = _edited()
    layer.ledger[0].subject = "France"
    layer.config = layer.config.replace(gate=True)
    layer.set_threshold(0, 2.0)  # the anchors route nothing
    question_gate.enable(model, tok)
    _assert_served(model, tok, PARAPHRASE, 0)  # the gate's own embeddings (the ledger's prompts) made
    embedded = []
    real = question_gate._embed
    monkeypatch.setattr(question_gate, "_embed", lambda texts: embedded.append(list(texts)) or real(texts))
    _assert_served(model, tok, UNRELATED, -1)
    _assert_served(model, tok, "How many legs does a spider have?", -1)
    assert embedded == []
    _assert_served(model, tok, PARAPHRASE, 0)  # served by the subject it names
    # one call: the prompt and its subject-masked form, which the name floor then reuses
    assert embedded == [[PARAPHRASE, PARAPHRASE.replace("France", "X")]]
    # a batch mixing prompts it may serve and prompts it may not: each as when asked alone
    prompts = [UNRELATED, PARAPHRASE, "How many legs does a spider have?", OTHER_RELATION]
    alone = [int(_route_and_logits(model, tok, p)[0][0][0, 0]) for p in prompts]
    assert alone == [-1, 0, -1, -1]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert find_route(model)[0][:, 0].tolist() == alone


@pytest.mark.parametrize("selects", [True, False])
def test_among_experts_of_one_subject_the_gate_serves_the_one_holding_the_question(selects):
    """Two experts keyed on one subject (the same anchor: the anchors cannot tell their facts
    apart, so they send both questions to the same one, whichever it is). With
    ``question_gate_selects`` the gate serves each question the expert holding it; without it, the
    anchors' choice is checked and the question held by the other expert is dropped (serving it by
    the subject it names is ``question_gate_by_name``, off here)."""
    model, tok, layer = _edited(experts=2)
    layer.ledger[1].prompt = OTHER_RELATION
    layer.set_anchor(1, layer.anchors[0].clone())
    layer.config = layer.config.replace(question_gate_selects=selects, question_gate_by_name=False)
    question_gate.enable(model, tok)
    holders = {EDITED: 0, PARAPHRASE: 0, OTHER_RELATION: 1}
    chosen = {prompt: int(layer._route(_query_input(model, tok, prompt))[0][0, 0]) for prompt in holders}
    assert any(chosen[p] != holder for p, holder in holders.items()), "the anchors cannot pick both holders"
    for prompt, holder in holders.items():
        served = int(_route_and_logits(model, tok, prompt)[0][0][0, 0])
        assert served == (holder if selects or chosen[prompt] == holder else -1), prompt
    assert int(_route_and_logits(model, tok, UNRELATED)[0][0][0, 0]) == -1
    assert question_gate.experts_sharing_keys(layer) == 2
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        question_gate.disable(model)  # turning the gate off leaves one of them served: say so
    assert [str(w.message) for w in caught if "share their subject key" in str(w.message)] == (
        [next(str(w.message) for w in caught)] if selects else [])


def _query_input(model, tok, prompt):
    """The target layer's input for ``prompt`` (the layer's route context set as in a forward)."""
    from lemoe_engine import find_layer
    layer, captured = find_layer(model), {}
    hook = layer.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(input_ids=tok([prompt], return_tensors="pt").input_ids)
    finally:
        hook.remove()
    return captured["x"]


def test_the_user_turn_of_a_chat_prompt_is_the_question():
    chat_tok = tiny_tokenizer(False, vocab_size=421)  # not the shared instance: it gets a template here
    chat_tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                              "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    gate = question_gate.QuestionGate(chat_tok, 0.74)
    text = chat_tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": EDITED}], tokenize=False,
                                        add_generation_prompt=True)
    ids = torch.tensor(chat_tok(text, add_special_tokens=False).input_ids)
    assert gate.prompt_text(ids) == EDITED
    assert question_gate.QuestionGate(tiny_tokenizer(False), 0.74).prompt_text(
        torch.tensor(tiny_tokenizer(False)(EDITED).input_ids)) == EDITED


def test_the_margin_drops_a_question_closer_to_a_same_subject_negative():
    """"How many people live in the capital city of France?" is within the cosine of the edited
    question, but closer to the bank negative "How many people live in France?": the margin
    drops it, the paraphrase stays served, and without a margin the cosine alone serves both."""
    model, tok, layer = _edited()
    layer.ledger[0].subject, layer.ledger[0].relation = "France", "capital"
    population = "How many people live in the capital city of France?"
    question_gate.enable(model, tok, 0.72, margin=None)
    assert layer.config.question_gate_margin is None
    for prompt in (PARAPHRASE, population):
        assert int(_route_and_logits(model, tok, prompt)[0][0][0, 0]) == 0, prompt
    question_gate.enable(model, tok, 0.72, margin=0.0)
    assert layer.config.question_gate_margin == 0.0
    assert int(_route_and_logits(model, tok, PARAPHRASE)[0][0][0, 0]) == 0
    (ids, weights), logits = _route_and_logits(model, tok, population)
    with adaptors_disabled(model), torch.no_grad():
        unedited = model(input_ids=tok([population], return_tensors="pt").input_ids).logits
    assert int(ids[0, 0]) == -1 and torch.equal(logits, unedited)
    layer.ledger[0].subject = "Spain"  # the negatives follow the ledger: none is about France now
    assert int(_route_and_logits(model, tok, population)[0][0][0, 0]) == 0


def test_a_subjects_unedited_relation_worded_unlike_the_first_bank_wording_is_not_served():
    """Two edits of one subject (one expert each, one key) and questions about relations neither
    edits (none of them a bundled template), each closer to one of the edits than to the bank's
    first wording of its relation ("What tongue do most residents of X use?"), so that with one
    wording per relation the default margin served it; the bank's later wordings catch them. The
    edits' own rewordings stay served, each by its own expert."""
    model, tok, layer = _edited(experts=2)
    subject = "Sierra Leone"
    for entry, prompt, relation in zip(layer.ledger, (f"What is a native of {subject} called?",
                                                      f"What is the capital of {subject}?"), ("demonym", "capital")):
        entry.prompt, entry.subject, entry.relation = prompt, subject, relation
    layer.set_anchor(1, layer.anchors[0].clone())
    question_gate.enable(model, tok)  # the defaults
    for prompt, served in ((f"What are the people of {subject} called?", 0),
                           (f"Which city is the seat of {subject}'s government?", 1),
                           (f"Tell me the main language of {subject}.", -1),
                           (f"Which currency is accepted in {subject}?", -1)):
        assert int(_route_and_logits(model, tok, prompt)[0][0][0, 0]) == served, prompt


def test_without_a_relation_a_negative_worded_like_the_edit_is_no_negative():
    """An edit with no ``relation`` field: the bank's "How many people live in France?" asks what
    "What is the population of France?" asks (the gate's cosine says so), so it must not
    count as a negative, or the margin would drop the edit's own paraphrase."""
    model, tok, layer = _edited()
    layer.ledger[0].prompt, layer.ledger[0].subject = "What is the population of France?", "France"
    question_gate.enable(model, tok, 0.72, margin=0.0)
    assert int(_route_and_logits(model, tok, "How many people live in France?")[0][0][0, 0]) == 0


def test_bad_uses_are_refused_with_a_message():
    tok = tiny_tokenizer(False)
    with pytest.raises(ConfigError, match="no LEMoE adaptor"):
        question_gate.enable(tiny_model("llama", vocab=len(tok)), tok)
    model, tok, _ = _edited()
    with pytest.raises(ConfigError, match="cosine in"):
        question_gate.enable(model, tok, 1.5)
    with pytest.raises(ConfigError, match="question_gate_margin must be"):
        question_gate.enable(model, tok, 0.7, margin="wide")
    question_gate.enable(model, tok)
    embeds = model.get_input_embeddings()(tok([EDITED], return_tensors="pt").input_ids)
    with pytest.raises(ConfigError, match="input_ids"), torch.no_grad():
        model(inputs_embeds=embeds)


def _fresh_copy(tok):
    """The unedited tiny model ``_edited`` starts from (same seed, so the same base weights)."""
    model = tiny_model("llama", seed=3, vocab=len(tok), layers=3, hidden=48)
    model.config.pad_token_id = tok.pad_token_id
    return model


def test_the_gate_is_saved_with_the_adaptor_and_comes_back_on_load(tmp_path):
    from lemoe_engine import load, save
    model, tok, _ = _edited()
    question_gate.enable(model, tok, 0.7)
    save(model, tmp_path / "on")
    question_gate.disable(model)
    save(model, tmp_path / "off")

    on = _fresh_copy(tok)
    layer = load(on, tmp_path / "on", tokenizer=tok)
    assert layer.config.question_gate == 0.7 and isinstance(layer.route_filter, question_gate.QuestionGate)
    assert layer.route_filter.threshold == 0.7
    (ids, _), logits = _route_and_logits(on, tok, OTHER_RELATION)
    with adaptors_disabled(on), torch.no_grad():
        unedited = on(input_ids=tok([OTHER_RELATION], return_tensors="pt").input_ids).logits
    assert int(ids[0, 0]) == -1 and torch.equal(logits, unedited)
    assert int(_route_and_logits(on, tok, EDITED)[0][0][0, 0]) == 0

    off = _fresh_copy(tok)
    layer = load(off, tmp_path / "off", tokenizer=tok)
    assert layer.config.question_gate is None and layer.route_filter is None
    assert int(_route_and_logits(off, tok, OTHER_RELATION)[0][0][0, 0]) == 0, "off: subject routing serves it"


def test_loading_a_gated_adaptor_without_a_tokenizer_warns(tmp_path):
    from lemoe_engine import load, save
    model, tok, _ = _edited()
    save(model, tmp_path / "a")  # the config's default gate
    with pytest.warns(UserWarning, match="question gate .* is not running: no tokenizer"):
        layer = load(_fresh_copy(tok), tmp_path / "a")
    assert layer.route_filter is None and layer.config.question_gate == LEMoEConfig().question_gate


@pytest.mark.parametrize("two_experts_one_subject", [False, True])
def test_flattened_serving_batches_gate_like_the_hf_path(tmp_path, two_experts_one_subject):
    """RequestRouter (the vLLM path) with the adaptor's gate: a new request's route is kept
    exactly when the HF path keeps it, from the prompt token ids each request brings; with two
    experts keyed on one subject, it picks the same one (the one holding the question)."""
    from lemoe_engine import save
    from lemoe_engine.layer import RouteContext
    from lemoe_engine.serving.adaptor import load_adaptor_layer
    from lemoe_engine.serving.batch import RequestRouter, RequestSlice, RoutingStateError
    model, tok, layer = _edited(experts=1 + two_experts_one_subject)
    if two_experts_one_subject:
        layer.ledger[1].prompt = OTHER_RELATION
        layer.set_anchor(1, layer.anchors[0].clone())
    question_gate.enable(model, tok)
    prompts = {"edited": EDITED, "other": OTHER_RELATION, "paraphrase": PARAPHRASE, "unrelated": UNRELATED}
    ids = {r: tok(p).input_ids for r, p in prompts.items()}
    hf = {r: int(_route_and_logits(model, tok, p)[0][0][0, 0]) for r, p in prompts.items()}
    assert hf == {"edited": 0, "other": 1 if two_experts_one_subject else -1, "paraphrase": 0, "unrelated": -1}
    save(model, tmp_path / "a")

    layer = load_adaptor_layer(model.config, tmp_path / "a", backend="eager", tokenizer=tok)
    assert isinstance(layer.route_filter, question_gate.QuestionGate)
    router = RequestRouter(layer)
    with torch.no_grad():  # the query source vectors (input of decoder layer 1), per request
        vectors = {r: model(input_ids=torch.tensor([i]), output_hidden_states=True).hidden_states[1][0]
                   for r, i in ids.items()}
    slices, start = [], 0
    for r in prompts:
        slices.append(RequestSlice(r, start, len(ids[r]), 0, len(ids[r]), ids[r]))
        start += len(ids[r])
    x = torch.randn(start, model.config.hidden_size)  # the MLP input: not read (query_source="layer1")
    router.set_plan(slices)
    router.token_routes(router.plan, x, torch.cat([vectors[r] for r in prompts]))
    assert {r: int(router.routes[r][0][0]) for r in prompts} == hf
    layer.set_route_context(RouteContext())
    router.set_plan([RequestSlice("edited", 0, len(ids["edited"]), 0, len(ids["edited"]))])  # no prompt ids
    with pytest.raises(RoutingStateError, match="prompt's token ids"):
        router.token_routes(router.plan, x[:len(ids["edited"])], vectors["edited"])


def test_the_leak_probe_counts_the_routes_the_gate_serves():
    """evaluate()'s leak rates report what is served: a same-subject question the gate drops did
    not reach an expert (before, the probe read the anchors' route and counted it)."""
    from lemoe_engine.data import EditRecord
    from lemoe_engine.evaluation import evaluate
    model, tok, _ = _edited()
    edit = EditRecord(prompt=EDITED, target="Lyon", rephrase=PARAPHRASE, loc_prompt=UNRELATED, loc_answer="7",
                      subject="France", specificity=(OTHER_RELATION,), specificity_ans=("Euro",))
    question_gate.enable(model, tok)
    assert evaluate(model, tok, [edit], progress=False).specificity_leak_rate == 0.0
    question_gate.disable(model)
    assert evaluate(model, tok, [edit], progress=False).specificity_leak_rate == 1.0


def test_the_config_is_the_switch_and_the_editor_keeps_what_it_finds():
    from lemoe_engine.editor import LifelongEditor
    model, tok, layer = _edited()
    question_gate.enable(model, tok)
    layer.config = layer.config.replace(question_gate=None)  # a stale filter with the gate off does nothing
    assert int(_route_and_logits(model, tok, OTHER_RELATION)[0][0][0, 0]) == 0
    question_gate.disable(model)
    # the adaptor's creation config, gate off now: still "the same config" for the editor
    editor = LifelongEditor(model, tok, layer.config.replace(question_gate=0.74, question_gate_margin=0.1),
                            unrelated_prompts=[UNRELATED])
    assert editor.layer.route_filter is None
    custom = lambda layer_, x, ids, weights: (ids, weights)  # noqa: E731
    layer.route_filter = custom
    layer.config = layer.config.replace(question_gate=0.74)
    LifelongEditor(model, tok, unrelated_prompts=[UNRELATED])
    assert layer.route_filter is custom, "a route filter of another kind is left in place"
