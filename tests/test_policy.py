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
    with pytest.raises(ValueError, match=r"no parameter tau; its parameters: decode_interval, schedule, sinks"):
        make_policy("streamingllm", 256, tau="0.5")


@pytest.mark.parametrize("key,value", [("sinks", 2.5), ("sinks", True), ("sinks", "many")])
def test_a_value_that_is_not_the_fields_type_is_refused_whatever_its_source(key, value):
    """lm-eval hands model args over already parsed (sinks=2.5 arrives as a float): refused like a bad string."""
    with pytest.raises(ValueError, match=f"streamingllm: parameter {key}={value!r} is not a valid int"):
        make_policy("streamingllm", 256, **{key: value})


def test_numbers_from_lm_eval_become_the_fields_type():
    assert make_policy("streamingllm", 256, sinks=8.0).sinks == 8
    assert isinstance(make_policy("h2o", 256, heavy_ratio=1).heavy_ratio, float)
    assert make_policy("asrkf", recovery=0).recovery is False


def test_parameter_values_are_coerced_and_checked():
    assert make_policy("h2o", 256, heavy_ratio="0.25").heavy_ratio == 0.25
    with pytest.raises(ValueError, match="not a valid int"):
        make_policy("streamingllm", 256, sinks="many")


@pytest.mark.parametrize("k", [0, 1, 5, 6, 7, 11, 12])
def test_top_k_keeps_exactly_the_k_highest_outside_exclude(k):
    import torch

    from kvbench.selection import top_k

    scores = torch.tensor([[[0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.05, 0.6, 0.4, 0.95, 0.15]]])
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    exclude[..., 10] = True  # the best token may not be chosen
    kept = top_k(scores, k, exclude)
    allowed = sorted(range(12), key=lambda i: -float(scores[0, 0, i]) if i != 10 else float("inf"))
    assert set(kept[0, 0].nonzero().flatten().tolist()) == set(allowed[:k])


def test_the_method_base_holds_only_what_every_method_uses():
    """The contract a method author reads (`KVPolicy`) names what every method may use; a hook one method needs is an
    opt-in capability that the engine asks for only where a class inherits it, so adding one never grows the base."""
    from kvbench.policy import (
        ActsBeforeStep,
        KVPolicy,
        Observes,
        ReadsQueries,
        Reconstructs,
        RollsBack,
        policy_class,
    )

    assert {n for n in vars(KVPolicy) if not n.startswith("_")} == {
        "name", "attn_rows", "token_state", "uses_budget", "evicts", "passive", "uniform_layers", "schedules",
        "default_schedule", "observes", "bounded", "budget", "schedule", "decode_interval", "compresses", "capacity",
        "wants_attention",
        "step", "reset", "report", "config"}
    capabilities = (Observes, ActsBeforeStep, ReadsQueries, RollsBack, Reconstructs)
    for capability in capabilities:
        hooks = {n for n in vars(capability) if not n.startswith("_")} | set(capability.__annotations__)
        assert hooks and not hooks & set(dir(KVPolicy)), capability
    opted = {name: {c.__name__ for c in capabilities if issubclass(policy_class(name), c)} for name in available()}
    assert opted.pop("asrkf") == {"Observes", "ActsBeforeStep", "ReadsQueries", "RollsBack"}
    assert opted.pop("kvzip") == {"Reconstructs"}
    assert all(not used for used in opted.values()), opted  # every other method reads the base alone


def test_bottom_k_names_what_top_k_leaves_out_or_declines_a_tie():
    """On scores with and without ties at the boundary, and with an excluded (protected) set: where `bottom_k` answers,
    its rows are exactly those `top_k` does not keep; where the e-th and (e+1)-th lowest tie, it declines (None), so a
    scorer's kept set never depends on which of the two chose it."""
    import torch

    from kvbench.selection import bottom_k, top_k

    gen = torch.Generator().manual_seed(0)
    answered = declined = 0
    for trial in range(300):
        n, e = 12 + trial % 7, 1 + trial % 4
        scores = torch.randint(0, 6 if trial % 2 else 1000, (1, 3, n), generator=gen).float()  # odd trials: ties
        exclude = (torch.rand(1, 3, n, generator=gen) < 0.3) if trial % 3 else None
        if exclude is not None:
            exclude = exclude[:, :1].expand(1, 3, n).clone()  # the same count in every row, as `protected` gives
        excluded = 0 if exclude is None else int(exclude[0, 0].sum())
        if n - excluded < e:
            continue
        lowest = bottom_k(scores, e, exclude, excluded)
        if lowest is None:
            declined += 1
            continue
        answered += 1
        kept = top_k(scores, n - excluded - e, exclude)
        if exclude is not None:
            kept |= exclude
        expected = (~kept).nonzero()[:, 2].view(1, 3, e)
        assert torch.equal(lowest.sort(-1).values, expected)
    assert answered > 50 and declined > 50
    wrong_count = torch.zeros(1, 1, 8, dtype=torch.bool)
    wrong_count[..., :2] = True  # holds 2 where the caller says 3: declined
    assert bottom_k(torch.arange(8.0)[None, None], 1, wrong_count, 3) is None
