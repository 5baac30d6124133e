"""Azure Site Recovery and Azure Backup diagnostics through Event Hubs (`{"records": [...]}`) → events."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from ingest.adapters import AdapterSettings, IdentityRule, IdentitySettings, adapt_and_decode, build_adapters
from ingest.adapters.base import Adapter
from ingest.contracts import Stream
from ingest.deadletter import dead_letters
from ingest.source import Batch
from tests.fixtures.adapters.payloads import asr_stats, backup_item, backup_job, event_hub, fixture, iso, ms

FORMAT = "azure_diagnostics"
# After every fixture record (the decoder rejects times > 5 min ahead of arrival).
RECEIVED = datetime(2024, 11, 24, 10, 30, tzinfo=timezone.utc)


def utc(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)


class Run:
    def __init__(self, adapter: Adapter, *payloads: bytes, received: datetime = RECEIVED) -> None:
        n = len(payloads)
        self.batch = Batch("kafka", Stream.REPLICATION, list(payloads), ["insights-logs"] * n, [2] * n,
                           list(range(10, 10 + n)), ms(received), format=FORMAT)
        self.outcomes, self.ignored = adapt_and_decode(adapter, self.batch)
        self.events: dict[Stream, list[dict[str, Any]]] = {s: [] for s in Stream}
        self.rejects: list[tuple[str, str, str]] = []  # (stream, reason, detail)
        for outcome in self.outcomes:
            self.events[outcome.stream].extend(outcome.valid.to_dicts())
            self.rejects.extend((outcome.stream.value, r, d) for r, d in outcome.rejects.select("reason", "detail").iter_rows())

    def kinds(self, stream: Stream, vm: str) -> dict[str, dict[str, Any]]:
        return {str(e["kind"]): e for e in self.events[stream] if e["vm_id"] == vm}


def adapter(**identity: Any) -> Adapter:
    settings = AdapterSettings(identity=IdentitySettings(**identity)) if identity else AdapterSettings()
    return build_adapters(settings)[FORMAT]


# --- Site Recovery ----------------------------------------------------------------------------


def test_replication_stats_rpo_becomes_a_recovery_point() -> None:
    at = datetime(2024, 11, 24, 10, 0, tzinfo=timezone.utc)
    run = Run(adapter(), event_hub([asr_stats("erp-01", at, 95)]))
    assert run.rejects == []
    (event,) = run.events[Stream.REPLICATION]
    assert event["kind"] == "cycle_completed"
    assert event["ts"] == at
    assert event["recovery_point_ts"] == at - timedelta(seconds=95)  # TimeGenerated − rpoInSeconds
    assert (event["vm_id"], event["cluster_id"], event["target_id"]) == ("erp-01", "hci-sea-01", "azure:westeurope")
    assert (event["technology"], event["frequency_s"]) == ("asr", 900)
    assert event["pending_bytes"] is None and event["churn_bytes_per_s"] is None  # not in these logs


def test_samples_of_the_same_recovery_point_are_one_event() -> None:
    at = datetime(2024, 11, 24, 10, 0, tzinfo=timezone.utc)
    a = Run(adapter(), event_hub([asr_stats("erp-01", at, 95)]))
    b = Run(adapter(), event_hub([asr_stats("erp-01", at + timedelta(minutes=15), 95 + 900)]))
    assert a.events[Stream.REPLICATION][0]["event_id"] == b.events[Stream.REPLICATION][0]["event_id"]


def test_the_documented_fixture_in_both_record_shapes() -> None:
    run = Run(adapter(target=IdentityRule(default="azure:westeurope")),
              fixture("asr_eventhub_azurediagnostics.json"), received=datetime(2024, 11, 24, 10, 20, tzinfo=timezone.utc))
    erp1 = [e for e in run.events[Stream.REPLICATION] if e["vm_id"] == "erp-01"]
    # Straight from a diagnostic setting (`properties`), and from a workspace export (`rpoInSeconds_d`).
    assert sorted(e["recovery_point_ts"] for e in erp1) == [
        datetime(2024, 11, 24, 9, 58, 25, 123000, tzinfo=timezone.utc),
        datetime(2024, 11, 24, 10, 14, tzinfo=timezone.utc),
    ]
    # `properties` serialized as a JSON string is read too.
    erp2 = run.kinds(Stream.REPLICATION, "erp-02")
    assert erp2["cycle_completed"]["recovery_point_ts"] == datetime(2024, 11, 24, 8, 49, 59, 623000, tzinfo=timezone.utc)
    assert erp2["test_failover_completed"]["ts"] == datetime(2024, 8, 1, 12, tzinfo=timezone.utc)
    # A record missing its VM's name, and an RPO that is not a number, are dead letters.
    assert sorted((r, d.split(" (at")[0]) for _, r, d in run.rejects) == [
        ("missing_field", "missing_field: ReplicatedItemFriendlyName"),
        ("wrong_type", "wrong_type: rpoInSeconds must be a number >= 0 'n/a'"),
    ]
    assert run.ignored == 2  # AzureSiteRecoveryEvents, -ProtectedDiskDataChurn: nothing to map


def test_workspace_export_rows_need_a_region_or_a_default_target() -> None:
    at = datetime(2024, 11, 24, 10, 0, tzinfo=timezone.utc)
    row = {"TimeGenerated": iso(at), "Type": "AzureDiagnostics", "Category": "AzureSiteRecoveryReplicationStats",
           "name_s": "erp-01", "rpoInSeconds_d": 60, "primaryFabricName_s": "hci-sea-01.contoso.com"}
    run = Run(adapter(), event_hub([row]))
    assert run.events[Stream.REPLICATION] == []
    assert [(r, d.split(" (at")[0]) for _, r, d in run.rejects] == [("missing_field", "missing_field: RecoveryRegion")]
    ok = Run(adapter(target=IdentityRule(default="azure:westeurope")), event_hub([row]))
    assert ok.events[Stream.REPLICATION][0]["target_id"] == "azure:westeurope"


def test_resource_specific_tables_and_jobs() -> None:
    run = Run(adapter(), fixture("asr_la_export_resource_specific.json"))
    erp1 = run.kinds(Stream.REPLICATION, "erp-01")
    assert set(erp1) == {"test_failover_completed"}  # ASRReplicatedItems has no RPO value
    assert erp1["test_failover_completed"]["ts"] == datetime(2024, 11, 20, 8, 30, tzinfo=timezone.utc)
    assert erp1["test_failover_completed"]["target_id"] == "azure:westeurope"  # RecoveryRegion "West Europe"
    # erp-02's succeeded test failover job names no fabric, and no record so far named erp-02's.
    assert [(r, d.split(" (")[0]) for _, r, d in run.rejects] == [("missing_field", "missing_field: PrimaryFabricName")]
    assert run.ignored == 3  # erp-04 (nothing to report yet), a test failover cleanup, a failed test failover


def test_a_job_gets_its_fabric_from_an_earlier_replicated_item_record() -> None:
    shared = adapter()
    at = datetime(2024, 11, 24, 9, 0, tzinfo=timezone.utc)
    job = {"TimeGenerated": iso(at + timedelta(minutes=31)), "Type": "ASRJobs", "OperationName": "Test failover",
           "JobUniqueId": "job-1", "Status": "Succeeded", "EndTime": iso(at + timedelta(minutes=30)),
           "ReplicatedItemFriendlyName": "erp-09", "VaultLocation": "westeurope"}
    before = Run(shared, event_hub([job]))
    assert [(r, d.split(" (")[0]) for _, r, d in before.rejects] == [("missing_field", "missing_field: PrimaryFabricName")]
    Run(shared, event_hub([asr_stats("erp-09", at, 30)]))
    after = Run(shared, event_hub([job]))
    assert after.rejects == []
    assert after.kinds(Stream.REPLICATION, "erp-09")["test_failover_completed"]["cluster_id"] == "hci-sea-01"


@pytest.mark.parametrize(
    ("operation", "kind"),
    [("Test failover", "test_failover_completed"), ("Planned failover", "planned_failover"),
     ("Failover", "unplanned_failover"), ("Reprotect", "reverse_replication_started")],
)
def test_succeeded_site_recovery_jobs(operation: str, kind: str) -> None:
    at = datetime(2024, 11, 24, 9, 0, tzinfo=timezone.utc)
    job = {"TimeGenerated": iso(at), "Type": "ASRJobs", "OperationName": operation, "JobUniqueId": "j",
           "Status": "Succeeded", "EndTime": iso(at), "ReplicatedItemFriendlyName": "erp-01",
           "VaultLocation": "westeurope"}
    run = Run(adapter(cluster=IdentityRule(default="hci-sea-01")), event_hub([job]))
    assert [e["kind"] for e in run.events[Stream.REPLICATION]] == [kind]


# --- Azure Backup -------------------------------------------------------------------------------


def test_backup_fixture_items_jobs_and_restores() -> None:
    run = Run(adapter(), fixture("backup_eventhub.json"))
    # CoreAzureBackup: the latest recovery point is a success; MABS; the DPM data-source prefix is
    # stripped from the VM's name; the container's host name is the instance.
    sql = run.kinds(Stream.BACKUP, "sql-01")
    item = sql["succeeded"]
    assert item["recovery_point_ts"] == item["ts"] == datetime(2024, 11, 24, 2, tzinfo=timezone.utc)
    assert (item["product"], item["level"], item["cluster_id"]) == ("mabs", "host", "hci-sea-01")
    assert item["location"] is None and item["retention_tier"] is None  # not documented values: left empty
    restore = sql["restore_test_succeeded"]
    assert restore["ts"] == datetime(2024, 11, 24, 6, 45, tzinfo=timezone.utc)  # start + duration
    assert restore["product"] == "azure_backup"
    reasons = sorted((r, d.split(": ", 1)[1].split(" ")[0]) for _, r, d in run.rejects)
    assert reasons == [
        ("missing_field", "JobUniqueId"),
        ("unknown_enum", "JobStatus"),  # "Paused"
        ("unmapped_identity", "ProtectedContainerUniqueId"),  # only the container's id, no map entry
        ("unmapped_identity", "ProtectedContainerUniqueId"),
    ]
    assert run.ignored == 2  # the ProtectedContainer row and AddonAzureBackupProtectedInstance


def test_backup_jobs_started_succeeded_warning_failed() -> None:
    start = datetime(2024, 11, 24, 8, 0, tzinfo=timezone.utc)
    jobs = [
        backup_job("vm-a", "j1", start, "InProgress"),
        backup_job("vm-a", "j1", start, "Completed", JobOperationSubType="Incremental"),
        backup_job("vm-b", "j2", start, "CompletedWithWarnings"),
        backup_job("vm-c", "j3", start, "Failed", JobFailureCode="UserErrorGuestAgentStatusUnavailable"),
        backup_job("vm-c", "j4", start, "Cancelled"),
        backup_job("vm-d", "j5", start, "Failed", operation="Restore"),
        backup_job("vm-d", "j6", start, "Completed", operation="ConfigureBackup"),
    ]
    run = Run(adapter(), event_hub(jobs))
    assert run.rejects == []
    got = sorted((e["vm_id"], e["kind"]) for e in run.events[Stream.BACKUP])
    assert got == [("vm-a", "started"), ("vm-a", "succeeded"), ("vm-b", "warning"), ("vm-c", "failed"),
                   ("vm-d", "restore_test_failed")]
    a = run.kinds(Stream.BACKUP, "vm-a")
    assert a["started"]["ts"] == start
    assert a["succeeded"]["ts"] == start + timedelta(minutes=10)
    assert a["succeeded"]["recovery_point_ts"] == start  # the snapshot is the job's first phase
    assert a["succeeded"]["backup_type"] == "incremental"
    assert run.kinds(Stream.BACKUP, "vm-c")["failed"]["error_code"] == "UserErrorGuestAgentStatusUnavailable"
    assert len({e["event_id"] for e in run.events[Stream.BACKUP]}) == 5
    assert run.ignored == 2  # a cancelled job, a ConfigureBackup job


def test_a_job_with_only_ids_learns_names_from_backup_items() -> None:
    shared = adapter()
    latest = datetime(2024, 11, 24, 2, tzinfo=timezone.utc)
    Run(shared, event_hub([backup_item("vm-e", latest)]))
    job = backup_job("ignored-name", "j9", latest, "Failed", container=None,
                     BackupItemUniqueId="westeurope;backup-vault;hci-sea-01;vm-e")
    del job["BackupItemFriendlyName"]
    run = Run(shared, event_hub([job]))
    assert run.rejects == []
    (event,) = run.events[Stream.BACKUP]
    assert (event["vm_id"], event["cluster_id"], event["kind"]) == ("vm-e", "hci-sea-01", "failed")


def test_container_ids_can_be_mapped_explicitly() -> None:
    cluster = IdentityRule(pattern=r"^(?P<id>[^.]+)", map={"westeurope;backup-vault;hci-sea-01": "hci-sea-01"})
    run = Run(adapter(cluster=cluster), fixture("backup_eventhub.json"))
    assert {e["vm_id"] for e in run.events[Stream.BACKUP]} == {"sql-01", "web-02"}


# --- awkward input -----------------------------------------------------------------------------


def test_unreadable_and_empty_messages() -> None:
    run = Run(adapter(), b'{"records": []}', b'{"foo": 1}', b'{"records": {"a": 1}}', b"[1]", b"\xff{",
              b'{"records": [7, null]}')
    assert run.events == {s: [] for s in Stream} and run.ignored == 0
    got = sorted((stream, reason, detail.split(" (at")[0]) for stream, reason, detail in run.rejects)
    assert got == [
        ("replication", "missing_field", "missing_field: records (an array of objects)"),
        ("replication", "missing_field", "missing_field: records (an array of objects)"),
        ("replication", "not_object", "not_object: a JSON list, not an object with records"),
        ("replication", "not_object", "not_object: record 0 is not an object"),
        ("replication", "not_object", "not_object: record 1 is not an object"),
        ("replication", "not_utf8", "not_utf8: invalid start byte at byte 0"),
    ]


def test_dead_letters_are_the_source_records_with_their_message_origin() -> None:
    at = datetime(2024, 11, 24, 10, 0, tzinfo=timezone.utc)
    records = [asr_stats("ok", at, 10), asr_stats(None, at, 10), backup_job("vm", "j", at, "Paused")]
    run = Run(adapter(), event_hub(records))
    letters = {o.stream: dead_letters(o.dead_letters, o.rejects) for o in run.outcomes if o.rejects.height}
    (replication,) = letters[Stream.REPLICATION]
    assert json.loads(replication.payload) == records[1]
    assert replication.headers["rpowatch.origin.offset"] == "10"
    assert replication.headers["rpowatch.origin.partition"] == "2"
    assert replication.headers["rpowatch.detail"].endswith("(at records[1])")
    (backup,) = letters[Stream.BACKUP]
    assert json.loads(backup.payload) == records[2]
    assert backup.headers["rpowatch.stream"] == "backup"
    assert backup.headers["rpowatch.reason"] == "unknown_enum"


def test_times_without_offset_are_utc_in_azure_logs() -> None:
    row = asr_stats("erp-01", datetime(2024, 11, 24, 10, 0, tzinfo=timezone.utc), 0)
    row["time"] = "11/24/2024 10:00:00 AM"
    run = Run(adapter(), event_hub([row]))
    assert run.events[Stream.REPLICATION][0]["ts"] == datetime(2024, 11, 24, 10, 0, tzinfo=timezone.utc)
    row["time"] = "2024-11-24T10:00:00"
    run = Run(adapter(), event_hub([row]))
    assert run.events[Stream.REPLICATION][0]["ts"] == datetime(2024, 11, 24, 10, 0, tzinfo=timezone.utc)
