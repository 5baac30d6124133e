"""Alertmanager API v2 sender with Prometheus's re-send semantics (contracts.md §4).

Prometheus (rules/alerting.go `needsSending`, rules/manager.go `sendAlerts`) never sends pending
alerts, sends a firing alert at once and then every `resend_delay` with a lease
`endsAt = now + 4 × max(evaluation interval, resend delay)` so that two lost sends do not
resolve it, and sends a resolve at once and again every `resend_delay` while the engine keeps the
resolved alert (15 minutes). Alertmanager keeps no state across restarts and merges re-posts of
the same label set, so re-sending is both necessary and harmless.

Bookkeeping is per (Alertmanager URL, alert): a replica that is down keeps its alerts "unsent"
and gets them on the next `send`, while the healthy replicas follow the normal schedule.

At fleet scale the engine holds ~200,000 standing alerts of which only a few thousand are due
at a tick, so nothing here loops over the alert table in Python. The bookkeeping of a URL is a
polars frame (alert id, sent_at_ms, fired_at_ms); one join per URL against the tick's table
finds the due rows, and the JSON bodies are built column-wise for the due rows only. That work
runs in a worker thread (polars releases the GIL), so the event loop keeps serving scrapes and
ingest meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import polars as pl

from exporters.snapshot import SelfCounters
from rules import lifecycle
from rules.engine import TickResult

logger = logging.getLogger(__name__)

Alert = dict[str, Any]

# The bookkeeping of one URL: what was last delivered there, per alert.
SENT_SCHEMA = pl.Schema({"key": pl.UInt64(), "sent_at_ms": pl.Int64(), "fired_at_ms": pl.Int64()})

_JSON_HEADERS = {"Content-Type": "application/json"}

# Prometheus label names: their JSON and URL forms are the name itself.
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# urllib.parse.quote_plus of one ASCII character: space → '+', unreserved kept, the rest %XX.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_QUOTE_PLUS = {chr(c): ("+" if c == 0x20 else f"%{c:02X}") for c in range(0x80) if chr(c) not in _UNRESERVED}


def rfc3339(ms: int) -> str:
    """Epoch milliseconds → `2026-11-24T10:00:30.123Z` (UTC)."""
    return datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def _rfc3339_expr(ms: pl.Expr) -> pl.Expr:
    """`rfc3339` column-wise."""
    return pl.from_epoch(ms, time_unit="ms").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")


def alert_hash() -> pl.Expr:
    """A 64-bit identity of (alertname, alert_key), the engine's identity of an alert, for
    tables without the engine's `alert_id`.

    Joining on one integer is several times cheaper than on two strings. Two seeded hashes
    combined: a collision between two of ~200,000 alerts has a probability around 1e-9, and
    `_plan` keeps the bookkeeping bounded should one ever happen."""
    return pl.col("alert_key").hash(0x5EED_A1E7).xor(pl.col("alertname").hash(0x0A1E_27A3)).alias("key")


def due(now_ms: int, resend_ms: int) -> pl.Expr:
    """Whether a row of the tick's table joined with a URL's bookkeeping (`sent_at_ms`,
    `sent_fired_at_ms`) must be sent to that URL: Prometheus's `needsSending`."""
    sent_at = pl.col("sent_at_ms")
    return (
        sent_at.is_null()  # never sent there
        | (pl.col("sent_fired_at_ms") != pl.col("fired_at_ms"))  # a new occurrence (re-fired after a resolve)
        | (pl.col("resolved_at_ms") > sent_at).fill_null(False)  # resolved since: tell it at once
        | (sent_at <= now_ms - resend_ms)
    )


@dataclass
class _Outbox:
    """What one send has for one URL, in send order: POST bodies built so far and the due rows
    not built yet (a URL in a failure streak gets only its first batch built up front: while it
    is down, building all its bodies at every send would be wasted)."""

    # Binary: JSON arrays of at most max_batch alerts. Kept in polars until posted: copying
    # them all out at once would hold the GIL (~100 ms for a flood of 200,000 alerts).
    batches: pl.Series
    keys: pl.Series  # List[UInt64]: the alert keys of each batch
    pending: pl.DataFrame  # due rows after the built batches


@dataclass(frozen=True)
class _Plan:
    """One send, worked out off the event loop."""

    now_ms: int
    # Per URL: the tick's sendable rows with that URL's bookkeeping joined on (key, fired_at_ms,
    # sent_at_ms, sent_fired_at_ms). The new bookkeeping is rebuilt from it, which also forgets
    # alerts gone from the table.
    joined: dict[str, pl.DataFrame]
    outboxes: dict[str, _Outbox]


class AlertmanagerSender:
    """Posts the current alert state to every configured Alertmanager.

    `send` must not be called concurrently with itself (a lock enforces it); it never raises
    on delivery failure — failures are logged, counted and retried at the next call.
    """

    def __init__(
        self,
        urls: Sequence[str],
        session: aiohttp.ClientSession,
        counters: SelfCounters,
        evaluation_interval_s: float,
        generator_url_base: str,
        resend_delay_s: float = 60.0,
        timeout_s: float = 10.0,
        max_batch: int = 1000,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._urls = list(dict.fromkeys(u.rstrip("/") for u in urls))  # a URL listed twice is one replica
        self._session = session
        self._counters = counters
        self._resend_ms = int(resend_delay_s * 1000)
        self._lease_ms = int(4 * max(evaluation_interval_s, resend_delay_s) * 1000)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._generator_base = generator_url_base.rstrip("/")
        self._max_batch = max_batch
        self._sent: dict[str, pl.DataFrame] = {url: pl.DataFrame(schema=SENT_SCHEMA) for url in self._urls}
        self._failing: set[str] = set()  # URLs in a failure streak: logged once per streak
        self._lock = asyncio.Lock()

    async def send(self, result: TickResult) -> None:
        """Send what needs sending for the alert table of `result`, at `result.now_ms`."""
        async with self._lock:
            plan = await asyncio.to_thread(self._plan, result)
            delivered: dict[str, list[pl.Series]] = {url: [] for url in self._urls}
            try:
                await asyncio.gather(
                    *(self._send_to(url, plan.outboxes[url], result, delivered[url]) for url in self._urls)
                )
            except BaseException:
                # Cancelled (shutdown) or an unexpected error: keep what was delivered so far, as
                # the lock is about to be released. Rare, so blocking the loop briefly is fine.
                self._sent = self._record(plan, delivered)
                raise
            self._sent = await asyncio.to_thread(self._record, plan, delivered)

    # --- off the event loop -------------------------------------------------------------------

    def _plan(self, result: TickResult) -> _Plan:
        now_ms = result.now_ms
        rows = self._sendable(result.alerts)
        joined = self._join_bookkeeping(rows)
        due_rows = {url: frame.filter(due(now_ms, self._resend_ms)) for url, frame in joined.items()}
        if not due_rows:  # no URL configured
            return _Plan(now_ms, {}, {})
        built = {
            url: frame.head(self._max_batch) if url in self._failing else frame for url, frame in due_rows.items()
        }
        # Bodies once for what any URL needs: most of a large table is not due at a tick.
        wanted = pl.concat([frame.drop("sent_at_ms", "sent_fired_at_ms") for frame in built.values()])
        if len(built) > 1:
            wanted = wanted.unique("key", keep="first", maintain_order=True)
        bodies = self._bodies(result, wanted, now_ms)
        outboxes = {}
        for url, frame in due_rows.items():
            batches, keys = self._batches(built[url].select("key"), bodies)
            outboxes[url] = _Outbox(batches, keys, frame.slice(built[url].height))
        return _Plan(now_ms, joined, outboxes)

    def _sendable(self, alerts: pl.DataFrame) -> pl.DataFrame:
        """The firing and resolved rows, keyed; pending alerts are never sent."""
        # The engine's own 64-bit alert id when its table has one (`with_details` then joins on
        # it too); otherwise a hash of the alert's identity.
        ids = ["alert_id"] if "alert_id" in alerts.columns else []
        key = pl.col("alert_id").alias("key") if ids else alert_hash()
        rows = alerts.lazy().filter(pl.col("state") != lifecycle.PENDING)
        missing = rows.filter(pl.col("fired_at_ms").is_null()).select("alertname", "alert_key").collect()
        if not missing.is_empty():  # defensive: a firing or resolved alert always has fired_at
            logger.warning(
                "%d alerts have no fired_at and are not sent, e.g. %s %r", missing.height, *missing.row(0)
            )
        return (
            rows.filter(pl.col("fired_at_ms").is_not_null())
            .select(key, *ids, "alertname", "alert_key", "state", "fired_at_ms", "resolved_at_ms")
            .collect()
        )

    def _join_bookkeeping(self, rows: pl.DataFrame) -> dict[str, pl.DataFrame]:
        def join(sent: pl.DataFrame) -> pl.LazyFrame:
            renamed = sent.lazy().rename({"fired_at_ms": "sent_fired_at_ms"})
            return rows.lazy().join(renamed, on="key", how="left")

        frames = dict(zip(self._urls, pl.collect_all([join(self._sent[url]) for url in self._urls]), strict=True))
        for url, frame in frames.items():
            if frame.height != rows.height:
                # Only after a hash collision (two alerts, one key): without this the bookkeeping
                # would double at every send.
                frames[url] = join(self._sent[url].unique("key")).collect()
        return frames

    def _bodies(self, result: TickResult, wanted: pl.DataFrame, now_ms: int) -> pl.DataFrame:
        """(key, body) for the `wanted` rows: each body one alert as JSON text. Rows without
        labels (an alert the engine cannot describe) get none and are not sent."""
        rows = result.with_details(wanted).filter(pl.col("labels").is_not_null())
        return alert_bodies(rows, now_ms, self._lease_ms, self._generator_base)

    def _batches(self, due_keys: pl.DataFrame, bodies: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
        """The POST bodies for `due_keys` in batches of max_batch, and the keys of each batch."""
        chunks = (
            due_keys.lazy()
            .join(bodies.lazy(), on="key", how="inner")
            .with_row_index("i")
            .group_by(pl.col("i") // self._max_batch, maintain_order=True)
            .agg(
                pl.concat_str(pl.lit("["), pl.col("body").str.join(","), pl.lit("]")).cast(pl.Binary).alias("payload"),
                pl.col("key"),
            )
            .collect()
        )
        return chunks["payload"], chunks["key"]

    def _build_rest(self, outbox: _Outbox, result: TickResult) -> None:
        """Build the batches of `outbox.pending` (a URL that was failing works again)."""
        pending = outbox.pending.drop("sent_at_ms", "sent_fired_at_ms")
        batches, keys = self._batches(pending.select("key"), self._bodies(result, pending, result.now_ms))
        outbox.batches = pl.concat([outbox.batches, batches])
        outbox.keys = pl.concat([outbox.keys, keys])
        outbox.pending = outbox.pending.clear()

    def _record(self, plan: _Plan, delivered: dict[str, list[pl.Series]]) -> dict[str, pl.DataFrame]:
        """The bookkeeping after this send: `delivered[url]` are the keys of the batches that URL
        accepted; alerts no longer in the table are dropped."""
        frames = []
        for url in self._urls:
            sent = pl.concat(delivered[url]) if delivered[url] else None
            hit = pl.col("key").is_in(sent.implode()) if sent is not None else pl.lit(False)
            frames.append(
                plan.joined[url]
                .lazy()
                .select(
                    "key",
                    pl.when(hit).then(pl.lit(plan.now_ms, dtype=pl.Int64)).otherwise("sent_at_ms").alias("sent_at_ms"),
                    pl.when(hit).then("fired_at_ms").otherwise("sent_fired_at_ms").alias("fired_at_ms"),
                )
                .filter(pl.col("sent_at_ms").is_not_null())
            )
        return dict(zip(self._urls, pl.collect_all(frames), strict=True))

    # --- on the event loop --------------------------------------------------------------------

    async def _send_to(self, url: str, outbox: _Outbox, result: TickResult, delivered: list[pl.Series]) -> None:
        index = 0
        while True:
            if index == len(outbox.batches):
                if outbox.pending.is_empty():
                    return
                await asyncio.to_thread(self._build_rest, outbox, result)
            keys: pl.Series = outbox.keys[index]
            if not await self._post(url, outbox.batches[index], len(keys)):
                # The rest stays unsent too: the next send retries all of it.
                return
            delivered.append(keys)
            index += 1

    async def _post(self, url: str, payload: bytes, n: int) -> bool:
        error: str | None = None
        try:
            async with self._session.post(
                f"{url}/api/v2/alerts", data=payload, headers=_JSON_HEADERS, timeout=self._timeout
            ) as response:
                if not 200 <= response.status < 300:
                    # Alertmanager's body says why (e.g. "start time must be before end time").
                    error = f"HTTP {response.status}: {(await response.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        if error is not None:
            self._counters.count_notification(url, ok=False, n=n)
            if url not in self._failing:
                self._failing.add(url)
                logger.warning(
                    "posting %d alerts to Alertmanager %s failed (%s); retrying at every send, "
                    "logged again only after it recovers",
                    n,
                    url,
                    error,
                )
            return False
        self._counters.count_notification(url, ok=True, n=n)
        if url in self._failing:
            self._failing.discard(url)
            logger.info("posting alerts to Alertmanager %s works again", url)
        return True


# --- alert bodies ----------------------------------------------------------------------------
# `reference_body` is the definition; `alert_bodies` gives the same JSON values column-wise for
# the shape the engine writes (`struct.json_encode` of string columns) and uses the reference
# for any other row, so an unexpected shape costs time, never correctness.


def reference_body(
    labels_json: str,
    annotations_json: str | None,
    state: str,
    fired_at_ms: int,
    resolved_at_ms: int | None,
    now_ms: int,
    lease_ms: int,
    generator_base: str,
) -> Alert:
    """The body of one alert, one at a time in Python."""
    # Alertmanager drops empty label values anyway; dropping them here keeps the
    # generatorURL and the stored label set identical.
    labels = {k: str(v) for k, v in json.loads(labels_json).items() if v not in ("", None)}
    annotations = {k: str(v) for k, v in json.loads(annotations_json or "{}").items() if v is not None}
    if state == lifecycle.RESOLVED and resolved_at_ms is not None:
        ends_at = resolved_at_ms
    else:
        ends_at = now_ms + lease_ms
    query = [("alertname", labels.get("alertname", ""))] + sorted(
        (k, v) for k, v in labels.items() if k != "alertname"
    )
    return {
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(fired_at_ms),
        "endsAt": rfc3339(ends_at),
        "generatorURL": f"{generator_base}/api/v1/alerts?{urllib.parse.urlencode(query)}",
    }


def alert_bodies(rows: pl.DataFrame, now_ms: int, lease_ms: int, generator_base: str) -> pl.DataFrame:
    """(key, body) for `rows` (key, alertname, state, fired_at_ms, resolved_at_ms, labels,
    annotations): `json.dumps(reference_body(...))` of each row, as an equal JSON value."""
    fast: list[pl.LazyFrame] = []
    slow: list[pl.LazyFrame] = []
    plain: list[str] = []
    # One rule's labels are one struct in the engine: decode them per alertname, with the
    # label names of the rule's first row.
    firsts = rows.filter(pl.col("alertname").is_not_null()).unique("alertname", keep="first")
    for alertname, labels_json in firsts.select("alertname", "labels").iter_rows():
        names = _label_names(labels_json)
        if names is None:
            continue
        plain.append(alertname)
        ok, query = _label_exprs(names)
        struct = pl.Struct({n: pl.String for n in names})
        columns = [f"__label{i}" for i in range(len(names))]
        decoded = (
            rows.lazy()
            .filter(pl.col("alertname") == alertname)
            .with_columns(pl.col("labels").str.json_decode(struct).struct.rename_fields(columns).alias("__labels"))
            .unnest("__labels")
            .with_columns((ok & _string_valued(pl.col("annotations"))).alias("__ok"))
        )
        body = _body_expr(query, now_ms, lease_ms, generator_base)
        fast.append(decoded.filter("__ok").select("key", body.alias("body")))
        slow.append(decoded.filter(~pl.col("__ok")).select(rows.columns))
    slow.append(rows.lazy().filter(~pl.col("alertname").is_in(plain).fill_null(False)))
    try:
        frames = pl.collect_all([*fast, *slow])
    except pl.exceptions.PolarsError:  # a row that is not JSON: the reference reports it
        frames, fast = [rows], []
    fallback = pl.concat(frames[len(fast) :])
    texts = [
        json.dumps(reference_body(labels, annotations, state, fired_at, resolved_at, now_ms, lease_ms, generator_base))
        for labels, annotations, state, fired_at, resolved_at in fallback.select(
            "labels", "annotations", "state", "fired_at_ms", "resolved_at_ms"
        ).iter_rows()
    ]
    reference = fallback.select("key", pl.Series("body", texts, dtype=pl.String))
    return pl.concat([*frames[: len(fast)], reference])


def _label_names(labels_json: str) -> list[str] | None:
    """The label names of a labels JSON object of strings under Prometheus label names, else
    None (the rows of its rule then take the reference path)."""
    try:
        labels = json.loads(labels_json)
    except ValueError:
        return None
    if not isinstance(labels, dict) or not labels:
        return None
    if not all(isinstance(v, str) for v in labels.values()) or not all(_LABEL_NAME.fullmatch(n) for n in labels):
        return None
    return list(labels)


def _label_exprs(names: list[str]) -> tuple[pl.Expr, pl.Expr]:
    """Over the labels decoded into columns `__label0`, `__label1`, … by `names`: whether a row
    can be built column-wise, and its generatorURL query."""
    columns = [pl.col(f"__label{i}") for i in range(len(names))]
    text = pl.col("labels")
    # Re-encoding the decoded values gives the text back only if the row has exactly these
    # labels, all strings: then the values are exact and the text can be copied into the body.
    # No empty values (the reference drops them; rare, so those rows take its path) and ASCII
    # only, because the URL encoding below maps single ASCII characters.
    ok = (
        (pl.struct([c.alias(n) for c, n in zip(columns, names, strict=True)]).struct.json_encode() == text)
        & pl.all_horizontal([c != "" for c in columns])
        & (text.str.len_bytes() == text.str.len_chars())
    ).fill_null(False)
    # urlencode: alertname first (empty if missing), then the other labels by name.
    by_name = dict(zip(names, columns, strict=True))
    parts = [pl.lit("alertname=")]
    if "alertname" in by_name:
        parts.append(by_name["alertname"].str.replace_many(_QUOTE_PLUS))
    for name in sorted(n for n in names if n != "alertname"):
        parts += [pl.lit(f"&{name}="), by_name[name].str.replace_many(_QUOTE_PLUS)]
    return ok, pl.concat_str(parts)


def _string_valued(text: pl.Expr) -> pl.Expr:
    """Whether a JSON object's text has only string values, so that it can be copied as is.

    A value that is not a string follows a key's `":` directly (the regex), unless whitespace
    separates the tokens, which the other checks refuse: a space or tab after a key's quote or
    after the colon, a raw newline anywhere. What `struct.json_encode` writes has none. An
    escaped quote in a value can only make this say no (the row then takes the reference)."""
    return (
        text.str.starts_with("{")
        & ~text.str.contains('":[^"]')
        & ~text.str.contains('" ', literal=True)
        & ~text.str.contains("[\t\n\r]")
    ).fill_null(False)


def _body_expr(query: pl.Expr, now_ms: int, lease_ms: int, generator_base: str) -> pl.Expr:
    resolved = (pl.col("state") == lifecycle.RESOLVED) & pl.col("resolved_at_ms").is_not_null()
    lease_end = pl.lit(rfc3339(now_ms + lease_ms))
    ends_at = pl.when(resolved).then(_rfc3339_expr(pl.col("resolved_at_ms"))).otherwise(lease_end)
    generator = json.dumps(f"{generator_base}/api/v1/alerts?")[:-1]  # a JSON string, left open
    return pl.concat_str(
        pl.lit('{"labels":'),
        pl.col("labels"),
        pl.lit(',"annotations":'),
        pl.col("annotations"),
        pl.lit(',"startsAt":"'),
        _rfc3339_expr(pl.col("fired_at_ms")),
        pl.lit('","endsAt":"'),
        ends_at,
        pl.lit(f'","generatorURL":{generator}'),
        query,  # only unreserved characters, '%', '+', '=' and '&': nothing to escape in JSON
        pl.lit('"}'),
    )
