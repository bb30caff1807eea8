"""One registry helper (issue 16): a taken name is refused everywhere, builders included."""

import pytest

from nla_core.registry import Registry


def test_registry_refuses_a_taken_name():
    reg: Registry[object] = Registry("thing")
    item = object()
    assert reg.register("a", item) is item and reg.register("a", item) is item  # the same item again: no-op
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", object())
    strict: Registry[object] = Registry("tool", same_ok=False)
    strict.register("t", item)
    with pytest.raises(ValueError):
        strict.register("t", item)
    assert reg.names() == ["a"] and dict(reg) == {"a": item}


def test_builders_refuse_a_duplicate_name():
    from environments import BUILDERS, Builder, register_builder

    before = BUILDERS["plain"]

    class Again(Builder):
        name = "plain"

    with pytest.raises(ValueError, match="builder 'plain' is already registered"):
        register_builder(Again)
    assert BUILDERS["plain"] is before


def test_judges_are_a_registry():
    from evals.judge import JUDGES, EmbeddingJudge, make_judge, register_judge

    assert list(JUDGES) == ["offline", "claude"]
    assert isinstance(make_judge("offline"), EmbeddingJudge)
    with pytest.raises(ValueError):
        register_judge("offline", lambda client=None: EmbeddingJudge())
