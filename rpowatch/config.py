"""Configuration: one YAML file plus `RPOWATCH_*` environment overrides (contracts.md §2).

Built once in `main`, frozen, and passed down. Nested keys are reached from the environment
with a double underscore: `RPOWATCH_HTTP__PORT=9464`, `RPOWATCH_SOURCES__KAFKA__BOOTSTRAP_SERVERS=…`.
The environment wins over the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rules.pack import Duration
from rules.policy import Policy

DEFAULT_PACK = Path(__file__).resolve().parent.parent / "rules" / "packs" / "default.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Topics(_Section):
    replication: str = "rpowatch.replication"
    backup: str = "rpowatch.backup"
    heartbeat: str = "rpowatch.heartbeat"


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


class Ingest(_Section):
    max_payload_bytes: int = Field(default=64 * 1024, gt=0)


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
