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
