"""Templating: named versioned templates, variable checks, system assembly, length control."""

from __future__ import annotations

import pytest
from contextwise.middleware.templates import TemplateRegistry, default_registry
from contextwise.middleware.templating import TemplatingStage

from contextwise.errors import InputError
from contextwise.policy import Example, Templating
from contextwise.types import Call


def _call(*messages: dict, **kw) -> Call:
    return Call.build(list(messages) or [{"role": "user", "content": "hi"}], **kw)


@pytest.fixture
def registry() -> TemplateRegistry:
    r = TemplateRegistry()
    r.register("support", "You help customers of {{ company }}.", schema={
        "type": "object", "properties": {"company": {"type": "string", "minLength": 2}},
        "required": ["company"]})
    r.register("support", "You are the support desk of {{ company }}. Be brief.")
    return r


def test_versions_resolve_by_name_and_number(registry: TemplateRegistry) -> None:
    assert registry.get("support").version == 2
    assert registry.get("support@1").render({"company": "Acme"}) == "You help customers of Acme."
    with pytest.raises(InputError, match="no such version"):
        registry.get("support@7")
    with pytest.raises(InputError, match="not registered"):
        registry.get("nope")


def test_same_version_with_other_text_is_refused(registry: TemplateRegistry) -> None:
    registry.register("support", "You help customers of {{ company }}.", version=1,
                      schema=registry.get("support@1").schema)  # identical: fine
    with pytest.raises(InputError, match="different content"):
        registry.register("support", "Other text", version=1)


def test_variables_are_checked_before_rendering(registry: TemplateRegistry) -> None:
    with pytest.raises(InputError, match=r"needs variable\(s\) \['company'\]"):
        registry.get("support@2").render({})
    with pytest.raises(InputError, match="company"):
        registry.get("support@1").render({"company": "A"})  # schema minLength 2


def test_syntax_errors_and_sandbox(registry: TemplateRegistry) -> None:
    with pytest.raises(InputError, match="line 1"):
        registry.register("bad", "{% if %}")
    registry.register("evil", "{{ x.__class__.__mro__ }}")
    with pytest.raises(InputError, match="failed to render"):
        registry.get("evil").render({"x": "s"})


def test_stage_assembles_one_system_message(registry: TemplateRegistry) -> None:
    stage = TemplatingStage(
        Templating(template="support@2", variables={"company": "Acme"}, instructions="Use metric units.",
                   max_words=40),
        registry=registry,
    )
    call = _call({"role": "system", "content": "Caller rules."}, {"role": "user", "content": "hello"})
    out = stage.apply(call)
    assert [m.role for m in out.messages] == ["system", "user"]
    system = out.messages[0].content or ""
    assert system.startswith("You are the support desk of Acme.")
    assert "Use metric units." in system and "at most 40 words" in system
    assert system.endswith("Caller rules.")
    assert out.params.max_tokens is not None and out.params.max_tokens <= 40 * 2
    assert call.messages[0].content == "Caller rules."  # input untouched
    (entry,) = out.trace.of("templating")
    assert entry["template"] == "support@2"


def test_call_variables_override_policy_defaults(registry: TemplateRegistry) -> None:
    stage = TemplatingStage(Templating(template="support", variables={"company": "Acme"}),
                            registry=registry)
    out = stage.apply(_call(variables={"company": "Globex"}))
    assert "Globex" in (out.messages[0].content or "")


def test_unknown_template_fails_when_the_stage_is_built() -> None:
    with pytest.raises(InputError, match="not registered"):
        TemplatingStage(Templating(template="missing@1"))


def test_length_cap_leaves_tool_calls_alone() -> None:
    stage = TemplatingStage(Templating(max_words=10))
    tools = [{"type": "function", "function": {"name": "f", "description": "d"}}]
    out = stage.apply(_call(tools=tools, max_tokens=200))
    assert out.params.max_tokens == 200
    out = stage.apply(_call(max_tokens=200))
    assert out.params.max_tokens < 200


def test_builtin_templates_render() -> None:
    assert "helpful agent" in default_registry.get("agent@1").render({})
    assert "Today is 2026-11-26" in default_registry.get("agent").render({"today": "2026-11-26"})


def test_few_shot_examples_follow_the_query(embedder) -> None:
    examples = [
        Example(input="Convert 5 miles to km", output="8.05 km"),
        Example(input="What is the capital of Peru?", output="Lima"),
        Example(input="Translate 'cat' to French", output="chat"),
    ]
    stage = TemplatingStage(Templating(examples=examples, max_examples=1), embedder=embedder)
    out = stage.apply(_call({"role": "user", "content": "How many kilometres are 12 miles?"}))
    system = out.messages[0].content or ""
    assert "8.05 km" in system and "Lima" not in system
    assert out.trace.of("templating")[0]["examples"] == 1


def test_examples_respect_the_token_budget(embedder) -> None:
    examples = [Example(input=f"question {i} " * 20, output="answer " * 20) for i in range(5)]
    stage = TemplatingStage(
        Templating(examples=examples, max_examples=5, examples_budget_tokens=100), embedder=embedder
    )
    out = stage.apply(_call({"role": "user", "content": "question 3"}))
    assert (out.messages[0].content or "").count("Assistant:") == 1
