"""Rule packs: alert rules as data.

A pack is YAML (parsed by the caller; `rules/` does no I/O):

    rules:
      - alert: ReplicationRPOBreach
        entity: vm_replication
        condition: lag_seconds > rpo_target_seconds     # SQL expression, compiled by polars
        for: 0s
        keep_firing_for: 0s
        severity: critical
        labels: {team: storage}                          # extra static labels
        annotations:
          summary: Replication lag exceeds the RPO.
          description: "VM {vm} ... {lag_seconds} s ..."  # {column} of the entity view

Conditions are compiled once with `pl.sql_expr` (nothing is `eval`ed) and checked against the
entity's columns, so a typo is reported when the pack is loaded, never at the first tick.
Problems carry the path inside the document so the caller can name file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from rules.views import empty_views

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
ALERT_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_LABELS = {"alertname", "severity", "service"}


def parse_duration(value: object) -> float:
    """`30s`, `5m`, `1h`, `250ms`, `2d`, or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 30s, 5m or 1h")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    alert: str
    entity: Literal[
        "vm_replication", "vm_backup", "vm", "node", "link", "cluster", "service_group", "storage_path", "source",
        "source_stream", "source_partition",
    ]
    condition: str = Field(min_length=1)
    for_seconds: Duration = Field(default=0.0, alias="for")
    keep_firing_for_seconds: Duration = Field(default=0.0, alias="keep_firing_for")
    severity: Literal["critical", "warning", "info"]
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str]

    @field_validator("alert")
    @classmethod
    def _camel_case(cls, value: str) -> str:
        if not ALERT_NAME.match(value):
            raise ValueError("alert names are CamelCase letters and digits, e.g. ReplicationRPOBreach")
        return value

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not LABEL_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid Prometheus label name")
            if name in RESERVED_LABELS:
                raise ValueError(f"label {name!r} is set by rpowatch and cannot be overridden")
        return value

    @field_validator("annotations")
    @classmethod
    def _summary_and_description(cls, value: dict[str, str]) -> dict[str, str]:
        missing = [k for k in ("summary", "description") if not value.get(k)]
        if missing:
            raise ValueError(f"annotations need {' and '.join(missing)}")
        if not value["summary"].rstrip().endswith("."):
            raise ValueError("summary is a static sentence ending with a period")
        return value


class RulePackModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[RuleSpec]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pack: where (path inside the document) and why."""

    path: tuple[str | int, ...]
    message: str
    rule: str | None = None


@dataclass(frozen=True)
class CompiledRule:
    spec: RuleSpec
    condition: pl.Expr
    annotations: dict[str, pl.Expr]  # rendered per alert with pl.format

    @property
    def name(self) -> str:
        return self.spec.alert


@dataclass(frozen=True)
class RulePack:
    rules: tuple[CompiledRule, ...]

    def merged_with(self, other: "RulePack") -> "RulePack":
        """`other`'s rules replace rules of the same name; new ones are appended."""
        replaced = {r.name: r for r in other.rules}
        kept = [replaced.pop(r.name, r) for r in self.rules]
        return RulePack((*kept, *[r for r in other.rules if r.name in replaced]))


def _template(text: str, columns: set[str], extra: dict[str, str]) -> pl.Expr:
    """`{column}` placeholders → a vectorized pl.format; unknown names raise ValueError."""
    pieces = _PLACEHOLDER.split(text)
    fmt_parts: list[str] = []
    args: list[pl.Expr] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            fmt_parts.append(piece)
            continue
        if piece in extra:
            fmt_parts.append(extra[piece])
        elif piece in columns:
            fmt_parts.append("{}")
            col = pl.col(piece)
            args.append(
                pl.when(col.is_null()).then(pl.lit("unknown")).otherwise(
                    col.round(1).cast(pl.String) if piece.endswith(("_seconds", "_ratio")) else col.cast(pl.String)
                )
            )
        else:
            raise ValueError(f"unknown placeholder {{{piece}}}")
    fmt = "".join(fmt_parts)
    return pl.format(fmt, *args) if args else pl.lit(fmt)


def compile_pack(document: Any, template_vars: dict[str, str] | None = None) -> tuple[RulePack, list[Problem]]:
    """Validate and compile a parsed YAML document. Returns the rules that compiled and every
    problem found (the caller decides whether any problem is fatal)."""
    problems: list[Problem] = []
    extra = template_vars or {}
    if not isinstance(document, dict) or not isinstance(document.get("rules"), list):
        return RulePack(()), [Problem((), "a rule pack is a mapping with a 'rules' list")]
    compiled: list[CompiledRule] = []
    seen: dict[str, int] = {}
    views = empty_views()
    for index, raw in enumerate(document["rules"]):
        name = raw.get("alert") if isinstance(raw, dict) else None
        try:
            spec = RuleSpec.model_validate(raw)
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(str(p) for p in err["loc"])
                problems.append(Problem(("rules", index, *loc), err["msg"], name))
            continue
        if spec.alert in seen:
            problems.append(
                Problem(("rules", index, "alert"), f"duplicate of rule #{seen[spec.alert] + 1}", spec.alert)
            )
            continue
        seen[spec.alert] = index
        frame = views.of(spec.entity)
        columns = set(frame.columns)
        try:
            condition = pl.sql_expr(spec.condition)
            out = frame.select(condition)
            if out.schema.dtypes()[0] != pl.Boolean:
                raise ValueError(f"the condition is {out.schema.dtypes()[0]}, not a true/false test")
        except Exception as exc:  # polars raises several types; all mean "bad condition"
            # Polars may list the columns itself (unsorted, with brackets): the sorted list follows.
            message = re.sub(r";? ?valid columns: \[.*\]", "", str(exc).splitlines()[0])
            problems.append(
                Problem(("rules", index, "condition"), f"{message} (columns of {spec.entity}: {', '.join(sorted(columns))})", spec.alert)
            )
            continue
        annotations: dict[str, pl.Expr] = {}
        bad = False
        for key, text in spec.annotations.items():
            try:
                annotations[key] = _template(text, columns, extra)
            except ValueError as exc:
                problems.append(Problem(("rules", index, "annotations", key), str(exc), spec.alert))
                bad = True
        if not bad:
            compiled.append(CompiledRule(spec, condition, annotations))
    return RulePack(tuple(compiled)), problems
