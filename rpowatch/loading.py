"""Reading configuration and rule-pack files, with problems reported as `file:line: field: why`.

Every problem in a file is collected before anything fails, so one `rpowatch check` shows the
whole list. Line numbers come from the YAML node tree, so pydantic's error locations can be
turned back into places in the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rpowatch.config import DEFAULT_PACK, Settings
from rules.pack import RulePack, compile_pack

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class ConfigError(Exception):
    """Configuration or rule packs are invalid; `problems` has one entry per problem."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _index_lines(node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, str(key.value))
            _index_lines(value, child, out)
            out[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*loc, i), out)


def _line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The line of `loc`, or of its nearest ancestor present in the file (a missing key)."""
    for end in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:end])
        if key in lines:
            return lines[key]
    return None


def _field(loc: Iterable[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse a YAML file; raise ConfigError naming the line of a syntax error."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(name, None, "", f"cannot read: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(name, line, "", f"not valid YAML: {reason}")]) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _index_lines(node, (), lines)
    return document, lines


def _int_locs(loc: tuple[Any, ...]) -> Loc:
    return tuple(p if isinstance(p, int) else str(p) for p in loc)


def _env_name(loc: Loc) -> str:
    return "RPOWATCH_" + "__".join(str(p).upper() for p in loc if not isinstance(p, int))


def load_settings(path: Path | None) -> Settings:
    """Settings from `path` (or defaults and environment only when None)."""
    document: Any = {}
    lines: dict[Loc, int] = {}
    name = str(path) if path else "<defaults>"
    if path is not None:
        document, lines = read_yaml(path)
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError([Problem(name, 1, "", "the configuration must be a YAML mapping")])
    try:
        settings = Settings(**document)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = _int_locs(err["loc"])
            env = _env_name(loc)
            if env in os.environ:
                problems.append(Problem(f"environment {env}", None, _field(loc), err["msg"]))
            else:
                problems.append(Problem(name, _line_of(lines, loc), _field(loc), err["msg"]))
        raise ConfigError(problems) from None
    if path is not None:
        # Rule packs named in a file are relative to that file, like include paths.
        packs = [p if p.is_absolute() else path.parent / p for p in settings.rule_packs]
        settings = settings.model_copy(update={"rule_packs": packs})
    return settings


def load_rule_packs(settings: Settings) -> RulePack:
    """The default pack, then each configured pack overriding rules by name."""
    problems: list[Problem] = []
    merged: RulePack | None = None
    for path in (DEFAULT_PACK, *settings.rule_packs):
        try:
            document, lines = read_yaml(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        pack, pack_problems = compile_pack(document, {"runbook_base": settings.runbook_base_url})
        for p in pack_problems:
            field = _field(p.path)
            if p.rule:
                field = f"rule {p.rule}: {field}"
            problems.append(Problem(str(path), _line_of(lines, p.path), field, p.message))
        merged = pack if merged is None else merged.merged_with(pack)
    if problems:
        raise ConfigError(problems)
    assert merged is not None  # DEFAULT_PACK is always in the list
    return merged


def check(path: Path) -> list[Problem]:
    """Every problem of a configuration file and the rule packs it names."""
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        return exc.problems
    try:
        load_rule_packs(settings)
    except ConfigError as exc:
        return exc.problems
    return []
