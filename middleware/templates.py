"""Named, versioned prompt templates rendered in a sandboxed Jinja2 environment.

A template is addressed as ``name`` (its newest version) or ``name@version``.
Variables are checked before rendering: every variable the template uses must
be given or have a default, and values must match the template's JSON Schema
when it declares one. Rendering runs in Jinja2's `SandboxedEnvironment` with
`StrictUndefined`, so a template cannot reach Python internals and a missing
variable is an error, never an empty string in the prompt.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from contextwise.errors import InputError

__all__ = ["Template", "TemplateRegistry", "default_registry", "register_template"]

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


@dataclass(frozen=True)
class Template:
    """One version of a named template. `schema` is a JSON Schema for the variables."""

    name: str
    version: int
    source: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    schema: Mapping[str, Any] | None = None
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def variables(self) -> frozenset[str]:
        """Every variable the template reads."""
        return frozenset(meta.find_undeclared_variables(_ENV.parse(self.source)))

    def check(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with `variables`, validated; raises InputError naming the variable."""
        values = {**self.defaults, **variables}
        missing = sorted(self.variables - values.keys())
        if missing:
            raise InputError(
                f"template {self.ref}", f"needs variable(s) {missing}, which were not given"
            )
        if self.schema is not None:
            try:
                jsonschema.validate(values, dict(self.schema))
            except jsonschema.ValidationError as e:
                where = ".".join(str(p) for p in e.absolute_path) or "variables"
                raise InputError(f"template {self.ref} variable {where}", e.message) from None
        return values

    def render(self, variables: Mapping[str, Any] | None = None) -> str:
        values = self.check(variables or {})
        try:
            return _ENV.from_string(self.source).render(values).strip()
        except (UndefinedError, SecurityError, TypeError) as e:
            raise InputError(f"template {self.ref}", f"failed to render: {e}") from None


class TemplateRegistry:
    """Templates by name and version; thread-safe."""

    def __init__(self) -> None:
        self._templates: dict[str, dict[int, Template]] = {}
        self._lock = threading.Lock()

    def register(
        self,
        name: str,
        source: str,
        *,
        version: int | None = None,
        defaults: Mapping[str, Any] | None = None,
        schema: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> Template:
        """Add a template version (default: the next one). Re-registering the same
        version with different text is an error: a version, once used, means one prompt."""
        if not name or "@" in name:
            raise InputError("template name", f"{name!r} must be non-empty and contain no '@'")
        try:
            _ENV.parse(source)
        except TemplateSyntaxError as e:
            raise InputError(f"template {name}", f"line {e.lineno}: {e.message}") from None
        if schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(dict(schema))
            except jsonschema.SchemaError as e:
                raise InputError(f"template {name} schema", e.message) from None
        with self._lock:
            versions = self._templates.setdefault(name, {})
            v = version if version is not None else max(versions, default=0) + 1
            if v < 1:
                raise InputError(f"template {name}", f"version must be >= 1 (got {v})")
            template = Template(name, v, source, dict(defaults or {}), schema, description)
            old = versions.get(v)
            if old is not None and (old.source, old.defaults, old.schema) != (
                template.source, template.defaults, template.schema
            ):
                raise InputError(
                    f"template {template.ref}", "is already registered with different content; "
                    "register a new version instead"
                )
            versions[v] = template
            return template

    def get(self, ref: str) -> Template:
        """`name` (newest version) or `name@version`."""
        name, _, version = ref.partition("@")
        with self._lock:
            versions = self._templates.get(name)
            if not versions:
                known = sorted(self._templates)
                raise InputError("template", f"{name!r} is not registered (known: {known})")
            if not version:
                return versions[max(versions)]
            if not version.isdigit() or int(version) not in versions:
                raise InputError(
                    "template", f"{ref!r}: no such version (have {sorted(versions)})"
                )
            return versions[int(version)]

    def names(self) -> list[str]:
        with self._lock:
            return [t.ref for v in self._templates.values() for t in v.values()]


default_registry = TemplateRegistry()


def register_template(name: str, source: str, **kwargs: Any) -> Template:
    """Register a template in the process-wide registry the templating stage reads."""
    return default_registry.register(name, source, **kwargs)


# Built-in templates. Short on purpose: every token here is paid on every call.
register_template(
    "assistant",
    "You are {{ role }}. Answer accurately and concisely."
    "{% if audience %} The user is {{ audience }}.{% endif %}",
    version=1,
    defaults={"role": "a helpful assistant", "audience": ""},
    schema={"type": "object", "properties": {"role": {"type": "string"},
                                             "audience": {"type": "string"}}},
    description="general assistant",
)
register_template(
    "agent",
    "You are {{ role }}. Use a tool when it helps; call at most one tool per step and "
    "answer from tool results, not guesses.{% if today %} Today is {{ today }}.{% endif %}",
    version=1,
    defaults={"role": "a helpful agent", "today": ""},
    schema={"type": "object", "properties": {"role": {"type": "string"},
                                             "today": {"type": "string"}}},
    description="tool-using agent",
)
