"""Spec parsing: ``KIND[:PATH][,KEY=VALUE|,FLAG]...`` into kind, path and options."""

from __future__ import annotations

from ...errors import UserError
from .names import check_class_names
from .registry import SOURCES, known_kinds


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str | bool]]:
    """Split a data spec into ``(kind, path or None, options)``.

    ``options`` maps each option name to its string value, or to ``True`` for a bare flag.
    Raises :class:`UserError` for an unknown kind, an unknown or repeated option, a missing or
    superfluous path, or a flag/value mismatch.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            f"empty data spec; expected KIND[:PATH][,option=value...] with KIND one of {_kinds()}"
        )
    head, *tokens = spec.strip().split(",")
    kind, colon, path = head.partition(":")
    kind = kind.strip().lower()
    source = SOURCES.get(kind)
    if source is None:
        raise UserError(f"data spec {spec!r}: unknown kind {kind!r}; known kinds: {_kinds()}")
    path = path.strip()
    if not source.needs_path:
        if path:
            raise UserError(f"data spec {spec!r}: kind {kind!r} takes no path ({source.no_path_note})")
        path_out: str | None = None
    else:
        if not path:
            raise UserError(f"data spec {spec!r}: kind {kind!r} needs a path, as in {kind}:PATH")
        path_out = path
    allowed = source.options
    options: dict[str, str | bool] = {}
    for token in tokens:
        token = token.strip()
        if not token:
            continue
        key, eq, value = token.partition("=")
        key = key.strip().lower()
        if key not in allowed:
            raise UserError(
                f"data spec {spec!r}: unknown option {key!r} for kind {kind!r}; "
                f"known options: {', '.join(sorted(allowed))}"
            )
        if key in options:
            raise UserError(f"data spec {spec!r}: option {key!r} given twice")
        if key in source.flags:
            options[key] = _parse_bool(spec, key, value.strip()) if eq else True
        else:
            if not eq or not value.strip():
                raise UserError(f"data spec {spec!r}: option {key!r} needs a value, as in {key}=VALUE")
            options[key] = value.strip()
    return kind, path_out, options


def _kinds() -> str:
    return ", ".join(known_kinds())


def _parse_bool(spec: str, key: str, value: str) -> bool:
    v = value.lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off"}:
        return False
    raise UserError(
        f"data spec {spec!r}: option {key!r} is a flag; use ,{key} or {key}=true/false, not {value!r}"
    )


def _parse_size(value: str | bool | None) -> tuple[int, int] | None:
    """``"32"`` → ``(32, 32)``; ``"24x32"`` → ``(24, 32)`` as (H, W)."""
    if value is None:
        return None
    text = str(value).lower().replace("×", "x")
    parts = text.split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or min(nums, default=0) < 1:
        raise UserError(f"option size={value}: expected a positive size S or HxW, e.g. size=32 or size=24x32")
    return (nums[0], nums[0]) if len(nums) == 1 else (nums[0], nums[1])


def _parse_channels(value: str | bool | None) -> int | None:
    if value is None:
        return None
    if str(value) not in {"1", "3"}:
        raise UserError(f"option channels={value}: expected 1 (grayscale) or 3 (RGB)")
    return int(value)


def _parse_classes(value: str | bool | None) -> list[str] | None:
    if value is None:
        return None
    names = [c.strip() for c in str(value).split(";")]
    check_class_names(names, f"option classes={value}", hint="; expected classes=a;b;c")
    return names
