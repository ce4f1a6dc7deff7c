"""End to end: prefill time and greedy-decode tokens/s of an edited model vs the same model
unedited.

* ``smollm2`` (CPU figure, marked ``slow``): the bundled SmolLM2-135M (fp32) with an adaptor
  of 5 random experts (hidden 1024) attached at its default layer, gate off so every prompt
  is routed; prefill of a ~30-token prompt, greedy decode of 16 new tokens. Skipped on CUDA
  machines (the GPU run measures the 7B-shaped model instead).
* ``llama7b`` (marked ``gpu``): a LLaMA-2-7B-shaped ``LlamaConfig`` (32 layers, d = 4096,
  MLP 11008, vocab 32000) with random bf16 weights, the same adaptor shape; prefill of
  1 x 512 tokens, greedy decode of 64 new tokens for batch 1 and 8; edited with the Triton
  and with the eager backend.

Variants: ``unedited`` (no adaptor attached), ``edited-<backend>`` (adaptor attached).
Checks: an attached adaptor whose gates are closed (thresholds above any cosine) gives logits
and greedy tokens bit-identical to the unedited model; the open adaptor changes the logits;
the first generated token equals the argmax of the prefill logits (up to rounding); Triton vs
eager logits agree within bf16 tolerance on GPU.

On CPU (a shared machine) edited rows also carry ``paired_ratio_vs_disabled``: edited time over
adaptor-disabled time, measured in alternating pairs so that both see the same load.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
import torch

import benchlib
from benchlib import CUDA, DEV, free_memory
from lemoe_engine import LEMoEConfig, attach, detach

EXPERTS = 5
EXPERT_HIDDEN = 1024

MODELS = {
    "smollm2": dict(prompt_tokens=30, prefill_batch=1, decode=((1, 16),), rounds=3,
                    backends=("eager",), dtype=torch.float32),
    "llama7b": dict(prompt_tokens=512, prefill_batch=1, decode=((1, 64), (8, 64)), rounds=3,
                    backends=("triton", "eager"), dtype=torch.bfloat16),
}
DECODE_PROMPT = 32  # prompt length of the decode cases on the 7B-shaped model

smollm2_marks = [pytest.mark.slow, pytest.mark.skipif(
    CUDA, reason="CPU figure; a CUDA machine measures the 7B-shaped model")]
llama_marks = [pytest.mark.gpu]

_MODELS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    free_memory(_MODELS)


def _model(name: str):
    if name not in _MODELS:
        free_memory(_MODELS)
        if name == "smollm2":
            from lemoe_engine.models import load_model

            model, _ = load_model("smollm2-135m")
        else:
            from transformers import AutoModelForCausalLM, LlamaConfig

            config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096, pad_token_id=0)
            torch.manual_seed(0)
            with torch.device(DEV):  # initialised on the GPU: no 27 GB detour through the CPU
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.to(DEV)
        _MODELS[name] = model.eval().requires_grad_(False)
    return _MODELS[name]


def _prompt(name: str, batch: int, length: int, model) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    vocab = model.config.vocab_size
    return torch.randint(10, vocab - 10, (batch, length), generator=g).to(model.device)


@contextmanager
def _adaptor(model, backend: str, closed: bool = False):
    """Attach an adaptor of random experts; ``closed``: every gate shut (thresholds 2 > any
    cosine), else gate off so every prompt routes to an expert."""
    config = LEMoEConfig(expert_hidden=EXPERT_HIDDEN, gate=closed, backend=backend)
    layer = attach(model, config)
    try:
        thresholds = torch.full((EXPERTS,), 2.0) if closed else None
        benchlib.fill_random_experts(layer, EXPERTS, seed=4242, thresholds=thresholds)
        yield layer
    finally:
        detach(model)


def _adaptor_summary(layer) -> dict:
    return {"layer": layer.base_info.get("layer"), **benchlib.config_summary(layer.config)}


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _generate(model, ids, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=model.config.pad_token_id)
    return out[:, ids.shape[1]:]


def _variants(model_name: str):
    return ["unedited"] + [f"edited-{b}" for b in MODELS[model_name]["backends"]]


def _cases(kind: str):
    for name, spec in MODELS.items():
        marks = smollm2_marks if name == "smollm2" else llama_marks
        for variant in _variants(name):
            if kind == "prefill":
                yield pytest.param(name, variant, spec["prefill_batch"], spec["prompt_tokens"],
                                   marks=marks, id=f"{name}-{variant}-prefill")
            else:
                for batch, new in spec["decode"]:
                    yield pytest.param(name, variant, batch, new, marks=marks,
                                       id=f"{name}-{variant}-decode-B{batch}-N{new}")


@contextmanager
def _variant(model, variant: str):
    if variant == "unedited":
        yield None
    else:
        with _adaptor(model, variant.split("-", 1)[1]) as layer:
            yield layer


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        benchlib.sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _paired_ratio(fn, layer, pairs: int) -> dict:
    """Edited vs adaptor-disabled time, measured in alternating pairs so that both see the same
    machine load (the shared CPU runs other work): median edited / median disabled."""
    edited, disabled = [], []
    try:
        for _ in range(pairs):
            layer.disabled = False
            edited.append(_median_seconds(fn, 1))
            layer.disabled = True
            disabled.append(_median_seconds(fn, 1))
    finally:
        layer.disabled = False
    e, d = sorted(edited)[pairs // 2], sorted(disabled)[pairs // 2]
    return {"paired_ratio_vs_disabled": e / d, "paired_edited_us": e * 1e6, "paired_disabled_us": d * 1e6}


PAIRS = 0 if CUDA else 3  # the GPU machine is not shared: its unedited row is the comparison


def _timed(fn):
    def run():
        out = fn()
        benchlib.sync()
        return out
    return run


@pytest.mark.parametrize("name,variant,batch,length", list(_cases("prefill")))
def test_prefill_time(benchmark, bench_rows, request, name, variant, batch, length):
    spec = MODELS[name]
    model = _model(name)
    ids = _prompt(name, batch, length, model)
    unedited = _logits(model, ids)
    checks: dict = {}
    paired: dict = {}
    with _variant(model, variant) as layer:
        benchmark.group = f"e2e {name} prefill"
        logits = benchmark.pedantic(_timed(lambda: _logits(model, ids)), rounds=spec["rounds"],
                                    warmup_rounds=1)
        assert torch.isfinite(logits.float()).all()
        if layer is None:
            # gates closed: the attached adaptor is an exact no-op
            with _adaptor(model, "auto", closed=True) as closed:
                assert closed.num_experts == EXPERTS
                assert torch.equal(_logits(model, ids), unedited), "closed gates changed the logits"
            assert torch.equal(_logits(model, ids), unedited), "detach did not restore the model"
            checks["closed_gate_bit_identical"] = True
        else:
            diff = float((logits.float() - unedited.float()).abs().max())
            checks["max_abs_logit_change"] = diff
            assert diff > 1e-3, "the routed experts did not change the logits"
            if PAIRS and benchmark.enabled:
                paired = _paired_ratio(lambda: _logits(model, ids), layer, 2 * PAIRS + 1)
            if layer.config.backend == "triton":
                layer.config.backend = "eager"
                eager = _logits(model, ids)
                layer.config.backend = "triton"
                checks["rel_err_logits_vs_eager"] = benchlib.rel_err(logits.float(), eager.float())
                assert checks["rel_err_logits_vs_eager"] < 5e-2, checks
    bench_rows.add(benchmark, section="end_to_end", case=f"{name}-prefill-B{batch}-L{length}",
                   backend=variant, dtype=spec["dtype"], checks=checks, request=request,
                   shapes={"model": name, "phase": "prefill", "batch": batch, "prompt_tokens": length,
                           "experts": EXPERTS if layer is not None else 0, "expert_hidden": EXPERT_HIDDEN,
                           **(_adaptor_summary(layer) if layer is not None else {})},
                   extra={"tokens_per_s": batch * length / benchmark.stats.stats.median
                          if benchmark.enabled and benchmark.stats else None, **paired})


@pytest.mark.parametrize("name,variant,batch,new_tokens", list(_cases("decode")))
def test_decode_tokens_per_s(benchmark, bench_rows, request, name, variant, batch, new_tokens):
    spec = MODELS[name]
    model = _model(name)
    prompt_len = spec["prompt_tokens"] if name == "smollm2" else DECODE_PROMPT
    ids = _prompt(name, batch, prompt_len, model)
    checks: dict = {}
    paired: dict = {}
    with _variant(model, variant) as layer:
        benchmark.group = f"e2e {name} decode B={batch}"
        tokens = benchmark.pedantic(_timed(lambda: _generate(model, ids, new_tokens)),
                                    rounds=spec["rounds"], warmup_rounds=1)
        summary = _adaptor_summary(layer) if layer is not None else {}
        assert tokens.shape == (batch, new_tokens)
        # greedy decoding starts from the argmax of the prefill logits (up to rounding: generate
        # computes the last position's logits alone, which may round differently)
        last = _logits(model, ids)[:, -1].float()
        best = last.max(dim=-1).values
        chosen = last.gather(1, tokens[:, :1].long()).squeeze(1)
        slack = (1e-4 if spec["dtype"] == torch.float32 else 3e-2) * best.abs().clamp_min(1.0)
        assert bool((best - chosen <= slack).all()), "the first generated token is not the prefill argmax"
        checks["first_token_is_prefill_argmax"] = bool(torch.equal(tokens[:, 0], last.argmax(dim=-1)))
        prefill_s = _median_seconds(lambda: _logits(model, ids), 3 if benchmark.enabled else 1)
        if layer is not None and PAIRS and benchmark.enabled:
            paired = _paired_ratio(lambda: _generate(model, ids, new_tokens), layer, PAIRS)
        if layer is None:
            with _adaptor(model, "auto", closed=True):
                assert torch.equal(_generate(model, ids, new_tokens), tokens), \
                    "closed gates changed the greedy tokens"
            checks["closed_gate_tokens_identical"] = True
    extra = {}
    if benchmark.enabled and benchmark.stats:
        median = benchmark.stats.stats.median
        extra = {"tokens_per_s": batch * new_tokens / median,
                 # the first new token comes from the prefill; the rest are decode steps
                 "decode_tokens_per_s": batch * (new_tokens - 1) / max(median - prefill_s, 1e-9),
                 "prefill_us_single": prefill_s * 1e6, **paired}
    bench_rows.add(benchmark, section="end_to_end", case=f"{name}-decode-B{batch}-N{new_tokens}",
                   backend=variant, dtype=spec["dtype"], checks=checks, request=request,
                   shapes={"model": name, "phase": "decode", "batch": batch, "prompt_tokens": prompt_len,
                           "new_tokens": new_tokens, "experts": EXPERTS if variant != "unedited" else 0,
                           "expert_hidden": EXPERT_HIDDEN, **summary},
                   extra=extra)
