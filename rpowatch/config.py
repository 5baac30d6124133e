"""Configuration: one YAML file plus `RPOWATCH_*` environment overrides (contracts.md §2).

Built once in `main`, frozen, and passed down. Nested keys are reached from the environment
with a double underscore: `RPOWATCH_HTTP__PORT=9464`, `RPOWATCH_SOURCES__KAFKA__BOOTSTRAP_SERVERS=…`.
The environment wins over the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ingest.adapters.identity import AFTER_LAST_BACKSLASH, FIRST_DNS_LABEL
from ingest.adapters.identity import IdentityRule as AdapterIdentityRule
from rules.pack import Duration
from rules.policy import Policy

DEFAULT_PACK = Path(__file__).resolve().parent.parent / "rules" / "packs" / "default.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Topics(_Section):
    replication: str = "rpowatch.replication"
    backup: str = "rpowatch.backup"
    heartbeat: str = "rpowatch.heartbeat"


# --- more feeds, in real telemetry formats (ingest/adapters, docs/adapters.md) -------------------

Format = Literal["canonical", "hyperv_replica_json", "azure_diagnostics"]
StreamName = Literal["replication", "backup", "heartbeat"]


class _Feed(_Section):
    format: Format = "canonical"
    # A canonical feed carries one stream, named here. For another format the adapter decides
    # each record's stream; this is where a message it cannot read at all is counted.
    stream: StreamName | None = None

    @model_validator(mode="after")
    def _canonical_needs_stream(self) -> _Feed:
        if self.format == "canonical" and self.stream is None:
            raise ValueError("a canonical feed needs its stream (replication, backup or heartbeat)")
        return self


class ExtraTopic(_Feed):
    topic: str = Field(min_length=1)


class ExtraFilter(_Feed):
    filter: str = Field(min_length=1)  # an MQTT topic filter (+ and # wildcards)


class KafkaSource(_Section):
    enabled: bool = False
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "rpowatch"
    client_id: str = "rpowatch"
    topics: Topics = Topics()
    dead_letter_topic: str = "rpowatch.dlq"
    # One micro-batch: at most this many records, or what arrived within the poll timeout.
    max_batch_records: int = Field(default=10_000, gt=0)
    poll_timeout_ms: int = Field(default=200, ge=0)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # `azure_event_hubs`: SASL_SSL with PLAIN, user `$ConnectionString`, the namespace's
    # connection string as sasl_password, bootstrap derived from it, Microsoft's timeouts.
    preset: Literal["azure_event_hubs"] | None = None
    # TLS (SSL, SASL_SSL): the CA that signed the brokers' certificates (default: the system's),
    # and a client certificate when the brokers ask for one.
    ssl_ca_file: FilePath | None = None
    ssl_cert_file: FilePath | None = None
    ssl_key_file: FilePath | None = None
    ssl_key_password: SecretStr | None = None
    # A newly assigned partition's instances are rebuilt by replaying this much of it (by
    # record timestamp) before their alerts are evaluated; 0 turns that off.
    replay_window: Duration = Field(default=7200.0, ge=0)
    # Partitions are paused while this many batches are queued or being applied.
    max_in_flight_batches: int = Field(default=8, gt=0)
    session_timeout: Duration = Field(default=10.0, gt=0)
    heartbeat_interval: Duration = Field(default=3.0, gt=0)
    max_poll_interval: Duration = Field(default=300.0, gt=0)
    rebalance_timeout: Duration = Field(default=60.0, gt=0)
    request_timeout: Duration | None = Field(default=None, gt=0)
    metadata_max_age: Duration | None = Field(default=None, gt=0)
    connections_max_idle: Duration | None = Field(default=None, gt=0)
    max_request_size: int | None = Field(default=None, gt=0)  # producers (dead letters, bridge)
    # More topics, e.g. Event Hubs diagnostics read through the Kafka endpoint (docs/adapters.md).
    extra_topics: list[ExtraTopic] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") != "azure_event_hubs":
            return data
        out = {**AZURE_EVENT_HUBS, **data}
        if "bootstrap_servers" not in data:
            bootstrap = event_hubs_bootstrap(data.get("sasl_password"))
            if bootstrap is not None:
                out["bootstrap_servers"] = bootstrap
        return out

    @model_validator(mode="after")
    def _consistent_security(self) -> KafkaSource:
        if self.preset == "azure_event_hubs":
            wrong = [
                f"{key} must be {value!r}"
                for key, value in AZURE_EVENT_HUBS.items()
                if key in ("security_protocol", "sasl_mechanism", "sasl_username") and getattr(self, key) != value
            ]
            if wrong:
                raise ValueError(f"preset azure_event_hubs: {'; '.join(wrong)}")
            if self.sasl_password is None:
                raise ValueError("preset azure_event_hubs: sasl_password must be the namespace's connection string")
        if self.security_protocol.startswith("SASL") and (self.sasl_username is None or self.sasl_password is None):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username and sasl_password")
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("ssl_cert_file and ssl_key_file go together")
        return self


# Azure Event Hubs' Kafka endpoint (Standard tier or higher), with the settings Microsoft
# recommends (learn.microsoft.com/azure/event-hubs/apache-kafka-configurations): Azure closes
# idle connections after 240 s, requests need ≥ 60 s, sessions ≥ 30 s, requests < 1,046,528 B.
AZURE_EVENT_HUBS: dict[str, Any] = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "PLAIN",
    "sasl_username": "$ConnectionString",
    "request_timeout": 60.0,
    "session_timeout": 30.0,
    "metadata_max_age": 180.0,
    "connections_max_idle": 180.0,
    "max_request_size": 1_000_000,
}


def event_hubs_bootstrap(connection_string: object) -> str | None:
    """`<namespace>.servicebus.windows.net:9093` from an Event Hubs connection string
    (`Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=…;…`)."""
    text = connection_string.get_secret_value() if isinstance(connection_string, SecretStr) else connection_string
    if not isinstance(text, str):
        return None
    for part in text.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "endpoint" and "://" in value:
            host = value.split("://", 1)[1].strip().strip("/")
            return f"{host}:9093" if host else None
    return None


class MqttSource(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=1883, gt=0, lt=65536)
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = "rpowatch"
    # Topics are `<prefix>/<cluster_id>/<node_id>/<stream>`.
    topic_prefix: str = "rpowatch"
    qos: Literal[0, 1, 2] = 1
    max_batch_records: int = Field(default=10_000, gt=0)
    batch_window_ms: int = Field(default=100, ge=0)
    # TLS: on with `tls: true` (or any file below); verifies the broker against `ca_file` (default:
    # the system's CAs) and its host name; `cert_file`/`key_file` for a client certificate.
    tls: bool = False
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    # More topic filters, e.g. Hyper-V Replica JSON from deploy/collectors (docs/adapters.md).
    extra_filters: list[ExtraFilter] = Field(default_factory=list)


class Sources(_Section):
    kafka: KafkaSource = KafkaSource()
    mqtt: MqttSource = MqttSource()


class Http(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, lt=65536)
    # Base of links this service hands out (generatorURL); defaults to http://host:port.
    external_url: str | None = None


class Evaluation(_Section):
    interval: Duration = Field(default=1.0, gt=0)
    heartbeat_timeout: Duration = Field(default=30.0, gt=0)
    max_future_skew: Duration = Field(default=300.0, ge=0)
    dedupe_window: Duration = Field(default=600.0, ge=0)
    at_risk_ratio: float = Field(default=0.8, gt=0, lt=1)
    # A breach predicted within this much time raises ReplicationRPOAtRisk.
    lookahead: Duration = Field(default=300.0, ge=0)
    # Missed replication cycles are judged over this window (Hyper-V Replica: 1 h to 7 d).
    monitoring_window: Duration = Field(default=3600.0, ge=3600.0, le=7 * 86400.0)
    # Throughput and IOPS are averaged over this time constant.
    rolling_window: Duration = Field(default=300.0, gt=0)
    # A source silent this long raises IngestStalled and holds back its heartbeat-loss alerts.
    ingest_stall: Duration = Field(default=60.0, gt=0)
    # Per-link and per-service-group sums (link saturation, replica VMs per target, storage-path
    # concentration) follow changes of existing VMs at most this late (new or removed VMs at
    # once); 0 recomputes them after every change.
    aggregate_refresh: Duration = Field(default=10.0, ge=0)


class Alertmanager(_Section):
    urls: list[str] = Field(default_factory=list)
    resend_delay: Duration = Field(default=60.0, gt=0)
    timeout: Duration = Field(default=10.0, gt=0)
    resolved_retention: Duration = Field(default=900.0, ge=0)

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return [u.rstrip("/") for u in urls]


class LinkCapacity(_Section):
    hci_cluster: str
    target: str
    bytes_per_s: float = Field(gt=0)


class Export(_Section):
    per_vm: Literal["all", "violating", "none"] = "all"
    # At most this many VMs' per-VM series per scrape (replicas and backups each), the furthest
    # past (or closest to) their RPO first: neither `all` on a large fleet nor `violating` when a
    # whole site breaches at once would otherwise bound a scrape. 100,000 VMs are ~1.3 million
    # series, ~0.8 s to write; null for no cap.
    max_vms: int | None = Field(default=100_000, gt=0)


class Ingest(_Section):
    max_payload_bytes: int = Field(default=64 * 1024, gt=0)


class HistoryCompaction(_Section):
    # A day's small files (one per interval and table) are merged once there are this many.
    min_files: int = Field(default=60, ge=2)
    # A past day is rewritten as one sorted file plus a compliance rollup this long after it ends.
    seal_after: Duration = Field(default=600.0, ge=0)
    # How often compaction and retention run (on their own thread, never the writer's).
    interval: Duration = Field(default=600.0, gt=0)
    # Rewrites of more rows than this stream unsorted (bounded memory; one-VM reads get slower).
    max_sort_rows: int = Field(default=50_000_000, gt=0)


class History(_Section):
    """Downsampled series and alert transitions as Parquet (docs/history.md)."""

    enabled: bool = False
    # A local directory (relative to the working directory), or an object-store URL polars can
    # write (az://, abfss://, s3://, gs://); on a URL, compaction and retention are off.
    path: str = Field(default="rpowatch-history", min_length=1)
    resolution: Duration = Field(default=60.0, gt=0)
    retention: Duration = Field(default=400 * 86_400.0, gt=0)
    compaction: HistoryCompaction = HistoryCompaction()
    # polars `storage_options` for an object-store URL (account, key, …); never logged.
    storage_options: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("resolution")
    @classmethod
    def _divides_a_day(cls, value: float) -> float:
        ms = round(value * 1000)
        if ms < 1000 or 86_400_000 % ms:
            raise ValueError("must be at least 1s and divide a day evenly (e.g. 10s, 1m, 5m, 15m, 1h)")
        return value

    def plain_storage_options(self) -> dict[str, str]:
        return {k: v.get_secret_value() for k, v in self.storage_options.items()}


class IdentityRule(_Section):
    """Source name → id: an exact `map` entry, else the `pattern`'s group `id` (without a
    pattern: the name as it is), else `default`; no id dead-letters the record."""

    map: dict[str, str] = Field(default_factory=dict)
    pattern: str | None = None
    default: str | None = Field(default=None, min_length=1)

    @field_validator("pattern")
    @classmethod
    def _usable_pattern(cls, value: str | None) -> str | None:
        AdapterIdentityRule(pattern=value).check()
        return value


class VmIdentityRule(IdentityRule):
    pattern: str | None = AFTER_LAST_BACKSLASH


class HostIdentityRule(IdentityRule):
    pattern: str | None = FIRST_DNS_LABEL


class Identity(_Section):
    # Which identity of a VM becomes vm_id: its name, or the platform's id (Hyper-V VMId,
    # Site Recovery / Backup unique ids).
    vm_source: Literal["name", "id"] = "name"
    vm: VmIdentityRule = VmIdentityRule()
    cluster: HostIdentityRule = HostIdentityRule()  # host / broker / fabric / container → cluster_id
    target: HostIdentityRule = HostIdentityRule()  # replica server, or azure:<region> → target_id


class HyperVAdapter(_Section):
    # Assumed when a record has no ReplicationFrequencySec (Measure-VMReplication has none);
    # Hyper-V's default is 300. null dead-letters such records instead.
    default_frequency_s: Literal[30, 300, 900] | None = 300


class AsrAdapter(_Section):
    # Site Recovery logs carry no interval; the default RPO target is twice this.
    frequency_s: Literal[30, 300, 900] = 900


class Adapters(_Section):
    identity: Identity = Identity()
    hyperv: HyperVAdapter = HyperVAdapter()
    asr: AsrAdapter = AsrAdapter()
    # One message of an adapted feed (an Event Hubs batch, a host's whole cmdlet output).
    max_message_bytes: int = Field(default=4 * 1024 * 1024, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RPOWATCH_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    sources: Sources = Sources()
    http: Http = Http()
    evaluation: Evaluation = Evaluation()
    alertmanager: Alertmanager = Alertmanager()
    ingest: Ingest = Ingest()
    export: Export = Export()
    history: History = History()
    adapters: Adapters = Adapters()
    policies: list[Policy] = Field(default_factory=list)
    link_capacities: list[LinkCapacity] = Field(default_factory=list)
    rule_packs: list[Path] = Field(default_factory=list, description="added to the default pack")
    runbook_base_url: str = "https://github.com/rpowatch/rpowatch/blob/main/docs/runbooks"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    def effective_policies(self) -> tuple[Policy, ...]:
        """Configured policies, then the built-in default that matches everything."""
        return (*self.policies, Policy(name="default"))


def settings_from(document: dict[str, Any]) -> Settings:
    return Settings(**document)
