"""Identity mapping: the names real telemetry uses → rpowatch's `vm_id`, `cluster_id`, `target_id`.

Each role has one rule, applied as a vectorized expression over a whole column:

1. `map` — an exact lookup (source value → id); wins when it has the value;
2. `pattern` — a regular expression with a named group `id`, whose capture becomes the id
   (no match: no id); without a pattern the source value is taken as it is;
3. `default` — the id when neither gives one (e.g. every record of a feed belongs to one
   Azure Local instance).

A record whose id is still empty is not guessed at: the adapter dead-letters it with
`unmapped_identity`. Patterns run in polars (Rust `regex` syntax: no look-around or
back-references); `IdentityRule.check` rejects a pattern that polars or Python cannot use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

# Defaults: a host or broker FQDN (`hv01.contoso.com`) → its first label (`hv01`); a DPM/MABS
# data source name (`Backup Using Child Partition Snapshot\vm01`) → the part after the last
# backslash, which is the VM's name.
FIRST_DNS_LABEL = r"^(?P<id>[^.]+)"
AFTER_LAST_BACKSLASH = r"^(?:.*\\)?(?P<id>[^\\]+)$"


@dataclass(frozen=True)
class IdentityRule:
    map: dict[str, str] = field(default_factory=dict)
    pattern: str | None = None
    default: str | None = None

    def check(self) -> None:
        """Raise ValueError if `pattern` is unusable (no `id` group, or not valid for polars)."""
        if self.pattern is None:
            return
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if "id" not in compiled.groupindex:
            raise ValueError("the pattern needs a named group (?P<id>...)")
        try:
            pl.Series([""]).str.extract(self.pattern, compiled.groupindex["id"])
        except pl.exceptions.PolarsError as exc:
            raise ValueError(f"polars cannot use this pattern: {exc}") from None

    def resolve(self, value: pl.Expr) -> pl.Expr:
        """The id for each source value (String expression); null when there is none."""
        value = _blank_to_null(value)
        candidates: list[pl.Expr] = []
        if self.map:
            candidates.append(value.replace_strict(self.map, default=None, return_dtype=pl.String))
        if self.pattern is not None:
            group = re.compile(self.pattern).groupindex["id"]
            candidates.append(_blank_to_null(value.str.extract(self.pattern, group)))
        else:
            candidates.append(value)
        if self.default:
            candidates.append(pl.lit(self.default, dtype=pl.String))
        return pl.coalesce(candidates)

    def lookup(self, value: pl.Expr) -> pl.Expr:
        """Like `resolve` without the pattern: for source values that are opaque ids (a backup
        container's unique id), which only an explicit map entry or the default can name."""
        candidates = [pl.lit(self.default, dtype=pl.String)] if self.default else []
        if self.map:
            candidates.insert(0, _blank_to_null(value).replace_strict(self.map, default=None, return_dtype=pl.String))
        return pl.coalesce(candidates) if candidates else pl.lit(None, dtype=pl.String)


@dataclass(frozen=True)
class IdentitySettings:
    """`vm_source`: which identity of the VM a format offers becomes `vm_id` before the `vm`
    rule applies — its name (Hyper-V VMName, ASR replicated item name, backup item name) or its
    platform id (Hyper-V VMId, ASR/Backup unique ids)."""

    vm_source: Literal["name", "id"] = "name"
    vm: IdentityRule = IdentityRule(pattern=AFTER_LAST_BACKSLASH)
    cluster: IdentityRule = IdentityRule(pattern=FIRST_DNS_LABEL)
    target: IdentityRule = IdentityRule(pattern=FIRST_DNS_LABEL)


def _blank_to_null(value: pl.Expr) -> pl.Expr:
    return pl.when(value.str.strip_chars() == "").then(None).otherwise(value)
