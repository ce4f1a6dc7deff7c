import pytest

from lemoe_engine import ConfigError, LEMoEConfig


@pytest.mark.parametrize("field,value,words", [
    ("expert_hidden", 0, "expert_hidden"),
    ("expert_hidden", 2.5, "expert_hidden"),
    ("expert_activation", "tanh", "silu"),
    ("top_k", 0, "top_k"),
    ("top_k", 5, "1..4"),
    ("routing", "batch", "sequence"),
    ("query_source", "logits", "embedding"),
    ("temperature", 0.0, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("backend", "cuda", "triton"),
    ("dtype", "float64", "bfloat16"),
    ("layer", "3", "layer"),
    ("gate", 1, "gate"),
    ("scale", float("inf"), "scale"),
])
def test_invalid_values_name_the_field_and_the_fix(field, value, words):
    with pytest.raises(ConfigError) as info:
        LEMoEConfig(**{field: value})
    assert field in str(info.value) and words in str(info.value)


def test_round_trip_and_unknown_field():
    config = LEMoEConfig(layer=3, top_k=2, expert_gated=False, dtype="float16")
    assert LEMoEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown field"):
        LEMoEConfig.from_dict({**config.to_dict(), "experts": 3})


def test_layer_resolution():
    assert LEMoEConfig().resolved_layer(32) == 24  # 3/4 of the depth (the paper's 18/32 is layer=18)
    assert LEMoEConfig().resolved_layer(30) == 22  # SmolLM2-135M
    assert LEMoEConfig().resolved_layer(3) == 2
    assert LEMoEConfig(layer=-1).resolved_layer(30) == 29
    with pytest.raises(ConfigError, match="out of range"):
        LEMoEConfig(layer=30).resolved_layer(30)
