"""Azure Monitor resource logs of a Recovery Services vault, streamed through Event Hubs.

Input: one Event Hubs message = `{"records": [...]}` (read through Event Hubs' Kafka endpoint or
any bridge that keeps the body). A record comes in one of two shapes, both accepted:
- straight from a diagnostic setting: `time`, `resourceId`, `category`, `operationName` and the
  category's fields under `properties` (an object, or that object serialized as a string);
- from a Log Analytics workspace data export: the table's columns flat, with `TimeGenerated`,
  `Type` (the table) and, in the AzureDiagnostics table, type-suffixed names (`rpoInSeconds_d`).
Every field is looked up under each of its documented spellings, top level first.

What maps (docs/adapters.md has the field-by-field table and the sources):
- Site Recovery replication rows (AzureSiteRecoveryReplicationStats, -ReplicatedItems,
  ASRReplicatedItems): `rpoInSeconds` → `cycle_completed` with recovery point = TimeGenerated −
  RPO; LastSuccessfulTestFailoverTime → `test_failover_completed`;
- Site Recovery jobs (AzureSiteRecoveryJobs, ASRJobs) that succeeded: test failover, planned and
  unplanned failover, reprotect;
- CoreAzureBackup backup items: LatestRecoveryPointTime → backup `succeeded`;
- AddonAzureBackupJobs: backup jobs → started / succeeded / warning / failed, restore jobs →
  restore_test_succeeded / restore_test_failed.
Records of other categories, and rows of these that carry none of it, are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
import re
import threading
from dataclasses import dataclass, field

import polars as pl

from ingest.adapters.base import DEFAULT_MAX_MESSAGE_BYTES, Adapted, AdapterResult, locate_records
from ingest.adapters.common import (
    ADAPTER_REJECT_SCHEMA,
    INDEX,
    ITEM,
    RECORDS,
    UNMAPPED_IDENTITY,
    event_id,
    first_failure,
    identity_checks,
    parse_timestamp_ms,
    quoted,
    read_object_texts,
    read_records,
    rejects_frame,
    text_fields,
)
from ingest.adapters.identity import IdentitySettings
from ingest.contracts import FIELDS, Stream
from ingest.decode import BAD_TIMESTAMP, MISSING_FIELD, UNKNOWN_ENUM, WRONG_TYPE
from ingest.source import Batch

FORMAT = "azure_diagnostics"

# Each field the adapter uses, under every spelling it is documented with: the resource-specific
# table column (PascalCase), the Event Hubs property, the AzureDiagnostics column (suffix _s
# string, _d number, _t datetime).
SPELLINGS: dict[str, tuple[str, ...]] = {
    "time": ("TimeGenerated", "time"),
    "category": ("Category", "category"),
    "table": ("Type",),
    "operation": ("OperationName", "operationName"),
    "state": ("State",),
    # Site Recovery
    "asr_name": (
        "ReplicatedItemFriendlyName",
        "name_s",
        "name",
        "affectedResourceName_s",
        "affectedResourceName",
        "SourceFriendlyName",
        "DatasourceFriendlyName",
    ),
    "asr_id": ("ReplicatedItemUniqueId", "replicatedItemUniqueId", "DatasourceUniqueId"),
    "fabric": ("PrimaryFabricName", "primaryFabricName_s", "primaryFabricName"),
    # The vault lives in the target region; `location` is the resource log's region field.
    "region": ("RecoveryRegion", "recoveryRegion_s", "recoveryRegion", "VaultLocation", "vaultLocation", "location"),
    "rpo_s": ("rpoInSeconds_d", "rpoInSeconds", "RpoInSeconds"),
    "test_failover": (
        "LastSuccessfulTestFailoverTime",
        "lastSuccessfulTestFailoverTime_t",
        "lastSuccessfulTestFailoverTime",
    ),
    "job_status": ("Status", "ResultType", "resultType", "status"),
    "job_end": ("EndTime", "endTime_t", "endTime"),
    "asr_job_id": ("JobUniqueId", "CorrelationId", "correlationId"),
    # Azure Backup
    "item_name": ("BackupItemFriendlyName", "DatasourceFriendlyName", "BackupItemName"),
    "item_id": ("BackupItemUniqueId",),
    "container_name": ("ProtectedContainerFriendlyName", "ProtectedContainerName"),
    "container_id": ("ProtectedContainerUniqueId",),
    "management_type": ("BackupManagementType",),
    "server_type": ("BackupManagementServerType",),
    "item_type": ("BackupItemType", "DatasourceType"),
    "latest_rp": ("LatestRecoveryPointTime",),
    "backup_operation": ("JobOperation",),
    "backup_subtype": ("JobOperationSubType",),
    "backup_status": ("JobStatus",),
    "failure_code": ("JobFailureCode",),
    "job_start": ("JobStartDateTime",),
    "job_duration_s": ("JobDurationInSecs",),
    "backup_job_id": ("JobUniqueId",),
}
_SOURCE_FIELDS = sorted({name for names in SPELLINGS.values() for name in names})
_PROPERTY = "properties."
_READ_FIELDS: dict[str, pl.DataType] = {
    **text_fields(_SOURCE_FIELDS),
    "properties": pl.Struct(text_fields(_SOURCE_FIELDS)),
}
# Some services write `properties` as a JSON string holding the object.
_STRING_PROPERTIES = re.compile(rb'"properties"\s*:\s*"')

ASR_REPLICATION_TABLES = ("AzureSiteRecoveryReplicationStats", "AzureSiteRecoveryReplicatedItems", "ASRReplicatedItems")
ASR_JOB_TABLES = ("AzureSiteRecoveryJobs", "ASRJobs")
BACKUP_ITEM_TABLE = "CoreAzureBackup"
BACKUP_JOB_TABLE = "AddonAzureBackupJobs"

# Site Recovery job (OperationName, lower case without spaces) → the kind a success reports.
ASR_JOB_KINDS = {
    "testfailover": "test_failover_completed",
    "plannedfailover": "planned_failover",
    "failover": "unplanned_failover",
    "unplannedfailover": "unplanned_failover",
    "reprotect": "reverse_replication_started",
}
ASR_JOB_SUCCESS = ("succeeded", "completed", "success")

# Azure Backup JobStatus (lower case) → kind, per JobOperation; None: a known status that
# reports nothing (a cancelled job, a restore still running).
BACKUP_KINDS = {"completed": "succeeded", "completedwithwarnings": "warning", "failed": "failed", "inprogress": "started", "cancelled": None, "canceled": None}
RESTORE_KINDS = {
    "completed": "restore_test_succeeded",
    "completedwithwarnings": "restore_test_succeeded",
    "failed": "restore_test_failed",
    "inprogress": None,
    "cancelled": None,
    "canceled": None,
}
# A whole-VM item (host level) by its most specific type: BackupItemType "VM", DatasourceType
# "Microsoft.Compute/virtualMachines", BackupManagementType "IaaSVM"; anything else (FileFolder,
# SQLDataBase, AzureWorkload, MAB...) is inside the guest.
HOST_LEVEL_TYPE = r"(?i)virtualmachine|^(iaas)?vm$|^hyperv|vmware"

REPLICATION_COLUMNS = [spec.name for spec in FIELDS[Stream.REPLICATION]]
BACKUP_COLUMNS = [spec.name for spec in FIELDS[Stream.BACKUP]]


@dataclass(frozen=True)
class AzureDiagnosticsSettings:
    """`asr_frequency_s`: the replication interval Site Recovery events are reported with (the
    logs carry none). 900 s, so the default RPO target (2 ×) is 30 minutes — Microsoft's own
    sample alert threshold — and the 15-minute cadence of the replication stats is not itself
    a breach."""

    identity: IdentitySettings = field(default_factory=IdentitySettings)
    asr_frequency_s: int = 900
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def _normalized(expr: pl.Expr) -> pl.Expr:
    return expr.str.to_lowercase().str.replace_all(r"[\s_-]", "")


class AzureDiagnosticsAdapter:
    format = FORMAT
    default_stream = Stream.REPLICATION

    def __init__(self, settings: AzureDiagnosticsSettings = AzureDiagnosticsSettings()) -> None:
        self._settings = settings
        # What earlier records said about an item, for records that do not say it themselves:
        # a Site Recovery job names its VM but not the VM's fabric and region (the replicated
        # item records do); an older-schema backup job has only the item's unique id (the
        # CoreAzureBackup item records have its name and container). Azure Backup's own
        # reports join jobs to items the same way.
        self._asr_context = _Context(("fabric", "region"))
        self._backup_context = _Context(("item_name", "container_name"))

    def locate(self, payload: bytes, items: Sequence[int]) -> list[tuple[bytes, str]]:
        return locate_records(payload, items, RECORDS)

    def adapt(self, batch: Batch) -> AdapterResult:
        max_bytes = self._settings.max_message_bytes
        records = read_records(batch.payloads, "records", _READ_FIELDS, max_bytes)
        read_rejects = rejects_frame(records.rejects.rename({"index": INDEX, "item": ITEM}), self.default_stream.value)
        rows = records.frame
        if rows.is_empty():
            return AdapterResult(rejects=read_rejects)
        props = rows.get_column("properties").struct.unnest()
        if any(_STRING_PROPERTIES.search(payload) for payload in batch.payloads):
            props = _with_string_properties(rows, props, batch.payloads, max_bytes)
        rows = rows.drop("properties").hstack(props.rename({name: _PROPERTY + name for name in _SOURCE_FIELDS}))
        logical = rows.select(
            INDEX,
            ITEM,
            *[
                pl.coalesce([*names, *[_PROPERTY + name for name in names]]).alias(key)
                for key, names in SPELLINGS.items()
            ],
        )
        table = (
            pl.when(pl.col("table").is_not_null() & (pl.col("table") != "AzureDiagnostics"))
            .then(pl.col("table"))
            .otherwise(pl.col("category"))
        )
        logical = logical.with_columns(table.alias("table"), parse_timestamp_ms(pl.col("time"), True).alias("time_ms"))
        logical = self._with_context(logical)
        asr_rows = logical.filter(pl.col("table").is_in(ASR_REPLICATION_TABLES + ASR_JOB_TABLES))
        backup_rows = logical.filter(pl.col("table").is_in((BACKUP_ITEM_TABLE, BACKUP_JOB_TABLE)))
        replication, replication_rejects, replication_sources = self._replication(asr_rows)
        backup, backup_rejects, backup_sources = self._backup(backup_rows)
        adapted: dict[Stream, Adapted] = {}
        if replication.height:
            adapted[Stream.REPLICATION] = Adapted.of(Stream.REPLICATION, replication, REPLICATION_COLUMNS)
        if backup.height:
            adapted[Stream.BACKUP] = Adapted.of(Stream.BACKUP, backup, BACKUP_COLUMNS)
        used = replication_sources + backup_sources + replication_rejects.height + backup_rejects.height
        return AdapterResult(
            adapted=adapted,
            rejects=pl.concat([read_rejects, replication_rejects, backup_rejects]),
            ignored=logical.height - used,
        )

    def _with_context(self, logical: pl.DataFrame) -> pl.DataFrame:
        asr = pl.col("table").is_in(ASR_REPLICATION_TABLES + ASR_JOB_TABLES)
        backup = pl.col("table").is_in((BACKUP_ITEM_TABLE, BACKUP_JOB_TABLE))
        logical = self._asr_context.learn_and_fill(logical, "asr_name", asr)
        return self._backup_context.learn_and_fill(logical, "item_id", backup)

    # --- Site Recovery -----------------------------------------------------------------------

    def _replication(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, int]:
        """Events, rejects, and how many source rows yielded events."""
        if rows.is_empty():
            return pl.DataFrame(), pl.DataFrame(schema=ADAPTER_REJECT_SCHEMA), 0
        ident = self._settings.identity
        vm_key = pl.col("asr_id") if ident.vm_source == "id" else pl.col("asr_name")
        region = pl.col("region").str.to_lowercase().str.replace_all(r"\s", "")
        target_source = pl.lit("azure:") + region
        is_job = pl.col("table").is_in(ASR_JOB_TABLES)
        job_kind = _normalized(pl.col("operation")).replace_strict(ASR_JOB_KINDS, default=None, return_dtype=pl.String)
        job_ok = _normalized(pl.col("job_status")).is_in(ASR_JOB_SUCCESS)
        staged = rows.with_columns(
            vm_key.alias("vm_key"),
            ident.vm.resolve(vm_key).alias("vm_id"),
            ident.cluster.resolve(pl.col("fabric")).alias("cluster_id"),
            target_source.alias("target_source"),
            ident.target.resolve(target_source).alias("target_id"),
            pl.col("rpo_s").cast(pl.Float64, strict=False).alias("rpo"),
            parse_timestamp_ms(pl.col("test_failover"), True).alias("test_ms"),
            parse_timestamp_ms(pl.col("job_end"), True).alias("end_ms"),
            pl.when(is_job & job_ok).then(job_kind).alias("job_kind"),
        )
        # Rows with something to report; a malformed value among them is a reject.
        yields = (~is_job & (pl.col("rpo_s").is_not_null() | pl.col("test_failover").is_not_null())) | pl.col(
            "job_kind"
        ).is_not_null()
        fabric_field = "PrimaryFabricName (ASRJobs have none: set adapters.identity.cluster.default)"
        reason, detail = first_failure(
            [
                *identity_checks("vm_id", "vm_key", "ReplicatedItemFriendlyName", "vm"),
                *identity_checks("cluster_id", "fabric", fabric_field, "cluster"),
                *identity_checks("target_id", "region", "RecoveryRegion", "target"),
                (pl.col("time_ms").is_null() & pl.col("time").is_null(), pl.lit(f"{MISSING_FIELD}: TimeGenerated")),
                (pl.col("time_ms").is_null(), pl.lit(f"{BAD_TIMESTAMP}: TimeGenerated") + quoted("time")),
                (
                    pl.col("rpo_s").is_not_null() & (pl.col("rpo").is_null() | ~pl.col("rpo").is_finite() | (pl.col("rpo") < 0)),
                    pl.lit(f"{WRONG_TYPE}: rpoInSeconds must be a number >= 0") + quoted("rpo_s"),
                ),
                (
                    pl.col("test_failover").is_not_null() & pl.col("test_ms").is_null(),
                    pl.lit(f"{BAD_TIMESTAMP}: LastSuccessfulTestFailoverTime") + quoted("test_failover"),
                ),
            ]
        )
        staged = staged.filter(yields).with_columns(reason.alias("reason"), detail.alias("detail"))
        rejects = rejects_frame(staged.filter(pl.col("reason").is_not_null()), Stream.REPLICATION.value)
        good = staged.filter(pl.col("reason").is_null())
        common = [
            pl.col(INDEX),
            pl.col(ITEM),
            pl.col("cluster_id"),
            pl.col("vm_id"),
            pl.col("target_id"),
            pl.lit("asr").alias("technology"),
            pl.lit(self._settings.asr_frequency_s, dtype=pl.Int64).alias("frequency_s"),
        ]
        recovery_point = (pl.col("time_ms") - (pl.col("rpo") * 1000).round(0).cast(pl.Int64)).alias("rp_ms")
        points = good.filter(~is_job & pl.col("rpo").is_not_null()).with_columns(recovery_point).select(
            *common,
            event_id("asr:c", pl.col("vm_key"), pl.col("rp_ms")).alias("event_id"),
            pl.col("time_ms").alias("ts"),
            pl.lit("cycle_completed").alias("kind"),
            pl.col("rp_ms").alias("recovery_point_ts"),
        )
        tests = good.filter(~is_job & pl.col("test_ms").is_not_null()).select(
            *common,
            event_id("asr:t", pl.col("vm_key"), pl.col("test_ms")).alias("event_id"),
            pl.col("test_ms").alias("ts"),
            pl.lit("test_failover_completed").alias("kind"),
            pl.lit(None, dtype=pl.Int64).alias("recovery_point_ts"),
        )
        job_ts = pl.coalesce("end_ms", "time_ms")
        jobs = good.filter(pl.col("job_kind").is_not_null()).select(
            *common,
            event_id(
                "asr:j", pl.coalesce(pl.col("asr_job_id"), pl.col("vm_key") + pl.lit("@") + job_ts.cast(pl.String)), pl.col("job_kind")
            ).alias("event_id"),
            job_ts.alias("ts"),
            pl.col("job_kind").alias("kind"),
            pl.lit(None, dtype=pl.Int64).alias("recovery_point_ts"),
        )
        events = pl.concat([points, tests, jobs], how="vertical_relaxed")
        sources = events.select(INDEX, ITEM).unique().height
        return _with_nulls(events, REPLICATION_COLUMNS), rejects, sources

    # --- Azure Backup ------------------------------------------------------------------------

    def _backup(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, int]:
        if rows.is_empty():
            return pl.DataFrame(), pl.DataFrame(schema=ADAPTER_REJECT_SCHEMA), 0
        ident = self._settings.identity
        vm_key = pl.col("item_id") if ident.vm_source == "id" else pl.col("item_name")
        cluster = (
            pl.when(pl.col("container_name").is_not_null())
            .then(ident.cluster.resolve(pl.col("container_name")))
            .otherwise(ident.cluster.lookup(pl.col("container_id")))
        )
        is_item = pl.col("table") == BACKUP_ITEM_TABLE
        operation = _normalized(pl.col("backup_operation"))
        status = _normalized(pl.col("backup_status"))
        # "?": a status outside the documented ones (or none) of a job that would report one.
        kinds = (
            pl.when(operation.is_in(["backup", "restore"]) & status.is_null())
            .then(pl.lit("?"))
            .when(operation == "backup")
            .then(status.replace_strict(BACKUP_KINDS, default="?", return_dtype=pl.String))
            .when(operation == "restore")
            .then(status.replace_strict(RESTORE_KINDS, default="?", return_dtype=pl.String))
        )
        management = pl.coalesce("server_type", "management_type").str.to_lowercase()
        product = (
            pl.when(management.str.contains("azurebackupserver|mabs"))
            .then(pl.lit("mabs"))
            .when(management.str.contains("dpm"))
            .then(pl.lit("other"))
            .otherwise(pl.lit("azure_backup"))
        )
        level_source = pl.coalesce("item_type", "management_type")
        start_ms = parse_timestamp_ms(pl.col("job_start"), True)
        duration_ms = (pl.col("job_duration_s").cast(pl.Float64, strict=False) * 1000).round(0).cast(pl.Int64)
        staged = rows.with_columns(
            vm_key.alias("vm_key"),
            ident.vm.resolve(vm_key).alias("vm_id"),
            pl.coalesce("container_name", "container_id").alias("container"),
            cluster.alias("cluster_id"),
            product.alias("product"),
            pl.when(level_source.str.contains(HOST_LEVEL_TYPE)).then(pl.lit("host")).when(level_source.is_not_null()).then(pl.lit("guest")).alias("level"),
            parse_timestamp_ms(pl.col("latest_rp"), True).alias("latest_rp_ms"),
            start_ms.alias("start_ms"),
            pl.when(is_item).then(None).otherwise(kinds).alias("job_kind"),
            duration_ms.alias("duration_ms"),
        )
        live = pl.col("state").is_null() | (_normalized(pl.col("state")) != "deleted")
        item_yields = is_item & (_normalized(pl.col("operation")) == "backupitem") & pl.col("latest_rp").is_not_null()
        job_yields = ~is_item & pl.col("job_kind").is_not_null()
        staged = staged.filter(live & (item_yields | job_yields))
        reason, detail = first_failure(
            [
                *identity_checks("vm_id", "vm_key", "BackupItemFriendlyName", "vm"),
                (
                    pl.col("cluster_id").is_null() & pl.col("container").is_null(),
                    pl.lit(f"{MISSING_FIELD}: ProtectedContainerFriendlyName"),
                ),
                (
                    pl.col("cluster_id").is_null() & pl.col("container_name").is_null(),
                    pl.lit(f"{UNMAPPED_IDENTITY}: ProtectedContainerUniqueId")
                    + quoted("container_id")
                    + pl.lit(" is not in the cluster identity map (the record names no container)"),
                ),
                (
                    pl.col("cluster_id").is_null(),
                    pl.lit(f"{UNMAPPED_IDENTITY}: ProtectedContainerFriendlyName")
                    + quoted("container_name")
                    + pl.lit(" matches no cluster identity rule"),
                ),
                (pl.col("level").is_null(), pl.lit(f"{MISSING_FIELD}: BackupItemType (host or guest level)")),
                (~is_item & pl.col("backup_status").is_null(), pl.lit(f"{MISSING_FIELD}: JobStatus")),
                (
                    pl.col("job_kind") == "?",
                    pl.lit(f"{UNKNOWN_ENUM}: JobStatus") + quoted("backup_status") + pl.lit(" is not Completed, CompletedWithWarnings, Failed, InProgress or Cancelled"),
                ),
                (~is_item & pl.col("backup_job_id").is_null(), pl.lit(f"{MISSING_FIELD}: JobUniqueId")),
                (
                    pl.col("latest_rp").is_not_null() & pl.col("latest_rp_ms").is_null(),
                    pl.lit(f"{BAD_TIMESTAMP}: LatestRecoveryPointTime") + quoted("latest_rp"),
                ),
                (~is_item & pl.col("job_start").is_null() & pl.col("job_kind").is_in(["started", "succeeded", "warning"]), pl.lit(f"{MISSING_FIELD}: JobStartDateTime")),
                (pl.col("job_start").is_not_null() & pl.col("start_ms").is_null(), pl.lit(f"{BAD_TIMESTAMP}: JobStartDateTime") + quoted("job_start")),
                (~is_item & pl.col("time_ms").is_null() & pl.col("start_ms").is_null(), pl.lit(f"{MISSING_FIELD}: TimeGenerated")),
            ]
        )
        staged = staged.with_columns(reason.alias("reason"), detail.alias("detail"))
        rejects = rejects_frame(staged.filter(pl.col("reason").is_not_null()), Stream.BACKUP.value)
        good = staged.filter(pl.col("reason").is_null())
        common = [pl.col(INDEX), pl.col(ITEM), pl.col("cluster_id"), pl.col("vm_id"), pl.col("product"), pl.col("level")]
        latest = pl.col("latest_rp_ms")
        items = good.filter(is_item).select(
            *common,
            event_id("ab:rp", pl.col("vm_key"), latest).alias("event_id"),
            latest.alias("ts"),
            pl.concat_str([pl.lit("recovery-point"), latest.cast(pl.String)], separator=":").alias("job_id"),
            pl.lit("succeeded").alias("kind"),
            latest.alias("recovery_point_ts"),
            pl.lit(None, dtype=pl.String).alias("backup_type"),
            pl.lit(None, dtype=pl.String).alias("error_code"),
        )
        kind = pl.col("job_kind")
        finished_ms = pl.coalesce(pl.col("start_ms") + pl.col("duration_ms"), pl.col("time_ms"), pl.col("start_ms"))
        subtype = _normalized(pl.col("backup_subtype"))
        jobs = good.filter(~is_item).select(
            *common,
            event_id("ab:j", pl.col("backup_job_id"), kind).alias("event_id"),
            pl.when(kind == "started").then(pl.col("start_ms")).otherwise(finished_ms).alias("ts"),
            pl.col("backup_job_id").alias("job_id"),
            kind.alias("kind"),
            # The recovery point of a backup is taken as the job start: the snapshot is the first
            # phase of a job, and an earlier point can only overstate the backup's age.
            pl.when(kind.is_in(["succeeded", "warning"])).then(pl.col("start_ms")).alias("recovery_point_ts"),
            pl.when(subtype == "full").then(pl.lit("full")).when(subtype == "incremental").then(pl.lit("incremental")).alias("backup_type"),
            pl.when(kind.is_in(["failed", "restore_test_failed"])).then(pl.col("failure_code")).alias("error_code"),
        )
        events = pl.concat([items, jobs], how="vertical_relaxed")
        sources = events.select(INDEX, ITEM).unique().height
        return _with_nulls(events, BACKUP_COLUMNS), rejects, sources


class _Context:
    """A bounded memory of `fields` per key (least recently learned forgotten first). Batches
    of two sources may be adapted at once in the worker threads, hence the lock."""

    LIMIT = 200_000

    def __init__(self, fields: tuple[str, ...]) -> None:
        self._fields = fields
        self._known: dict[str, tuple[str | None, ...]] = {}
        self._lock = threading.Lock()

    def learn_and_fill(self, frame: pl.DataFrame, key: str, scope: pl.Expr) -> pl.DataFrame:
        """Remember what rows in `scope` say about their key, then fill the rows' missing fields
        from what is known (the row's own values win)."""
        has_any = pl.any_horizontal(pl.col(f).is_not_null() for f in self._fields)
        learned = (
            frame.filter(scope & pl.col(key).is_not_null() & has_any)
            .group_by(key, maintain_order=True)
            .agg(pl.col(f).drop_nulls().last() for f in self._fields)
        )
        lacking = pl.any_horizontal(pl.col(f).is_null() for f in self._fields)
        keys = frame.filter(scope & pl.col(key).is_not_null() & lacking).get_column(key).unique().to_list()
        with self._lock:
            for row in learned.select(key, *self._fields).iter_rows():
                known = self._known.pop(row[0], (None,) * len(self._fields))
                self._known[row[0]] = tuple(new if new is not None else old for new, old in zip(row[1:], known, strict=True))
            while len(self._known) > self.LIMIT:
                del self._known[next(iter(self._known))]
            rows = [(k, *self._known[k]) for k in keys if k in self._known]
        if not rows:
            return frame
        schema = {key: pl.String(), **{f"__known_{f}": pl.String() for f in self._fields}}
        known_frame = pl.DataFrame(rows, schema=schema, orient="row")
        return (
            frame.join(known_frame, on=key, how="left", maintain_order="left")
            .with_columns(pl.coalesce(f, f"__known_{f}").alias(f) for f in self._fields)
            .drop(f"__known_{f}" for f in self._fields)
        )


def _with_string_properties(
    rows: pl.DataFrame, props: pl.DataFrame, payloads: list[bytes], max_bytes: int
) -> pl.DataFrame:
    """`props` completed with the fields of `properties` that were written as a JSON string (the
    first read, expecting an object, left those null)."""
    texts = read_records(payloads, "records", {"properties": pl.String()}, max_bytes).frame
    aligned = rows.select(INDEX, ITEM).join(texts, on=[INDEX, ITEM], how="left", maintain_order="left")
    as_string = rows.get_column("properties").is_null() & aligned.get_column("properties").str.starts_with("{")
    decoded = read_object_texts(aligned.get_column("properties").zip_with(as_string, pl.Series([None], dtype=pl.String)), _SOURCE_FIELDS)
    return props.with_columns(
        pl.Series(name, decoded.get_column(name)).zip_with(as_string, props.get_column(name)) for name in _SOURCE_FIELDS
    )


def _with_nulls(events: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """The canonical columns a format cannot express, added as nulls (never invented)."""
    if events.is_empty():
        return events
    missing = [pl.lit(None).alias(name) for name in columns if name not in events.columns]
    return events.with_columns(missing).sort(INDEX, ITEM, "ts", maintain_order=True)
