"""Recovery policies (contracts.md §2): which RPO and test cadence applies to which VM.

Policies are matched in order, first match wins, and resolved for a whole frame of VMs with
`when/then` chains, so a frame of any size costs a few expressions, not a loop. The state tables
resolve them only for the VMs a batch touches (a VM's policy depends on that VM's row alone).
"""

from __future__ import annotations

import re

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

DAY_S = 86_400.0


class PolicyMatch(BaseModel):
    """Shell-style patterns (`*` any run of characters, `?` one character); an absent key
    matches everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vm: str | None = None
    service_group: str | None = None
    hci_cluster: str | None = None
    technology: str | None = None


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    match: PolicyMatch = PolicyMatch()
    replication_rpo_seconds: float | None = Field(
        default=None, gt=0, description="None: twice the VM's replication interval"
    )
    backup_rpo_seconds: float = Field(default=DAY_S, gt=0)
    failover_test_max_age_seconds: float = Field(default=31 * DAY_S, gt=0)
    restore_test_max_age_seconds: float = Field(default=90 * DAY_S, gt=0)
    # Recovery points to keep per retention tier (0: the tier is not required).
    retention_daily: int = Field(default=14, ge=0)
    retention_weekly: int = Field(default=0, ge=0)
    retention_monthly: int = Field(default=6, ge=0)
    retention_yearly: int = Field(default=7, ge=0)


DEFAULT_POLICY = Policy(name="default")

# Columns of the VM tables that patterns are matched against.
_MATCH_COLUMNS = {
    "vm": "vm_id",
    "service_group": "service_group",
    "hci_cluster": "cluster_id",
    "technology": "technology",
}


def glob_regex(pattern: str) -> str:
    """An anchored regex for a glob (fnmatch.translate's output is Python-only, not polars')."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return "^" + "".join(parts) + "$"


def _pattern(column: str, pattern: str) -> pl.Expr:
    value = pl.col(column).cast(pl.String)
    if "*" not in pattern and "?" not in pattern:
        # No wildcard: the anchored regex would only test equality, which needs no regex.
        return (value == pattern).fill_null(False)
    return value.str.contains(glob_regex(pattern)).fill_null(False)


def _matches(match: PolicyMatch, available: set[str]) -> pl.Expr:
    cond = pl.lit(True)
    for key, column in _MATCH_COLUMNS.items():
        pattern = getattr(match, key)
        if pattern is None:
            continue
        if column not in available:
            cond = cond & pl.lit(False)
            continue
        cond = cond & _pattern(column, pattern)
    return cond


def first_match(policies: tuple[Policy, ...], columns: set[str]) -> pl.Expr:
    """For each row, the index of the first policy that matches it (null: none does). Computed
    once, as a column, and then given to `resolve_matched` for every attribute: the patterns
    are tested once per row, not once per attribute."""
    expr: pl.Expr = pl.lit(None, dtype=pl.UInt32)
    for index in reversed(range(len(policies))):
        expr = pl.when(_matches(policies[index].match, columns)).then(pl.lit(index, dtype=pl.UInt32)).otherwise(expr)
    return expr


def resolve_matched(policies: tuple[Policy, ...], matched: pl.Expr, attribute: str, fallback: pl.Expr) -> pl.Expr:
    """The policy value `attribute` of the policy `matched` (a `first_match` index); `fallback`
    where no policy matches or the matching policy leaves it unset (None)."""
    expr: pl.Expr = fallback
    for index in reversed(range(len(policies))):
        value = getattr(policies[index], attribute)
        if value is not None:
            expr = pl.when(matched == index).then(pl.lit(float(value))).otherwise(expr)
    return expr


def resolve(
    policies: tuple[Policy, ...], columns: set[str], attribute: str, fallback: pl.Expr
) -> pl.Expr:
    """The policy value `attribute` for each row, first match wins; `fallback` where no policy
    matches or the matching policy leaves it unset (None)."""
    return resolve_matched(policies, first_match(policies, columns), attribute, fallback)
