"""The rule engine: applies decoded batches to the entity tables and evaluates every rule on a
tick. Pure and synchronous: the clock is an argument, nothing here does I/O.

`apply` and `tick` may be called from any thread but not concurrently; a lock makes that safe.
Both replace whole immutable tables, so a `TickResult` handed to a scrape or a sender never
changes under it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import polars as pl

from ingest.contracts import Stream
from rules import lifecycle, state
from rules.ahead import Ahead, Journal, Matched, Written, found_ahead, per_vm_table
from rules.describe import (
    ANNOTATION_SCHEMA,
    LABELS_SCHEMA,
    Describer,
    Details,
    EndedAlerts,
    Identities,
    compact,
    empty_store,
)
from rules.pack import RulePack
from rules.policy import DEFAULT_POLICY, Policy
from rules.views import (
    ENTITIES,
    NEEDS_LINK,
    PER_VM,
    ROW,
    Aggregates,
    LateRows,
    ViewParams,
    Views,
    build_views,
    empty_views,
    identity,
    late_rows,
    late_rows_since,
    summarise,
)


# Fleet size (VMs) from which the rule queries run on polars' streaming engine (`Engine._active`).
STREAMING_FROM_VMS = 50_000
# Fleet size (VMs) from which `Engine.prepare` evaluates the per-VM conditions ahead of the
# next tick: below it a whole evaluation costs a few milliseconds and the tick does it.
AHEAD_FROM_VMS = 50_000


@dataclass(frozen=True)
class EngineSettings:
    heartbeat_timeout_s: float = 30.0
    dedupe_window_s: float = 600.0
    resolved_retention_s: float = 900.0
    at_risk_ratio: float = 0.8
    lookahead_s: float = 300.0
    monitoring_window_s: float = 3600.0
    rolling_window_s: float = 300.0
    ingest_stall_s: float = 60.0
    policies: tuple[Policy, ...] = (DEFAULT_POLICY,)
    link_capacity_bytes_per_s: tuple[tuple[str, str, float], ...] = ()
    static_labels: tuple[tuple[str, str], ...] = (("service", "rpowatch"),)
    # Per-link and per-service-group sums (views.Aggregates) are recomputed at most this often
    # while ingest keeps changing the state; they feed conditions that move over minutes.
    aggregate_refresh_s: float = 10.0


@dataclass(frozen=True)
class TickResult:
    views: Views
    alerts: pl.DataFrame  # lifecycle.ALERT_SCHEMA: pending, firing and recently resolved
    # The alerts that fired or resolved at this tick: lifecycle.TRANSITION_SCHEMA plus
    # `alert_id` (their labels and annotations come with `transitions`), or, in results built
    # by hand, TRANSITIONS_SCHEMA already.
    changes: pl.DataFrame
    details: Details | None = None  # renders labels and annotations on demand
    duration_s: float = 0.0
    # Seconds per phase of the tick (aggregates, conditions, labels, lifecycle, transitions).
    phases: dict[str, float] = field(default_factory=dict)
    _rendered: dict[str, pl.DataFrame] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def transitions(self) -> pl.DataFrame:
        """This tick's transitions with labels and annotations (TRANSITIONS_SCHEMA). Rendered on
        first read, on the reader's thread (the history writer's), not inside the tick: a
        fleet-wide condition can fire thousands of alerts in one tick."""
        frame = self._rendered.get("transitions")
        if frame is None:
            frame = self._render_transitions()
            self._rendered["transitions"] = frame  # rendering twice on a race gives equal frames
        return frame

    def _render_transitions(self) -> pl.DataFrame:
        changes = self.changes
        if "labels" in changes.columns or self.details is None or changes.is_empty():
            missing = [pl.lit(None, dtype=t).alias(c) for c, t in TRANSITIONS_SCHEMA.items() if c not in changes.columns]
            return changes.with_columns(missing).select(TRANSITIONS_SCHEMA.names())
        details = self.details.of(changes.get_column("alert_id"))
        return changes.join(details, on="alert_id", how="left", maintain_order="left").select(TRANSITIONS_SCHEMA.names())

    @property
    def now_ms(self) -> int:
        return self.views.now_ms

    def firing(self) -> pl.DataFrame:
        return self.alerts.filter(pl.col("state") == lifecycle.FIRING)

    def with_details(self, alerts: pl.DataFrame) -> pl.DataFrame:
        """`alerts` (rows of `self.alerts`) with their `labels` and `annotations` JSON.
        Annotations are rendered now, for these rows, so ask only for the rows you need: at
        fleet scale there can be hundreds of thousands of standing alerts."""
        if self.details is None:
            return alerts.with_columns(
                pl.lit(None, dtype=pl.String).alias("labels"), pl.lit(None, dtype=pl.String).alias("annotations")
            )
        details = self.details.of(alerts.get_column("alert_id"))
        return alerts.join(details, on="alert_id", how="left", maintain_order="left")


# A tick's transitions: lifecycle.TRANSITION_SCHEMA plus the alert's labels and annotations.
TRANSITIONS_SCHEMA = pl.Schema({**lifecycle.TRANSITION_SCHEMA, "labels": pl.String(), "annotations": pl.String()})


def empty_result() -> TickResult:
    return TickResult(views=empty_views(), alerts=lifecycle.empty_alerts(), changes=pl.DataFrame(schema=TRANSITIONS_SCHEMA))


@dataclass(frozen=True)
class _RuleQuery:
    """One query of a tick: the conditions of some rules of one entity, evaluated in one pass
    over the view columns they read (`reads`, with the identity the alert ids are hashed from).
    `linked`: they read a column that needs the VM's link."""

    entity: str
    rules: tuple[int, ...]
    reads: frozenset[str]
    linked: bool


@dataclass
class Engine:
    pack: RulePack
    settings: EngineSettings = field(default_factory=EngineSettings)
    fleet: state.FleetState = field(default_factory=state.FleetState)
    alerts: pl.DataFrame = field(default_factory=lifecycle.empty_alerts)
    held: frozenset[str] = frozenset()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        rules = self.pack.rules
        self._timing = pl.DataFrame(
            {
                "rule": list(range(len(rules))),
                "for_ms": [int(r.spec.for_seconds * 1000) for r in rules],
                "keep_firing_for_ms": [int(r.spec.keep_firing_for_seconds * 1000) for r in rules],
            },
            schema=lifecycle.TIMING_SCHEMA,
        )
        self._describer = Describer(rules, self.settings.static_labels)
        self._salts = self._describer.salts
        # Labels of the alerts whose alert_key is ambiguous (usually none; the others' are
        # rebuilt when read), and annotations of alerts as of the last tick they were true
        # (append-only stores, compacted when they have grown; see rules.describe).
        self._labels = empty_store(LABELS_SCHEMA)
        self._stored = empty_store(ANNOTATION_SCHEMA)
        # The previous tick's views and active alerts: where alerts that stop being true now
        # get their last annotations from.
        self._previous: tuple[Views, pl.DataFrame] | None = None
        # The alerts the last tick ended, their annotations not yet stored.
        self._ended: EndedAlerts | None = None
        self._by_entity: dict[str, list[int]] = {}
        for index, r in enumerate(rules):
            self._by_entity.setdefault(r.spec.entity, []).append(index)
        self._queries: list[_RuleQuery] | None = None  # made at the first evaluation
        # The per-VM conditions evaluated ahead of the next tick, and the rows written since.
        self._ahead: Ahead | None = None
        self._journals: dict[str, Journal] = {}
        self._sources: pl.DataFrame | None = None  # the last tick's, for `prepare`'s views
        self._aggregates: Aggregates | None = None
        self._generation = 0  # counts drops of instances (rows removed from the state)
        s = self.settings
        self._params = ViewParams(
            heartbeat_timeout_s=s.heartbeat_timeout_s,
            at_risk_ratio=s.at_risk_ratio,
            lookahead_s=s.lookahead_s,
            monitoring_window_s=s.monitoring_window_s,
            ingest_stall_s=s.ingest_stall_s,
            link_capacity_bytes_per_s=s.link_capacity_bytes_per_s,
        )
        self._window = state.WindowCounters(int(s.monitoring_window_s * 1000))

    def apply(self, stream: Stream, events: pl.DataFrame, now_ms: int, source: str = "") -> int:
        """Apply a batch of valid events of one stream that arrived through `source`. Returns
        how many were new (not duplicates of an `event_id` seen within the dedupe window)."""
        if events.is_empty():
            return 0
        with self._lock:
            fleet, fresh = state.drop_seen(
                self.fleet, stream.value, events, now_ms, int(self.settings.dedupe_window_s * 1000)
            )
            policies = self.settings.policies
            if stream is Stream.REPLICATION:
                table, written = state.write_replication(fleet.replication, fresh, policies, self._window)
                self._record("vm_replication", fleet.replication, table, written)
                fleet = replace(fleet, replication=table)
            elif stream is Stream.BACKUP:
                table, written = state.write_backup(fleet.backup, fresh, policies)
                self._record("vm_backup", fleet.backup, table, written)
                fleet = replace(fleet, backup=table)
            else:
                fleet = replace(
                    fleet,
                    nodes=state.apply_heartbeats(fleet.nodes, fresh, source, self.settings.rolling_window_s),
                    storage_paths=state.apply_storage(fleet.storage_paths, fresh),
                    clusters=state.apply_clock_skew(fleet.clusters, fresh),
                )
            self.fleet = fleet
            return fresh.height

    def _record(self, entity: str, before: pl.DataFrame, after: pl.DataFrame, rows: pl.Series) -> None:
        journal = self._journals.get(entity)
        if journal is not None:
            journal.record(before, after, rows)

    def drop_clusters(self, cluster_ids: Collection[str]) -> None:
        """Forget everything about these Azure Local instances: their entities vanish from the
        next views (and so from /metrics) and their alerts are dropped without a resolve,
        because another owner takes them over (a Kafka rebalance moved their partition)."""
        if not cluster_ids:
            return
        ids = list(cluster_ids)
        with self._lock:
            self.fleet = state.drop_clusters(self.fleet, ids)
            self.alerts = self.alerts.filter(~pl.col("hci_cluster").is_in(ids).fill_null(False))
            self.held = self.held - frozenset(ids)
            self._aggregates = None  # their links and service groups vanish at the next tick
            self._generation += 1

    def hold(self, cluster_ids: Collection[str]) -> None:
        """Freeze the alerts of these instances (nothing fires or resolves) while their state is
        being rebuilt, so a hand-over neither invents nor loses an alert."""
        with self._lock:
            self.held = self.held | frozenset(cluster_ids)

    def release(self, cluster_ids: Collection[str]) -> None:
        with self._lock:
            self.held = self.held - frozenset(cluster_ids)

    def tick(self, now_ms: int, sources: pl.DataFrame | None = None) -> TickResult:
        """Evaluate every rule over the whole fleet at `now_ms`. `sources` (SOURCES_SCHEMA)
        describes the ingest sources for the source-health rules."""
        clock = _PhaseClock()
        with self._lock:
            self._sources = sources
            views = build_views(
                self.fleet, now_ms, self._params, sources, self._aggregates_at(now_ms), self._late_rows(now_ms)
            )
            clock.lap("aggregates")
            held = sorted(self.held)
            active, matched = self._active(views, held)
            clock.lap("conditions")
            alerts = self.alerts
            if held:
                # Held instances' alerts neither fire nor resolve; their rows found no matches.
                is_held = pl.col("hci_cluster").is_in(held).fill_null(False)
                frozen = alerts.filter(is_held)
                alerts = alerts.filter(~is_held)
            still: pl.Series | None = None
            if matched is not None and matched.alerts is alerts:
                still, new = matched.resolve()
            else:
                new = active.filter(~pl.col("alert_id").is_in(alerts.get_column("alert_id").implode()))
            identities = self._describer.identities(views, new)
            clock.lap("labels")
            advanced, changes = lifecycle.advance(
                alerts,
                active,
                new.join(identities.identity, on="alert_id", how="left").select(lifecycle.NEW_SCHEMA.names()),
                now_ms,
                self._timing,
                int(self.settings.resolved_retention_s * 1000),
                still,
            )
            self.alerts = pl.concat([advanced, frozen]) if held else advanced
            clock.lap("lifecycle")
            self._remember(identities, active, now_ms)
            details = Details(self._describer, views, active, self.alerts, self._labels, self._stored, self._ended)
            self._previous = (views, active)
            changes = self._identify(changes)
            clock.lap("transitions")
            alerts = self.alerts
        return TickResult(views, alerts, changes, details, clock.total(), clock.phases)

    def prepare(self, now_ms: int, next_tick_in_ms: int) -> bool:
        """Between ticks, the work of the tick due at `now_ms + next_tick_in_ms` that can be
        done before it. The service calls it after each tick, in the idle time before the next.

        First the link and service-group sums, if that tick would have to recompute them (~27 ms
        at a million VMs, every `aggregate_refresh_s` while ingest changes the state). Computed
        outside the lock from the state as it is (ingest goes on applying); the tick takes them
        as the sums of an earlier state, as it does its own between refreshes.

        Then the annotations of the alerts the last tick ended, and, on large fleets, the per-VM
        conditions at that tick's instant (`_evaluate_ahead`): the tick then evaluates only the
        rows written in between. Returns whether the sums were recomputed."""
        with self._lock:
            fleet, current, generation = self.fleet, self._aggregates, self._generation
        refreshed = False
        if self._refresh_due(fleet.replication, current, now_ms + next_tick_in_ms):
            fresh = summarise(fleet, now_ms, current)
            with self._lock:
                # Not if instances were dropped meanwhile: their rows are gone from the state
                # the sums index by position (nor if a tick already refreshed them).
                if self._generation == generation and self._aggregates is current:
                    self._aggregates = fresh
                    refreshed = True
        self._render_ended()
        self._evaluate_ahead(now_ms + next_tick_in_ms)
        return refreshed

    def _render_ended(self) -> None:
        """Store the annotations of the alerts the last tick ended, rendered outside the lock
        (the views they come from are immutable)."""
        with self._lock:
            ended = self._ended
        if ended is None:
            return
        rendered = ended.annotations()
        with self._lock:
            if self._ended is ended:  # else a tick stored them meanwhile
                self._stored = pl.concat([self._stored, rendered])
                self._ended = None

    def _evaluate_ahead(self, at_ms: int) -> None:
        """Evaluate the per-VM queries at the instant `at_ms` over the state as it is, and start
        journaling the rows written from now on. A tick at `at_ms` whose other inputs are those
        (`Ahead`) re-evaluates only the journaled rows: every other row has the values it was
        evaluated with, at the same instant, so its conditions hold exactly as found here.

        Most of a tick's work at a million VMs is these queries over every row (~30 ms), while
        a second's ingest writes a few per cent of the rows; so the tick's latency drops by
        about that, for the same work done once a second in the idle time before it."""
        with self._lock:
            fleet, aggregates = self.fleet, self._aggregates
            held, sources, alerts = tuple(sorted(self.held)), self._sources, self.alerts
            self._ahead = None
            self._journals = {}
            vms = max(fleet.replication.height, fleet.backup.height)
            if vms < AHEAD_FROM_VMS or aggregates is None:
                return
            journals = {entity: Journal(per_vm_table(fleet, entity)) for entity in PER_VM}
            self._journals = journals
        views = build_views(fleet, at_ms, self._params, sources, aggregates)
        queries = self._rule_queries(views)
        ahead = [i for i, q in enumerate(queries) if q.entity in PER_VM]
        if not ahead:
            return
        found = pl.collect_all([self._query(queries[i], views, list(held)) for i in ahead], engine="streaming")
        links = views.link_figures() if any(queries[i].linked for i in ahead) else None
        # One membership test for all the queries' rows, then split by query.
        tagged = [
            self._parts(frame, queries[i].rules).with_columns(pl.lit(i, dtype=pl.UInt16).alias("__q"))
            for i, frame in zip(ahead, found)
        ]
        known = pl.col("alert_id").is_in(alerts.get_column("alert_id").implode()).alias("known")
        every = pl.concat(tagged).with_columns(known).collect()
        split = every.partition_by("__q", as_dict=True, include_key=False)
        empty = every.clear().drop("__q")
        parts = {i: split.get((i,), empty) for i in ahead}
        alerts_found = found_ahead(alerts, parts)
        late = late_rows(fleet, at_ms) if "vm" in self._by_entity else None
        with self._lock:
            # Not if another prepare started meanwhile. Instances dropped meanwhile replaced the
            # tables, so the journals lead nowhere and the tick evaluates everything.
            if self._journals is not journals:
                return
            self._ahead = Ahead(at_ms, held, aggregates, links, parts, alerts, alerts_found, late)

    def _aggregates_at(self, now_ms: int) -> Aggregates:
        """The link and service-group sums, recomputed when due (`_refresh_due`)."""
        current = self._aggregates
        if current is None or self._refresh_due(self.fleet.replication, current, now_ms):
            current = summarise(self.fleet, now_ms, current)
            self._aggregates = current
        return current

    def _refresh_due(self, table: pl.DataFrame, current: Aggregates | None, now_ms: int) -> bool:
        """Whether the sums must be recomputed for a tick at `now_ms`: at once when VMs came or
        went (a new VM can open a link or a service group: its alerts must not wait), else when
        the state changed and they are older than `aggregate_refresh_s` (or from the future:
        the clock went back)."""
        if current is None:
            return True
        if current.summarises(table):
            return False
        return (
            current.table.height != table.height
            or not 0 <= now_ms - current.computed_ms < self.settings.aggregate_refresh_s * 1000
        )

    def _active(self, views: Views, held: list[str]) -> tuple[pl.DataFrame, Matched | None]:
        """Every (rule, entity) whose condition holds now: ACTIVE_SCHEMA; and, when the per-VM
        queries were evaluated ahead against the alert table the tick starts from, how the
        true rows match its alerts (`Matched`).

        Per entity, one query evaluates all of its rules' conditions in a single pass over the
        columns they read, keeps the rows where any holds and makes their alert ids from the
        hash of their identity labels (stored per VM, computed for the small views). Nothing
        else of the view is computed. Rules that read a column needing the VM's link (a lookup
        for every VM) are evaluated apart, so that the others skip it. A per-VM query evaluated
        ahead for this instant (`prepare`) is evaluated only on the rows written since."""
        queries = self._rule_queries(views)
        kept = self._kept_ahead(views, held, queries)
        # Each job: a query and the rules it flags. The queries evaluated ahead are evaluated
        # again only on the rows written since, all of an entity's rules in one query (the
        # split that spares most VMs the link lookup does not pay on a few thousand rows).
        jobs: list[tuple[pl.LazyFrame, tuple[int, ...]]] = []
        whole_per_vm = False
        for i, q in enumerate(queries):
            if i not in kept:
                jobs.append((self._query(q, views, held), q.rules))
                whole_per_vm = whole_per_vm or q.entity in PER_VM
        for entity in PER_VM:
            again = [queries[i] for i in kept if queries[i].entity == entity]
            if not again:
                continue
            rows = next(kept[i] for i in kept if queries[i].entity == entity).rows
            if not rows.is_empty():
                rules = tuple(r for q in again for r in q.rules)
                reads = frozenset().union(*(q.reads for q in again))
                merged = _RuleQuery(entity, rules, reads, any(q.linked for q in again))
                jobs.append((self._query(merged, views, held, rows), rules))
        # The streaming engine: over a million rows it evaluates the conditions in batches
        # that stay in cache, measured 1.5× faster than the in-memory engine (bench/tick); on
        # small fleets, or only the written rows of large ones, its start-up costs more than
        # it saves (~2 ms of 18 at 2,000 VMs).
        vms = max(self.fleet.replication.height, self.fleet.backup.height)
        streaming = whole_per_vm and vms >= STREAMING_FROM_VMS
        engine: Literal["streaming", "in-memory"] = "streaming" if streaming else "in-memory"
        collected = pl.collect_all([job for job, _ in jobs], engine=engine) if jobs else []
        parts = [self._parts(frame, rules) for frame, (_, rules) in zip(collected, jobs) if not frame.is_empty()]
        # One query for all the rules' rows: measured half the cost of a filter per rule.
        fresh = pl.concat(parts).collect() if parts else pl.DataFrame(schema=lifecycle.ACTIVE_SCHEMA)
        if not kept:
            return fresh, None
        ahead = cast(Ahead, self._ahead)
        unwritten = []
        # Alert ids found ahead that no longer count: on rows written since, or by a query not kept.
        dropped = [ahead.parts[i].get_column("alert_id") for i in ahead.parts if i not in kept]
        for i in kept:
            frame, mask = ahead.parts[i], kept[i].mask
            if mask is None:
                unwritten.append(frame)
                continue
            on_written = mask.gather(frame.get_column("row"))
            unwritten.append(frame.filter(~on_written))
            dropped.append(frame.get_column("alert_id").filter(on_written))
        earlier = pl.concat(unwritten)
        active = pl.concat([earlier.drop("known"), fresh])
        if ahead.found is None or ahead.alerts is not self.alerts:
            return active, None
        still = ahead.found
        if dropped:
            gone = pl.concat(dropped)
            if not gone.is_empty():  # a membership test against a few thousand ids
                still = still & ~ahead.alerts.get_column("alert_id").is_in(gone.implode())
        matched = Matched(ahead.alerts, still, earlier.filter(~pl.col("known")).drop("known"), fresh)
        return active, matched

    def _parts(self, found: pl.DataFrame, rules: tuple[int, ...]) -> pl.LazyFrame:
        """ACTIVE_SCHEMA rows of a query's frame (ROW, `__h`, one flag per rule): one per rule
        true on a row, its alert id the row's hash mixed with the rule's salt."""
        return pl.concat(
            [
                # A frame of one rule holds only that rule's rows: nothing to filter.
                (found.lazy() if len(rules) == 1 else found.lazy().filter(pl.col(f"__c{i}"))).select(
                    (pl.col("__h") ^ pl.lit(self._salts[i], dtype=pl.UInt64)).alias("alert_id"),
                    pl.lit(i, dtype=pl.UInt16).alias("rule"),
                    pl.col(ROW).cast(pl.UInt32).alias("row"),
                )
                for i in rules
            ]
        )

    def _kept_ahead(
        self, views: Views, held: list[str], queries: list[_RuleQuery]
    ) -> dict[int, Written]:
        """Per query evaluated ahead for this tick that still applies: the rows written since
        (to evaluate again). It applies when the instant and the held instances are those it
        was evaluated with, the table is the one its journal leads to (so no instance was
        dropped: that replaces the tables), and, for a query reading the VMs' links, the link
        sums and figures are too."""
        ahead = self._ahead
        if ahead is None or ahead.now_ms != views.now_ms or ahead.held != tuple(held):
            return {}
        links_same: bool | None = None
        kept: dict[int, Written] = {}
        for i in ahead.parts:
            query = queries[i]
            journal = self._journals.get(query.entity)
            written = journal.since(per_vm_table(self.fleet, query.entity)) if journal is not None else None
            if written is None:
                continue
            if query.linked:
                if links_same is None:
                    links_same = (
                        ahead.links is not None
                        and views.aggregates is ahead.aggregates
                        and views.link_figures().equals(ahead.links, null_equal=True)
                    )
                if not links_same:
                    continue
            kept[i] = written
        return kept

    def _late_rows(self, now_ms: int) -> Callable[[], LateRows] | None:
        """How the `vm` view of a tick at `now_ms` finds the rows out of policy from those
        `prepare` found (views.late_rows_since: two passes over every VM saved), if it can."""
        ahead, fleet = self._ahead, self.fleet
        if ahead is None or ahead.late is None or ahead.now_ms != now_ms:
            return None
        since = []
        for entity in PER_VM:
            journal = self._journals.get(entity)
            written = journal.since(per_vm_table(fleet, entity)) if journal is not None else None
            if written is None:
                return None
            since.append(written)
        earlier, (rep, bk) = ahead.late, since
        return lambda: late_rows_since(earlier, fleet, now_ms, (rep.rows, bk.rows), (rep.mask, bk.mask))

    def _rule_queries(self, views: Views) -> list[_RuleQuery]:
        """The queries of a tick (made once: a rule's reads may need a view's schema)."""
        if self._queries is None:
            queries = []
            for entity, indices in self._by_entity.items():
                reads = {i: self._reads(views, entity, i) for i in indices}
                linked = [i for i in indices if reads[i] & NEEDS_LINK]
                for group in ([i for i in indices if i not in linked], linked):
                    if group:
                        read = frozenset().union(*(reads[i] for i in group))
                        queries.append(_RuleQuery(entity, tuple(group), read, bool(read & NEEDS_LINK)))
            self._queries = queries
        return self._queries

    def _query(self, query: _RuleQuery, views: Views, held: list[str], rows: pl.Series | None = None) -> pl.LazyFrame:
        """`query` over `views` (only the rows numbered `rows`, if given): ROW, the identity hash
        `__h` and one flag `__c<rule>` per rule, for the rows where any rule holds."""
        hashed = identity(query.entity)
        keys = hashed.meta.root_names()  # the stored hash, or the labels hashed after the filter
        holding = bool(held) and "hci_cluster" in ENTITIES[query.entity].labels
        read = set(keys).union(query.reads, ["hci_cluster"] if holding else [])
        frame = views.lazy(query.entity, read, rows)
        if holding:
            frame = frame.filter(~pl.col("hci_cluster").is_in(held).fill_null(False))
        flags = [f"__c{i}" for i in query.rules]
        conditions = [self.pack.rules[i].condition.fill_null(False).alias(f) for i, f in zip(query.rules, flags)]
        return (
            frame.select(ROW, *keys, *conditions)
            .filter(pl.any_horizontal(flags))
            .select(ROW, hashed.alias("__h"), *flags)
        )

    def _reads(self, views: Views, entity: str, rule: int) -> set[str]:
        """The view columns rule `rule`'s condition reads: none for a constant (`FALSE`, how an
        operator switches a shipped rule off), every column when polars cannot tell, named
        from the view's schema (building a per-VM view costs tens of milliseconds)."""
        columns = _columns(self.pack.rules[rule].condition)
        return columns if columns is not None else set(views.lazy(entity).collect_schema().names()) - {ROW}

    def _remember(self, identities: Identities, active: pl.DataFrame, now_ms: int) -> None:
        """Store the labels of new alerts with an ambiguous key; find the alerts that stopped
        being true at this tick, whose annotations as of the previous tick (their last true
        one) `prepare` renders and stores, after the tick (`_ended`; ~4 ms at a million VMs)."""
        if not identities.odd_labels.is_empty():
            self._labels = pl.concat([self._labels, identities.odd_labels])
        self._labels = compact(self._labels, self.alerts)
        self._store_ended()
        if self._previous is not None:
            views, was_active = self._previous
            # True at the previous tick and not now: the lifecycle left their last true time
            # at that tick's (alerts true now have now's). A filter on one integer column, not
            # a membership test of every alert true before against every alert true now; the
            # latter only when the clock did not move.
            if views.now_ms < now_ms:
                ended = self.alerts.filter(pl.col("last_true_ms") == views.now_ms).get_column("alert_id")
            else:
                still = pl.col("alert_id").is_in(active.get_column("alert_id").implode())
                ended = was_active.filter(~still).get_column("alert_id")
            if not ended.is_empty():
                rows = was_active.filter(pl.col("alert_id").is_in(ended.implode()))
                self._ended = EndedAlerts(self._describer, views, rows)
        self._stored = compact(self._stored, self.alerts)

    def _store_ended(self) -> None:
        """Render and store the annotations of the alerts the last tick ended (`_ended`), if
        `prepare` has not."""
        if self._ended is not None:
            self._stored = pl.concat([self._stored, self._ended.annotations()])
            self._ended = None

    def _identify(self, changes: pl.DataFrame) -> pl.DataFrame:
        """This tick's transitions with the alerts' identity (TickResult.changes)."""
        if changes.is_empty():  # most ticks: no pass over the standing alerts (~1 ms at 170,000)
            return pl.DataFrame(schema={**lifecycle.TRANSITION_SCHEMA, "alert_id": pl.UInt64()})
        ids = changes.get_column("alert_id").implode()
        return changes.join(self.alerts.filter(pl.col("alert_id").is_in(ids)), on="alert_id", how="left").select(
            *lifecycle.TRANSITION_SCHEMA.names(), "alert_id"
        )


class _PhaseClock:
    """Wall time per phase of a tick: where a slow tick spends it (bench/tick prints it)."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.started


def _columns(condition: pl.Expr) -> set[str] | None:
    """The columns a condition reads, or None when polars cannot tell."""
    try:
        return set(condition.meta.root_names())
    except Exception:  # an expression polars cannot introspect: read every column
        return None
