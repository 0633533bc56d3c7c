"""Policy: defaults, validation, loading from a Python file, describe and diff."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from contextwise.errors import ContextwiseError, PolicyError
from contextwise.policy import (
    DEFAULT_MODEL,
    Budget,
    Local,
    Policy,
    Price,
    Pricing,
    Storage,
)


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    p = Policy()
    assert p.budget == Budget(max_context_tokens=None, max_output_tokens=256)
    assert p.backend.kind == "local"
    assert p.backend.model == DEFAULT_MODEL == "smollm2-135m-instruct"
    assert p.backend.device == "auto"
    assert p.backend.dtype == "auto"
    assert p.backend.quantization == "none"
    assert p.backend.cache_dir is None
    assert p.storage == Storage(path=None, ledger=True)
    assert p.pricing.compare_to == ["gpt-4o-mini", "gpt-4o"]
    assert p.pricing.prices == {}
    assert Policy() == p


def test_policies_are_frozen() -> None:
    p = Policy()
    with pytest.raises(ValidationError):
        p.budget = Budget()  # type: ignore[misc]
    with pytest.raises(ValidationError):
        p.budget.max_output_tokens = 5  # type: ignore[misc]


def test_default_lists_are_not_shared() -> None:
    a, b = Pricing(), Pricing()
    assert a.compare_to == b.compare_to
    assert a.compare_to is not b.compare_to


def test_valid_custom_policy() -> None:
    p = Policy(
        budget=Budget(max_context_tokens=2048, max_output_tokens=64),
        backend=Local(model="/models/x.gguf", device="cuda:1", dtype="bfloat16"),
        storage=Storage(path=":memory:", ledger=False),
        pricing=Pricing(compare_to=["gpt-4o"],
                        prices={"mine": Price(input_per_mtok=1, output_per_mtok=2)}),
    )
    assert p.budget.max_context_tokens == 2048
    assert p.backend.device == "cuda:1"
    assert p.pricing.prices["mine"].output_per_mtok == 2.0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Policy(budgt=Budget()), "budgt"),
        (lambda: Budget(max_output=5), "max_output"),
        (lambda: Local(modle="x"), "modle"),
        (lambda: Storage(sqlite="x"), "sqlite"),
        (lambda: Price(input_per_mtok=1, output_per_mtok=1, currency="EUR"), "currency"),
    ],
)
def test_unknown_keys_rejected(build: Any, field: str) -> None:
    with pytest.raises(ValidationError) as ei:
        build()
    errors = ei.value.errors()
    assert errors[0]["type"] == "extra_forbidden"
    assert errors[0]["loc"][-1] == field


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Budget(max_context_tokens=8), "max_context_tokens"),
        (lambda: Budget(max_output_tokens=0), "max_output_tokens"),
        (lambda: Local(device="gpu"), "device"),
        (lambda: Local(dtype="int4"), "dtype"),
        (lambda: Local(quantization="int3"), "quantization"),
        (lambda: Local(kind="remote"), "kind"),
        (lambda: Price(input_per_mtok=-1, output_per_mtok=1), "input_per_mtok"),
        (lambda: Price(input_per_mtok=1), "output_per_mtok"),
        (lambda: Storage(ledger="sometimes"), "ledger"),
    ],
)
def test_bad_values_rejected_naming_the_field(build: Any, field: str) -> None:
    with pytest.raises(ValidationError) as ei:
        build()
    assert ei.value.errors()[0]["loc"] == (field,)
    assert field in str(ei.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_good_devices(device: str) -> None:
    assert Local(device=device).device == device


def test_from_dict_valid_nested() -> None:
    p = Policy.from_dict({"budget": {"max_output_tokens": 32}, "storage": {"ledger": False}})
    assert p.budget.max_output_tokens == 32
    assert p.storage.ledger is False
    assert p.backend == Local()
    assert Policy.from_dict({}) == Policy()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"bugdet": {}}, "bugdet: unknown key"),
        ({"budget": {"max_output": 5}}, "budget.max_output: unknown key"),
        ({"budget": {"max_output_tokens": 0}}, "budget.max_output_tokens:"),
        ({"backend": {"device": "tpu"}}, "backend.device:"),
        ({"pricing": {"prices": {"x": {"input_per_mtok": -2, "output_per_mtok": 1}}}},
         "pricing.prices.x.input_per_mtok:"),
    ],
)
def test_from_dict_raises_policy_error_naming_the_field(
    data: dict[str, Any], expected: str
) -> None:
    with pytest.raises(PolicyError) as ei:
        Policy.from_dict(data)
    msg = str(ei.value)
    assert msg.startswith("invalid policy: ")
    assert expected in msg
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, ContextwiseError)


def test_from_dict_reports_the_bad_value_and_every_error() -> None:
    with pytest.raises(PolicyError) as ei:
        Policy.from_dict({"budget": {"max_output_tokens": 0}, "backend": {"device": "tpu"}})
    msg = str(ei.value)
    assert "(got 0)" in msg
    assert "(got 'tpu')" in msg
    assert "; " in msg


# --------------------------------------------------------------------------- load


def test_load_policy_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "my_policy.py", """
        from contextwise import Policy
        from contextwise.policy import Budget, Storage

        policy = Policy(budget=Budget(max_output_tokens=99), storage=Storage(ledger=False))
    """)
    p = Policy.load(path)
    assert p.budget.max_output_tokens == 99
    assert p.storage.ledger is False
    assert Policy.load(str(path)) == p


def test_load_single_policy_under_another_name(tmp_path: Path) -> None:
    path = write(tmp_path / "p.py", """
        from contextwise.policy import Policy, Budget
        cheap = Policy(budget=Budget(max_output_tokens=7))
    """)
    assert Policy.load(path).budget.max_output_tokens == 7


def test_load_prefers_policy_variable_among_several(tmp_path: Path) -> None:
    path = write(tmp_path / "p.py", """
        from contextwise.policy import Policy, Budget
        a = Policy(budget=Budget(max_output_tokens=1))
        policy = Policy(budget=Budget(max_output_tokens=2))
    """)
    assert Policy.load(path).budget.max_output_tokens == 2


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(missing)
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(tmp_path)  # a directory is not a policy file


def test_load_file_without_policy(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.py", """
        from contextwise import Policy
        x = 1
    """)
    with pytest.raises(PolicyError, match=r"must define `policy = Policy\(...\)`.*found 0"):
        Policy.load(path)


def test_load_file_with_two_unnamed_policies(tmp_path: Path) -> None:
    path = write(tmp_path / "two.py", """
        from contextwise import Policy
        a = Policy()
        b = Policy()
    """)
    with pytest.raises(PolicyError, match="found 2"):
        Policy.load(path)


def test_load_file_with_policy_not_a_policy(tmp_path: Path) -> None:
    path = write(tmp_path / "wrong.py", """
        policy = {"budget": {"max_output_tokens": 5}}
    """)
    with pytest.raises(PolicyError, match="found 0"):
        Policy.load(path)


def test_load_invalid_policy_in_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.py", """
        from contextwise.policy import Policy, Budget
        policy = Policy(budget=Budget(max_output_tokens=0))
    """)
    with pytest.raises(PolicyError) as ei:
        Policy.load(path)
    assert str(path) in str(ei.value)
    assert "max_output_tokens" in str(ei.value)


# --------------------------------------------------------------------------- describe / diff


def test_describe_default_lists_every_sub_policy_and_field_unmarked() -> None:
    text = Policy().describe()
    lines = text.splitlines()
    for name in Policy.model_fields:
        assert f"{name}:" in lines or f"{name}: off" in lines  # None turns a stage off
    assert "templating: off" in lines
    for sub in (Budget, Local, Storage, Pricing):
        for field in sub.model_fields:
            assert any(line.startswith(f"  {field}: ") for line in lines), field
    assert "*" not in text
    assert "  max_output_tokens: 256" in lines


def test_describe_marks_changed_fields() -> None:
    p = Policy(budget=Budget(max_output_tokens=64), backend=Local(device="cpu"))
    lines = p.describe().splitlines()
    assert "budget:  *" in lines
    assert "  max_output_tokens: 64  *" in lines
    assert "  max_context_tokens: None" in lines  # unchanged: no mark
    assert "backend:  *" in lines
    assert "  device: 'cpu'  *" in lines
    assert "  model: 'smollm2-135m-instruct'" in lines
    assert "storage:" in lines  # unchanged sub-policy: no mark
    assert "pricing:" in lines
    assert sum("*" in line for line in lines) == 4


def test_diff() -> None:
    a = Policy(budget=Budget(max_output_tokens=64), storage=Storage(ledger=False))
    b = Policy()
    assert a.diff(b) == {
        "budget.max_output_tokens": (64, 256),
        "storage.ledger": (False, True),
    }
    assert b.diff(a) == {
        "budget.max_output_tokens": (256, 64),
        "storage.ledger": (True, False),
    }
    assert a.diff(a) == {}
    assert Policy().diff(Policy()) == {}


def test_diff_lists_and_optional_values() -> None:
    a = Policy(pricing=Pricing(compare_to=["gpt-4.1"]), budget=Budget(max_context_tokens=1024))
    assert a.diff(Policy()) == {
        "budget.max_context_tokens": (1024, None),
        "pricing.compare_to": (["gpt-4.1"], ["gpt-4o-mini", "gpt-4o"]),
    }


def test_diff_of_added_price_reports_real_values() -> None:
    a = Policy(pricing=Pricing(prices={"mine": Price(input_per_mtok=1, output_per_mtok=2)}))
    d = a.diff(Policy())
    assert d == {"pricing.prices": ({"mine": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}, {})}


def test_load_policy_file_that_fails_to_run(tmp_path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("from contextwise import Policy\npolicy = Policy(\n")
    with pytest.raises(PolicyError, match="failed to run: SyntaxError"):
        Policy.load(broken)
