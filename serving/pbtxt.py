"""A minimal protobuf text-format writer for Triton's config.pbtxt (dicts in, text out)."""
from __future__ import annotations

from typing import Any, Mapping


class Enum(str):
    """A protobuf enum value: written bare, not quoted."""


def render(message: Mapping[str, Any], indent: int = 0) -> str:
    lines = []
    for key, value in message.items():
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and all(_is_scalar(v) for v in items):
            lines.append(f"{' ' * indent}{key}: [ {', '.join(_scalar(v) for v in items)} ]")
            continue
        for item in items:
            if isinstance(item, Mapping):
                body = render(item, indent + 2)
                lines.append(f"{' ' * indent}{key} {{\n{body}\n{' ' * indent}}}")
            else:
                lines.append(f"{' ' * indent}{key}: {_scalar(item)}")
    return "\n".join(lines)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, Mapping)


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
