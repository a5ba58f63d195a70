"""A config problem phrased for its user: the file, each field and what is wrong with it, and
for a misspelt field the name it most likely meant."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config problem, already phrased for the user (file, field, hint)."""


def closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def fields_at(loc: tuple, model: type[BaseModel]) -> list[str]:
    """The field names allowed at the parent of `loc`, for 'did you mean' hints."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def explain(err: ValidationError, source: str, model: type[BaseModel]) -> ConfigError:
    """`err` as lines a user acts on: each field, what is wrong with it, and for an unknown one the closest name."""
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = closest(str(loc[-1]), fields_at(loc, model))
            lines.append(f"  {field}: unknown field{hint}")
        else:
            got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
            lines.append(f"  {field}: {e['msg']}{got}")
    return ConfigError("\n".join(lines))
