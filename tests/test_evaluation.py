"""Tests for lemoe_engine.evaluation (CPU, no network, tiny models, a BPE trained here)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import types

import pytest
import torch
from torch import nn

from lemoe_engine import evaluation
from lemoe_engine.evaluation import EditMetrics, evaluate, locality_reference
from lemoe_engine.tokens import encode_pairs

from tiny_models import CITIES, COUNTRIES, LANGS, tiny_tokenizer


@dataclasses.dataclass(frozen=True)
class Rec:   # same fields as lemoe_engine.data.EditRecord (duck-typed by evaluate)
    prompt: str
    target: str
    rephrase: str
    loc_prompt: str
    loc_answer: str


@pytest.fixture(scope="module", params=[False, True], ids=["nobos", "bos"])
def tokenizer(request):
    return tiny_tokenizer(request.param)


@pytest.fixture(scope="module")
def smol_like_tok():
    """No BOS, byte-level BPE: the SmolLM2 setting (the LLaMA tests run on this one only)."""
    return tiny_tokenizer(False)


def _edits(n: int, seed: int) -> list[Rec]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, city, lang = COUNTRIES[i % len(COUNTRIES)], rng.choice(CITIES), rng.choice(LANGS)
        extra = " really" * rng.randrange(0, 4)   # vary lengths -> padding inside batches
        out.append(Rec(prompt=f"The capital of {c}{extra} is",
                       target=rng.choice([city, f"{city} {lang}", f"{lang} {city} {lang}"]),
                       rephrase=f"What is the capital city of {c}{extra}?",
                       loc_prompt=f"nq question: which language is spoken in {c}{extra}",
                       loc_answer=rng.choice([lang, f"{lang} and {rng.choice(LANGS)}"])))
    return out


# ------------------------------------------------------------------------------------------
# patching stand-ins
# ------------------------------------------------------------------------------------------

class _Recorder:
    """query_mask / adaptors_disabled that record what evaluate asks for."""

    def __init__(self):
        self.masks: list[torch.Tensor | None] = []   # stack of active masks
        self.disabled = 0
        self.disabled_entries = 0

    @contextlib.contextmanager
    def query_mask(self, model, mask):
        self.masks.append(mask)
        try:
            yield
        finally:
            self.masks.pop()

    @contextlib.contextmanager
    def adaptors_disabled(self, model):
        self.disabled += 1
        self.disabled_entries += 1
        try:
            yield
        finally:
            self.disabled -= 1


def _patching_module(monkeypatch):
    try:
        import lemoe_engine.patching as mod
    except ImportError:
        mod = None
    if mod is None or not all(hasattr(mod, n) for n in ("query_mask", "adaptors_disabled")):
        mod = mod or types.ModuleType("lemoe_engine.patching")
        monkeypatch.setitem(sys.modules, "lemoe_engine.patching", mod)
        monkeypatch.setattr(sys.modules["lemoe_engine"], "patching", mod, raising=False)
        noop = _Recorder()
        monkeypatch.setattr(mod, "query_mask", noop.query_mask, raising=False)
        monkeypatch.setattr(mod, "adaptors_disabled", noop.adaptors_disabled, raising=False)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _patching_available(monkeypatch):
    """The lead's patching module when it exists (its helpers must be no-ops on a model with no
    LEMoE layer), else a no-op stand-in."""
    return _patching_module(monkeypatch)


@pytest.fixture
def recorder(monkeypatch):
    mod = _patching_module(monkeypatch)
    rec = _Recorder()
    monkeypatch.setattr(mod, "query_mask", rec.query_mask)
    monkeypatch.setattr(mod, "adaptors_disabled", rec.adaptors_disabled)
    return rec


# ------------------------------------------------------------------------------------------
# independent tokenisation + a model whose predictions we control
# ------------------------------------------------------------------------------------------

def _split_by_offsets(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """Joint ids and prompt length, computed from character offsets (independent of the code
    under test): answer tokens are those starting at or after the end of the prompt text."""
    enc = tok(prompt + " " + answer, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), enc["offset_mapping"]
    specials = set(tok.all_special_ids)
    starts = [i for i, ((s, _), t) in enumerate(zip(offs, ids))
              if t not in specials and s >= len(prompt)]
    assert starts == list(range(starts[0], len(ids)))
    return ids, starts[0]


class OracleModel(nn.Module):
    """Predicts, after the real prefix ``ids[:j+1]``, the token ``table[prefix]`` (else
    ``default``). Logits are that one-hot plus noise; pads get pure noise. Records each call."""

    def __init__(self, vocab: int, table: dict, default: int = 0, recorder=None):
        super().__init__()
        self.vocab, self.table, self.default, self.rec = vocab, dict(table), default, recorder
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        logits = torch.rand(B, T, self.vocab, generator=g)
        for b in range(B):
            row = input_ids[b].tolist()
            for j in range(int(attention_mask[b].sum())):
                logits[b, j, self.table.get(tuple(row[:j + 1]), self.default)] += 5.0
        self.calls.append(dict(
            input_ids=input_ids.clone(), attention_mask=attention_mask.clone(),
            grad=torch.is_grad_enabled(), training=self.training,
            mask=None if self.rec is None or not self.rec.masks else self.rec.masks[-1].clone(),
            disabled=None if self.rec is None else self.rec.disabled))
        return types.SimpleNamespace(logits=logits)


def _craft(tok, pairs, rng, table):
    """For each (prompt, answer), make a random subset of answer positions right in ``table``;
    returns the expected per-pair fractions."""
    V = len(tok)
    fracs = []
    for prompt, answer in pairs:
        ids, p = _split_by_offsets(tok, prompt, answer)
        n = len(ids) - p
        k = rng.randrange(0, n + 1)
        right = set(rng.sample(range(n), k))
        for i in range(n):
            key = tuple(ids[:p + i])
            assert key not in table, "test data: prefix collision"
            table[key] = ids[p + i] if i in right else (ids[p + i] + 1 + rng.randrange(V - 1)) % V
        fracs.append(k / n)
    return fracs


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------

def test_joint_tokenisation_matches_offsets(tokenizer):
    edits = _edits(20, seed=1)
    pairs = [(e.prompt, e.target) for e in edits] + [(e.loc_prompt, e.loc_answer) for e in edits]
    enc = encode_pairs(tokenizer, [p for p, _ in pairs], [a for _, a in pairs])
    trap = 0
    for (prompt, answer), e in zip(pairs, enc):
        ids, p = _split_by_offsets(tokenizer, prompt, answer)
        assert e.ids == ids and e.prompt_len == p
        assert e.ids[:p] == tokenizer(prompt)["input_ids"]
        alone = tokenizer(answer, add_special_tokens=False)["input_ids"]
        first = tokenizer.convert_ids_to_tokens(e.ids[p])
        assert first.startswith("Ġ"), first    # the space merged into the first answer token
        trap += e.ids[p:] != alone
    assert trap == len(pairs)   # encoding the answer alone gives other tokens, every time


class _GreedyTok:
    """Greedy longest-match tokenizer whose vocabulary has a token crossing the boundary; adds
    BOS (1, when ``bos``) in front and EOS (2) behind when asked."""
    vocab = ["<pad>", "<s>", "</s>", "is P", "ar", " a"] + [chr(c) for c in range(32, 127)]
    pad_token_id = 0

    def __init__(self, bos=True):
        self.bos = bos

    def _one(self, text, add_special_tokens):
        ids, i = [], 0
        while i < len(text):
            tok = max((t for t in self.vocab[3:] if text.startswith(t, i)), key=len)
            ids.append(self.vocab.index(tok))
            i += len(tok)
        return [1] * self.bos + ids + [2] if add_special_tokens else ids

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, str):
            return {"input_ids": self._one(text, add_special_tokens)}
        return {"input_ids": [self._one(t, add_special_tokens) for t in text]}


def test_boundary_merge_uses_common_prefix_and_drops_eos():
    tok = _GreedyTok()
    (e,) = encode_pairs(tok, ["X is"], ["Paris"])
    names = [tok.vocab[i] for i in e.ids]
    assert names == ["<s>", "X", " ", "is P", "ar", "i", "s"]   # BOS kept, EOS dropped
    assert e.prompt_len == 3                                      # "is" merged into "is P"
    (e,) = encode_pairs(_GreedyTok(bos=False), ["X is"], ["Paris"])
    assert e.prompt_len == 2 and len(e.ids) == 6
    with pytest.raises(ValueError):   # no BOS and no prompt: nothing predicts the first token
        encode_pairs(_GreedyTok(bos=False), [""], ["Paris"])


def test_crafted_predictions_give_exact_fractions(tokenizer, recorder):
    edits = _edits(9, seed=2)
    rng = random.Random(3)
    table: dict = {}
    rel = _craft(tokenizer, [(e.prompt, e.target) for e in edits], rng, table)
    gen = _craft(tokenizer, [(e.rephrase, e.target) for e in edits], rng, table)
    assert len(set(rel)) > 2 and any(0 < f < 1 for f in rel)
    model = OracleModel(len(tokenizer), table, recorder=recorder)
    ref_model = OracleModel(len(tokenizer), table)
    ref = locality_reference(ref_model, tokenizer, edits, batch_size=4, progress=False)
    m = evaluate(model, tokenizer, edits, locality_ref=ref, batch_size=4, progress=False)
    assert m.n_edits == 9
    assert m.reliability == pytest.approx(sum(rel) / 9, abs=1e-12)
    assert m.generality == pytest.approx(sum(gen) / 9, abs=1e-12)
    assert m.locality == 1.0


def test_two_of_three_right(recorder):
    tok = _GreedyTok()
    V = len(tok.vocab)
    ids = tok("Q abc")["input_ids"][:-1]          # [<s>, Q, " a", b, c]: answer " abc", p = 2
    assert len(ids) == 5
    table = {tuple(ids[:2]): ids[2], tuple(ids[:3]): (ids[3] + 1) % V, tuple(ids[:4]): ids[4]}
    e = Rec("Q", "abc", "Q", "Q", "abc")
    m = evaluate(OracleModel(V, table), tok, [e], locality_ref=[torch.tensor(ids[2:])],
                 progress=False)
    assert m.reliability == pytest.approx(2 / 3) and m.generality == pytest.approx(2 / 3)
    # reference = the true tokens; the model gets the middle one wrong
    assert m.locality == pytest.approx(2 / 3)


def test_locality_against_a_changed_model(tokenizer, recorder):
    edits = _edits(11, seed=4)
    rng = random.Random(5)
    V = len(tokenizer)
    base, edited, expected = {}, {}, []
    for e in edits:
        ids, p = _split_by_offsets(tokenizer, e.loc_prompt, e.loc_answer)
        n = len(ids) - p
        changed = set(rng.sample(range(n), rng.randrange(0, n + 1)))
        for i in range(n):
            key = tuple(ids[:p + i])
            base[key] = rng.randrange(V)
            edited[key] = (base[key] + 1) % V if i in changed else base[key]
        expected.append(1 - len(changed) / n)
    ref = locality_reference(OracleModel(V, base), tokenizer, edits, batch_size=3, progress=False)
    # the reference holds the unedited model's argmax at every answer position
    for e, r in zip(edits, ref):
        ids, p = _split_by_offsets(tokenizer, e.loc_prompt, e.loc_answer)
        assert r.tolist() == [base[tuple(ids[:p + i])] for i in range(len(ids) - p)]
    m = evaluate(OracleModel(V, edited), tokenizer, edits, locality_ref=ref, batch_size=3,
                 progress=False)
    assert m.locality == pytest.approx(sum(expected) / len(edits), abs=1e-12)
    assert m.locality < 1.0
    with pytest.raises(ValueError):
        evaluate(OracleModel(V, edited), tokenizer, edits, locality_ref=ref[:-1], progress=False)
    bad = [r[:-1] if i == 0 else r for i, r in enumerate(ref)]
    with pytest.raises(ValueError):
        evaluate(OracleModel(V, edited), tokenizer, edits, locality_ref=bad, progress=False)


def test_query_mask_covers_prompt_only_and_reference_runs_disabled(tokenizer, recorder):
    edits = _edits(10, seed=6)
    model = OracleModel(len(tokenizer), {}, recorder=recorder)
    model.train()
    evaluate(model, tokenizer, edits, batch_size=4, progress=False)
    assert recorder.disabled_entries == 1 and recorder.disabled == 0 and not recorder.masks
    # batches of 4: the locality reference (10 prompts: 3 batches, adaptors disabled), then
    # prompts + paraphrases in one pass (20: 5 batches), then locality (10: 3 batches)
    assert len(model.calls) == 3 + 5 + 3
    for c in model.calls:
        assert c["mask"] is not None and not c["grad"] and not c["training"]
    assert [c["disabled"] for c in model.calls] == [1] * 3 + [0] * 8
    prompts = ([e.loc_prompt for e in edits] + [e.prompt for e in edits]
               + [e.rephrase for e in edits] + [e.loc_prompt for e in edits])
    answers = ([e.loc_answer for e in edits] + [e.target for e in edits] * 2
               + [e.loc_answer for e in edits])
    expected = {}
    for p_text, a_text in zip(prompts, answers):
        ids, p = _split_by_offsets(tokenizer, p_text, a_text)
        expected[tuple(ids)] = p
    seen = 0
    for c in model.calls:
        for ids, att, mask in zip(c["input_ids"], c["attention_mask"], c["mask"]):
            n = int(att.sum())
            assert att.tolist() == [1] * n + [0] * (len(att) - n)       # right padding
            p = expected[tuple(ids[:n].tolist())]
            assert mask.tolist() == [1] * p + [0] * (len(mask) - p)      # prompt tokens only
            seen += 1
    assert seen == 4 * len(edits)
    assert model.training   # restored


# ---- tiny random LLaMA ------------------------------------------------------------------------

def _llama(tok, seed=0, dropout=0.0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                      attention_dropout=dropout, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def test_llama_batching_invariance_and_self_locality(smol_like_tok):
    tok = smol_like_tok
    edits = _edits(13, seed=7)
    model = _llama(tok)
    lens = {len(tok(e.prompt + " " + e.target)["input_ids"]) for e in edits}
    assert len(lens) > 2   # batches really are padded
    m1 = evaluate(model, tok, edits, batch_size=1, progress=False)
    m7 = evaluate(model, tok, edits, batch_size=7, progress=False)
    assert m1 == m7
    assert m1.locality == 1.0            # no adaptor: the reference is the model itself
    assert 0.0 <= m1.reliability < 1.0 and 0.0 <= m1.generality < 1.0
    prompts, answers = [e.prompt for e in edits], [e.target for e in edits]
    with torch.no_grad():
        s1 = evaluation._score(model, tok, prompts, answers, batch_size=1)
        s7 = evaluation._score(model, tok, prompts, answers, batch_size=7)
        # independent: each sequence alone, plain forward, argmax at the previous position
        for (pred, tgt), (pred7, _), (p_text, a_text) in zip(s1, s7, zip(prompts, answers)):
            ids, p = _split_by_offsets(tok, p_text, a_text)
            logits = model(torch.tensor([ids])).logits[0]
            assert pred.tolist() == logits[p - 1:-1].argmax(-1).tolist() == pred7.tolist()
            assert tgt.tolist() == ids[p:]


def test_llama_locality_drops_after_perturbation(smol_like_tok):
    tok = smol_like_tok
    edits = _edits(12, seed=8)
    model = _llama(tok, seed=1)
    ref = locality_reference(model, tok, edits, batch_size=5, progress=False)
    assert evaluate(model, tok, edits, locality_ref=ref, batch_size=5,
                    progress=False).locality == 1.0
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 1.5)
    m = evaluate(model, tok, edits, locality_ref=ref, batch_size=5, progress=False)
    assert m.locality < 0.9


def test_training_mode_restored_and_eval_used(smol_like_tok):
    tok = smol_like_tok
    edits = _edits(6, seed=10)
    model = _llama(tok, seed=2, dropout=0.6)
    with torch.no_grad():
        x = torch.tensor([tok(edits[0].prompt)["input_ids"]])
        model.train()
        assert not torch.equal(model(x).logits, model(x).logits)   # dropout is live in train
    model.eval()
    want = evaluate(model, tok, edits, batch_size=4, progress=False)
    assert not model.training
    model.train()
    model.model.layers[0].eval()            # mixed modes come back exactly as they were
    modes = [m.training for m in model.modules()]
    got = evaluate(model, tok, edits, batch_size=4, progress=False)
    assert got == want                      # so evaluation ran in eval mode
    assert [m.training for m in model.modules()] == modes
    ref = locality_reference(model, tok, edits, progress=False)
    assert [m.training for m in model.modules()] == modes and len(ref) == 6


def test_progress_bar_and_metrics_dataclass(tokenizer, capsys):
    edits = _edits(3, seed=11)
    model = OracleModel(len(tokenizer), {})
    evaluate(model, tokenizer, edits, progress=False)
    locality_reference(model, tokenizer, edits, progress=False)
    assert capsys.readouterr().err == ""
    evaluate(model, tokenizer, edits, progress=True)
    assert "evaluate" in capsys.readouterr().err
    m = EditMetrics(reliability=0.5, generality=0.25, locality=1.0, n_edits=4)
    assert m.as_dict() == {"reliability": 0.5, "generality": 0.25, "locality": 1.0, "n_edits": 4,
                           "specificity": None, "n_specificity": 0, "leak_rate": None,
                           "specificity_leak_rate": None, "mode": "teacher_forced", "chat": False}
    assert m.average() == pytest.approx(1.75 / 3)
    with pytest.raises(ValueError):
        evaluate(model, tokenizer, [], progress=False)
