"""A small renderer of protobuf text format for Triton's config.pbtxt (no templates).

Values: str -> quoted, bool -> true/false, int/float -> as is, `Enum("TYPE_INT32")` -> bare,
dict -> a message block, list of dicts -> a repeated message, list of scalars -> [a, b]."""
from __future__ import annotations

import json


class Enum(str):
    """An enum value, written without quotes."""


def _scalar(v) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"cannot render {v!r} in protobuf text format")


def render(message: dict, indent: int = 0) -> str:
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{render(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines.append(f"{pad}{key} {{\n{render(item, indent + 1)}{pad}}}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)
