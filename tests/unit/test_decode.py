"""Bulk decoding: every payload ends up valid or rejected with the right reason."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.contracts import FIELDS, MODELS, SCHEMAS, Stream
from ingest import decode
from ingest.decode import DecodeLimits, decode_batch

NOW = 1_795_600_000_000  # 2026-11-25T09:46:40Z

GOOD_REPLICATION: dict[str, Any] = {
    "event_id": "e1",
    "ts": "2026-11-25T09:46:30.123Z",
    "vm_id": "vm-1",
    "cluster_id": "hci-1",
    "target_id": "hci-2",
    "technology": "hyperv_replica",
    "kind": "cycle_completed",
    "frequency_s": 300,
    "recovery_point_ts": "2026-11-25T09:46:00+01:00",
    "bytes": 1024,
    "pending_bytes": 0,
}


def payload(**changes: Any) -> bytes:
    record = {**GOOD_REPLICATION, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


BAD_CASES = [
    (payload(vm_id=...), "missing_field", "vm_id"),
    (payload(vm_id=""), "missing_field", "vm_id"),
    (payload(frequency_s=60), "unknown_enum", "frequency_s"),
    (payload(technology="vmware"), "unknown_enum", "technology"),
    (payload(kind="exploded"), "unknown_enum", "kind"),
    (payload(bytes=-1), "negative_value", "bytes"),
    (payload(bytes=1.5), "wrong_type", "bytes"),
    (payload(bytes=True), "wrong_type", "bytes"),
    (payload(churn_bytes_per_s="fast"), "wrong_type", "churn_bytes_per_s"),
    (payload(ts="yesterday"), "bad_timestamp", "ts"),
    (payload(ts="2026-11-25T09:46:30"), "bad_timestamp", "ts"),  # no offset
    (payload(ts=NOW + 3_600_000), "future_timestamp", "ts"),
    (payload(recovery_point_ts=...), "missing_field", "recovery_point_ts"),
    (payload(event_id="x" * 129), "invalid_value", "event_id"),
    (payload(vm_id={"id": 1}), "wrong_type", "vm_id"),
    (b"not json", "not_json", ""),
    (b"\xff\xfe{}", "not_utf8", ""),
    (b"[1, 2]", "not_object", ""),
    (b"", "not_json", ""),
    # Python's json reads these; JSON has none of them, and polars refuses them.
    (payload(bytes=...).replace(b"}", b', "bytes": NaN}'), "not_json", "NaN"),
    (payload(bytes=...).replace(b"}", b', "bytes": Infinity}'), "not_json", "Infinity"),
    (payload(churn_bytes_per_s=...).replace(b"}", b', "churn_bytes_per_s": -Infinity}'), "not_json", "Infinity"),
    (payload(bytes=...).replace(b"}", b', "bytes": 1e400}'), "invalid_value", "out of range"),
    (b'{"event_id": "e1",' + b" " * 70_000 + b"}", "too_large", ""),
]


@pytest.mark.parametrize(("raw", "reason", "field"), BAD_CASES)
def test_each_kind_of_bad_record_is_rejected_with_its_reason(raw: bytes, reason: str, field: str) -> None:
    decoded = decode_batch(Stream.REPLICATION, [payload(), raw, payload(event_id="e2")], NOW)
    assert decoded.valid.get_column("event_id").to_list() == ["e1", "e2"]
    assert decoded.rejects.height == 1
    row = decoded.rejects.row(0, named=True)
    assert row["index"] == 1
    assert row["reason"] == reason
    assert field in row["detail"]


def test_valid_records_are_typed_per_the_contract_schema() -> None:
    decoded = decode_batch(Stream.REPLICATION, [payload(), payload(event_id="e2", ts=NOW - 1000)], NOW)
    assert decoded.rejects.is_empty()
    assert decoded.valid.schema == SCHEMAS[Stream.REPLICATION]
    first, second = decoded.valid.iter_rows(named=True)
    assert first["ts"].isoformat() == "2026-11-25T09:46:30.123000+00:00"
    assert first["recovery_point_ts"].isoformat() == "2026-11-25T08:46:00+00:00"  # offset → UTC
    assert int(second["ts"].timestamp() * 1000) == NOW - 1000  # epoch milliseconds
    assert first["frequency_s"] == 300


def test_unknown_fields_are_ignored_and_pretty_printed_json_is_accepted() -> None:
    pretty = json.dumps({**GOOD_REPLICATION, "event_id": "p", "future_field": {"x": 1}}, indent=2).encode()
    decoded = decode_batch(Stream.REPLICATION, [pretty, payload()], NOW)
    assert decoded.rejects.is_empty()
    assert decoded.valid.get_column("event_id").to_list() == ["p", "e1"]


def test_a_batch_of_only_bad_records_yields_no_valid_rows() -> None:
    decoded = decode_batch(Stream.BACKUP, [b"nope", b"{}"], NOW)
    assert decoded.valid.is_empty()
    assert decoded.valid.schema == SCHEMAS[Stream.BACKUP]
    assert decoded.rejects.get_column("reason").to_list() == ["not_json", "missing_field"]


def test_heartbeat_storage_list_is_decoded_and_a_malformed_one_rejected() -> None:
    good = {"event_id": "h1", "ts": NOW, "cluster_id": "c", "node_id": "n1", "state": "up",
            "storage": [{"path_id": "csv1", "capacity_bytes": 10, "iops_used": 5.5, "online": True}]}
    bad = {**good, "event_id": "h2", "storage": [{"path_id": ["not", "a", "string"]}]}
    decoded = decode_batch(Stream.HEARTBEAT, [json.dumps(good).encode(), json.dumps(bad).encode()], NOW)
    assert decoded.valid.get_column("storage").to_list() == [
        [{"path_id": "csv1", "capacity_bytes": 10, "free_bytes": None, "iops_capacity": None, "iops_used": 5.5, "online": True}]
    ]
    assert decoded.rejects.get_column("detail").to_list() == ["wrong_type: storage must be a list of storage path objects"]


def test_backup_recovery_point_required_only_for_kinds_that_create_one() -> None:
    base = {"event_id": "b", "ts": NOW, "vm_id": "v", "cluster_id": "c", "job_id": "j", "product": "mabs", "level": "host"}
    records = [{**base, "event_id": "b1", "kind": "failed"}, {**base, "event_id": "b2", "kind": "succeeded"}]
    decoded = decode_batch(Stream.BACKUP, [json.dumps(r).encode() for r in records], NOW)
    assert decoded.valid.get_column("event_id").to_list() == ["b1"]
    assert decoded.rejects.get_column("detail").to_list() == ["missing_field: recovery_point_ts (required for this kind)"]


@pytest.mark.parametrize("stream", list(Stream))
def test_field_table_matches_the_pydantic_models(stream: Stream) -> None:
    model = MODELS[stream]
    assert [f.name for f in FIELDS[stream]] == list(model.model_fields)
    required = {f.name for f in FIELDS[stream] if f.required}
    assert required == {name for name, info in model.model_fields.items() if info.is_required()}


# Values drawn around the edges of each field's type; the verdict of the bulk decoder must
# agree with the pydantic model, which is the readable statement of the contract.
_values = st.one_of(
    st.none(),
    st.integers(min_value=-5, max_value=2_000_000_000_000),
    st.sampled_from(["", "x", "up", "down", "asr", "hyperv_replica", "cycle_completed", "paused", "mabs", "host",
                     "succeeded", "failed", "2026-11-25T09:00:00Z", "2026-11-25T09:00:00", "garbage"]),
    st.sampled_from([30, 300, 900, 60]),
)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), stream=st.sampled_from(list(Stream)))
def test_bulk_decoder_agrees_with_pydantic(data: st.DataObject, stream: Stream) -> None:
    record: dict[str, Any] = {}
    for spec in FIELDS[stream]:
        if spec.kind == "storage":
            continue
        value = data.draw(_values, label=spec.name)
        if value is not None:
            record[spec.name] = value
    raw = json.dumps(record).encode()
    decoded = decode_batch(stream, [raw], NOW, DecodeLimits())
    try:
        MODELS[stream].model_validate_json(raw)
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
    # Pydantic has no notion of "too far in the future": exclude that one reason.
    future = decoded.rejects.filter(pl.col("reason") == "future_timestamp").height > 0
    if not future:
        assert (decoded.valid.height == 1) == pydantic_ok, (record, decoded.rejects.to_dicts())


def test_a_number_or_boolean_where_text_is_due_is_rejected_not_converted() -> None:
    # read_ndjson would read 42 into a text column as "42"; the contract says text.
    good = {"event_id": "h1", "ts": NOW, "cluster_id": "c1", "node_id": "n1", "state": "up"}
    records = [good, {**good, "event_id": "h2", "node_id": 42}, {**good, "event_id": "h3", "cluster_id": True},
               {**good, "event_id": "007"}]  # a text id that reads like a number is fine
    decoded = decode_batch(Stream.HEARTBEAT, [json.dumps(r).encode() for r in records], NOW)
    assert decoded.valid.get_column("event_id").to_list() == ["h1", "007"]
    assert decoded.rejects.select("index", "detail").rows() == [
        (1, "wrong_type: node_id must be a string"),
        (2, "wrong_type: cluster_id must be a string"),
    ]


# --- the typed read: numbers read as numbers, and what falls back to the text read -------------


def _spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each read of the decoder, whether it read numbers typed."""
    reads: list[bool] = []
    read_columns = decode._read_columns

    def spy(stream: Stream, lines: bytes, typed: bool) -> pl.DataFrame:
        reads.append(typed)
        return read_columns(stream, lines, typed)

    monkeypatch.setattr(decode, "_read_columns", spy)
    return reads


def test_a_clean_batch_is_read_once_with_numbers_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _spy_reads(monkeypatch)
    records = [payload(), payload(event_id="e2", bytes=2**62, churn_bytes_per_s=7, pending_bytes=...)]
    decoded = decode_batch(Stream.REPLICATION, records, NOW)
    assert reads == [True]
    assert decoded.rejects.is_empty()
    assert decoded.valid.schema == SCHEMAS[Stream.REPLICATION]
    rows = decoded.valid.select("bytes", "pending_bytes", "churn_bytes_per_s").rows()
    assert rows == [(1024, 0, None), (2**62, None, 7.0)]  # an integer where a float is due: a float


@pytest.mark.parametrize(
    ("field", "value", "word"),
    [
        ("bytes", 1.5, "an integer"),
        ("bytes", True, "an integer"),
        ("bytes", "12x", "an integer"),
        ("bytes", [1], "an integer"),
        ("bytes", {"n": 1}, "an integer"),
        ("pending_bytes", 2**63, "an integer"),  # beyond Int64
        ("churn_bytes_per_s", False, "a number"),
        ("churn_bytes_per_s", "fast", "a number"),
        ("duration_ms", "", "an integer"),
    ],
)
def test_a_wrong_type_among_typed_numbers_is_rejected_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, field: str, value: Any, word: str
) -> None:
    # The typed read refuses the whole batch over one such value; the text read then rejects
    # only that record, with the field named, and keeps the others.
    reads = _spy_reads(monkeypatch)
    records = [payload(), payload(event_id="e2", **{field: value}), payload(event_id="e3", bytes=7)]
    decoded = decode_batch(Stream.REPLICATION, records, NOW)
    assert reads == [True, False]
    assert decoded.valid.schema == SCHEMAS[Stream.REPLICATION]
    assert decoded.valid.get_column("event_id").to_list() == ["e1", "e3"]
    assert decoded.valid.get_column("bytes").to_list() == [1024, 7]
    assert decoded.rejects.rows() == [(1, "wrong_type", f"wrong_type: {field} must be {word}")]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("bytes", 1.0, 1), ("bytes", 1e3, 1000), ("frequency_s", "300", 300), ("pending_bytes", "12", 12)],
)
def test_numbers_the_text_read_accepts_are_still_accepted(field: str, value: Any, expected: int) -> None:
    # 1.0 and 1e3 are integers by value and "300" reads as 300: the typed read refuses them, so
    # their batch is read as text, where they have always been accepted.
    decoded = decode_batch(Stream.REPLICATION, [payload(event_id="e0"), payload(**{field: value})], NOW)
    assert decoded.rejects.is_empty()
    assert decoded.valid.get_column(field).to_list() == [GOOD_REPLICATION.get(field), expected]


def test_unknown_frequency_and_negative_values_are_checked_on_typed_numbers() -> None:
    records = [payload(), payload(event_id="e2", frequency_s=60), payload(event_id="e3", pending_bytes=-5)]
    decoded = decode_batch(Stream.REPLICATION, records, NOW)
    assert decoded.valid.get_column("event_id").to_list() == ["e1"]
    assert decoded.rejects.select("index", "reason").rows() == [(1, "unknown_enum"), (2, "negative_value")]


def test_heartbeat_numbers_are_typed_and_a_wrong_one_rejected() -> None:
    good = {"event_id": "h1", "ts": NOW, "cluster_id": "c", "node_id": "n1", "state": "up", "memory_bytes": 5,
            "cpu_cores": 4, "iops_used": 2.5, "storage": [{"path_id": "csv1", "online": True}]}
    records = [
        good,
        {**good, "event_id": "h2", "cpu_used_ratio": "high"},
        {**good, "event_id": "h3", "memory_bytes": 5.5},
    ]
    decoded = decode_batch(Stream.HEARTBEAT, [json.dumps(r).encode() for r in records], NOW)
    assert decoded.valid.select("event_id", "memory_bytes", "cpu_cores", "iops_used").rows() == [("h1", 5, 4.0, 2.5)]
    assert decoded.rejects.select("index", "detail").rows() == [
        (1, "wrong_type: cpu_used_ratio must be a number"),
        (2, "wrong_type: memory_bytes must be an integer"),
    ]


# --- timestamps: the common spelling the cheap way, any other in full --------------------------


def test_a_batch_mixing_timestamp_spellings_parses_each_right() -> None:
    records = [
        payload(event_id="z", ts="2026-11-25T09:46:30.123Z"),
        payload(event_id="offset", ts="2026-11-25T10:46:30.5+01:00", recovery_point_ts="2026-11-25T09:46:00+00:30"),
        payload(event_id="no-fraction", ts="2026-11-25T09:46:30Z"),
        payload(event_id="micro", ts="2026-11-25T09:46:30.123456Z"),
    ]
    decoded = decode_batch(Stream.REPLICATION, records, NOW)
    assert decoded.rejects.is_empty()
    rows = decoded.valid.iter_rows(named=True)
    got = {r["event_id"]: (r["ts"].isoformat(), r["recovery_point_ts"].isoformat()) for r in rows}
    assert got == {
        "z": ("2026-11-25T09:46:30.123000+00:00", "2026-11-25T08:46:00+00:00"),
        "offset": ("2026-11-25T09:46:30.500000+00:00", "2026-11-25T09:16:00+00:00"),
        "no-fraction": ("2026-11-25T09:46:30+00:00", "2026-11-25T08:46:00+00:00"),
        "micro": ("2026-11-25T09:46:30.123000+00:00", "2026-11-25T08:46:00+00:00"),  # truncated to ms
    }


def test_epoch_milliseconds_mixed_with_rfc3339_and_bad_timestamps() -> None:
    records = [
        payload(),
        payload(event_id="e2", ts=NOW - 1000),
        payload(event_id="e3", ts="yesterday"),
        payload(event_id="e4", recovery_point_ts=str(NOW - 2000)),  # epoch as text is epoch too
        payload(event_id="e5", ts=NOW + 3_600_000),
    ]
    decoded = decode_batch(Stream.REPLICATION, records, NOW)
    assert decoded.valid.schema == SCHEMAS[Stream.REPLICATION]
    valid = {r["event_id"]: r for r in decoded.valid.iter_rows(named=True)}
    assert sorted(valid) == ["e1", "e2", "e4"]
    assert valid["e1"]["ts"].isoformat() == "2026-11-25T09:46:30.123000+00:00"
    assert int(valid["e2"]["ts"].timestamp() * 1000) == NOW - 1000
    assert int(valid["e4"]["recovery_point_ts"].timestamp() * 1000) == NOW - 2000
    assert decoded.rejects.select("index", "reason").rows() == [(2, "bad_timestamp"), (4, "future_timestamp")]


@pytest.mark.parametrize(
    "ts",
    [
        "2024-02-29T23:59:59.999Z",
        "2026-02-29T00:00:00.000Z",  # no such day
        "2026-11-25T24:00:00.000Z",
        "2026-11-25T09:45:60.000Z",  # a leap second: left to the full parse
        "0001-01-01T00:00:00.000Z",
        "2026-11-25T09:46:30.123+00:00",
        "2026-11-25t09:46:30.123z",
        "2026-11-25T09:46:30.12Z",
    ],
)
def test_the_common_timestamp_spelling_parses_as_rfc3339_does(ts: str) -> None:
    # The first timestamp of the batch has the common spelling, so the column is parsed the
    # cheap way first; whatever that leaves is parsed in full. Either way: as `%+` parses it.
    decoded = decode_batch(Stream.REPLICATION, [payload(), payload(event_id="e2", ts=ts)], NOW)
    expected = pl.Series([ts]).str.to_datetime(format="%+", time_unit="ms", time_zone="UTC", strict=False)[0]
    if expected is None:
        assert decoded.rejects.select("index", "reason").rows() == [(1, "bad_timestamp")]
    else:
        assert decoded.rejects.is_empty()
        assert decoded.valid.get_column("ts").to_list()[1] == expected


def test_a_column_starting_with_another_spelling_parses_common_ones_too() -> None:
    records = [
        payload(event_id="e1", ts="2026-11-25T10:46:30+01:00"),
        payload(event_id="e2", ts="2026-11-25T09:46:31.250Z"),
        payload(event_id="e3", ts=NOW - 500),
    ]
    decoded = decode_batch(Stream.REPLICATION, records, NOW)
    assert decoded.rejects.is_empty()
    assert [t.isoformat() for t in decoded.valid.get_column("ts")] == [
        "2026-11-25T09:46:30+00:00",
        "2026-11-25T09:46:31.250000+00:00",
        "2026-11-25T09:46:39.500000+00:00",
    ]


# --- the checks: only those that fail somewhere are evaluated per record -----------------------


def test_a_record_failing_several_checks_reports_the_first_in_field_order() -> None:
    records = [
        payload(event_id="e1", vm_id=..., bytes=-1),  # missing vm_id comes before bytes
        payload(event_id="e2", bytes=-1),
        payload(event_id="e3", kind="exploded", ts="nope"),  # ts comes before kind
        payload(event_id="e4"),
    ]
    decoded = decode_batch(Stream.REPLICATION, records, NOW)
    assert decoded.valid.get_column("event_id").to_list() == ["e4"]
    assert decoded.rejects.select("index", "reason").rows() == [
        (0, "missing_field"), (1, "negative_value"), (2, "bad_timestamp")
    ]
    assert "vm_id" in decoded.rejects.get_column("detail")[0]


def test_text_fields_that_only_look_like_numbers_or_booleans_stay_valid() -> None:
    # Values that sort before ":" or read "true"/"false" make the decoder look closer; as
    # strings they are fine, even next to real booleans elsewhere in the batch.
    good = {"event_id": "-1", "ts": NOW, "cluster_id": "true", "node_id": "007", "state": "up",
            "storage": [{"path_id": "false", "online": False}]}
    records = [json.dumps(good).encode(), json.dumps({**good, "event_id": "2"}).encode()]
    decoded = decode_batch(Stream.HEARTBEAT, records, NOW)
    assert decoded.rejects.is_empty()
    rows = decoded.valid.select("event_id", "cluster_id", "node_id").rows()
    assert rows == [("-1", "true", "007"), ("2", "true", "007")]


@pytest.mark.parametrize("value", [[1, 2], {"id": 1}, [], {}])
def test_a_nested_value_in_an_id_is_rejected_in_a_typed_batch(value: Any) -> None:
    decoded = decode_batch(Stream.REPLICATION, [payload(), payload(event_id="e2", target_id=value)], NOW)
    assert decoded.valid.get_column("event_id").to_list() == ["e1"]
    assert decoded.rejects.rows() == [(1, "wrong_type", "wrong_type: target_id must be a string")]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (payload(event_id="x") + b"\n" + payload(event_id="y"), "not_json"),  # two objects, each ending "}"
        (b'{"event_id": "x",\n"ts": 1}', "missing_field"),  # its lines are no JSON on their own
        (json.dumps({**GOOD_REPLICATION, "event_id": "x"}, indent=1).encode() + b"\n", ""),  # trailing newline
        (payload(event_id="x") + b"\n  ", ""),
    ],
)
def test_a_payload_with_a_raw_newline_is_decoded_as_a_whole(raw: bytes, reason: str) -> None:
    # Without a count of newlines, the row count of the read (one row per line) is what
    # keeps a payload spanning lines from passing for one or two records.
    decoded = decode_batch(Stream.REPLICATION, [payload(), raw, payload(event_id="e2")], NOW)
    if reason:
        assert decoded.valid.get_column("event_id").to_list() == ["e1", "e2"]
        assert decoded.rejects.select("index", "reason").rows() == [(1, reason)]
    else:
        assert decoded.valid.get_column("event_id").to_list() == ["e1", "x", "e2"]
        assert decoded.rejects.is_empty()
