"""backend='triton' (kernels; Triton's interpreter on CPU) against backend='eager' on a whole model."""

import os

import pytest
import torch

from lemoe_engine import LEMoEConfig, attach, find_layer
from tiny_models import add_random_experts, tiny_model


def edited(backend, pooling, top_k, seed=0):
    model = tiny_model("llama", seed=seed, layers=3, hidden=64)
    layer = attach(model, LEMoEConfig(layer=2, query_source="embedding", query_pooling=pooling,
                                      expert_hidden=48, top_k=top_k, backend=backend, temperature=0.3))
    g = torch.Generator().manual_seed(seed + 11)
    add_random_experts(layer, 5, g, scale=1.0)
    layer.thresholds.copy_(torch.rand(layer.num_anchors, generator=g) * 0.2 - 0.1)
    return model


@pytest.mark.parametrize("pooling,top_k", [("mean", 1), ("max", 2), ("mean", 3)])
def test_triton_logits_and_greedy_tokens_match_eager(pooling, top_k):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = int(torch.seed() % 1000)
    eager = edited("eager", pooling, top_k, seed).to(device)
    triton = edited("triton", pooling, top_k, seed).to(device)
    ids = torch.randint(1, 150, (3, 9), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask).logits.double()
        calls = {"n": 0}
        import lemoe_engine.kernels as kernels
        original = kernels.grouped_expert_ffn

        def counting(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

        kernels.grouped_expert_ffn = counting
        try:
            got = triton(input_ids=ids, attention_mask=mask).logits.double()
        finally:
            kernels.grouped_expert_ffn = original
        assert calls["n"] == 1, "the triton backend must run the grouped-FFN kernel"
        base = edited("eager", pooling, top_k, seed).to(device)
        find_layer(base).disabled = True
        unedited = base(input_ids=ids, attention_mask=mask).logits.double()
    assert (reference - unedited).abs().max() > 1e-4, "the experts must change the logits"
    assert ((got - reference).norm() / reference.norm()) < 1e-5
    generate = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                    output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want, have = eager.generate(**generate), triton.generate(**generate)
    # the same greedy tokens, except after a near-tie of the eager logits: the backends sum in
    # different orders, so floats from the two are never assumed bit-equal
    new_want = want.sequences[:, ids.shape[1]:]
    new_have = have.sequences[:, ids.shape[1]:]
    for row in range(ids.shape[0]):
        differ = (new_want[row] != new_have[row]).nonzero()
        last = int(differ[0]) if len(differ) else new_want.shape[1]
        for step in range(min(last + 1, new_want.shape[1])):
            a, b = want.logits[step][row].double(), have.logits[step][row].double()
            assert ((a - b).norm() / a.norm()) < 1e-5
        if len(differ):
            top2 = want.logits[last][row].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-3, "the backends chose different tokens without a near-tie"


def test_auto_backend_is_eager_on_cpu_and_training_stays_eager():
    model = edited("auto", "mean", 1)
    layer = find_layer(model)
    x = torch.randn(1, 2, 64)
    assert layer._use_kernels(x) is False
    model_t = edited("triton", "mean", 1)
    layer_t = find_layer(model_t)
    layer_t.train()
    assert layer_t._use_kernels(x) is False
