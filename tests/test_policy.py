import pytest

from kvbench.policy import Budget, available, make_policy


def test_builtin_methods_registered():
    assert {"full", "streamingllm", "h2o"} <= set(available())


@pytest.mark.parametrize("text,tokens,ratio", [("256", 256, None), ("0.25", None, 0.25), ("1.0", None, 1.0)])
def test_budget_parse(text, tokens, ratio):
    b = Budget.parse(text)
    assert (b.tokens, b.ratio) == (tokens, ratio)


def test_budget_capacity():
    assert Budget(tokens=100).capacity(5000) == 100
    assert Budget(ratio=0.25).capacity(1000) == 250


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "abc", "0.0"])
def test_bad_budget_is_refused_with_what_is_allowed(text):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(text)


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known methods: .*h2o.*streamingllm"):
        make_policy("nope", 256)


def test_unknown_parameter_lists_allowed_ones():
    with pytest.raises(ValueError, match=r"no parameter tau; its parameters: sinks"):
        make_policy("streamingllm", 256, tau="0.5")


def test_parameter_values_are_coerced_and_checked():
    assert make_policy("h2o", 256, heavy_ratio="0.25").heavy_ratio == 0.25
    with pytest.raises(ValueError, match="not a valid int"):
        make_policy("streamingllm", 256, sinks="many")
