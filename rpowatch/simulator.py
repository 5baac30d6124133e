"""A simulated fleet of Azure Local instances producing canonical events (contracts.md §1).

Time is simulated and driven by the caller: `step(now_ms)` returns everything that happened
since the previous step, as compact JSON payloads ready for Kafka or MQTT. Everything is
deterministic from the seed, and the output does not depend on how often `step` is called:
work is kept in one heap ordered by (due time, action, index) and random numbers are drawn in
that order only. The heap also keeps a step cheap for 100,000 VMs: only what is due is touched.

With `incidents=True` four scripted incidents hit named entities of the first instance, each
firing and resolving an alert of the default rule pack within the first minute (`rpowatch demo`
relies on that).
"""

from __future__ import annotations

import heapq
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TypeVar

from ingest.contracts import Stream

GIB = 1024**3
TIB = 1024**4
# Daily backups start 23 h apart: a job runs under an hour, so each new recovery point lands
# inside the 24 h backup RPO (a start every 24 h would breach it by the job's duration daily).
BACKUP_EVERY_MS = 23 * 3_600_000
MAX_JOB_MS = 3_600_000

# Site codes of the instances and the Azure region their ASR replicas go to.
REGIONS: tuple[tuple[str, str], ...] = (
    ("sea", "westus2"),
    ("ams", "westeurope"),
    ("fra", "germanywestcentral"),
    ("lon", "uksouth"),
    ("syd", "australiaeast"),
    ("sin", "southeastasia"),
    ("tor", "canadacentral"),
    ("dub", "northeurope"),
)
SERVICES = (
    "sql-prod",
    "web-frontend",
    "erp",
    "crm",
    "file-services",
    "ad-ds",
    "exchange",
    "sap-app",
    "vdi",
    "monitoring",
    "k8s-workers",
    "print",
)
# 30 s gets 40 % so that a short demo shows plenty of activity.
FREQUENCY_WEIGHTS = ((30, 0.4), (300, 0.4), (900, 0.2))
PRODUCT_WEIGHTS = (("mabs", 0.5), ("azure_backup", 0.3), ("veeam", 0.2))
PRODUCT_LOCATION = {"mabs": "local", "azure_backup": "azure", "veeam": "local"}
STORAGE_PATHS_PER_CLUSTER = 3

NODE_MEMORY_BYTES = 512 * GIB
NODE_CPU_CORES = 64
NODE_IOPS_CAPACITY = 200_000.0
NODE_NET_CAPACITY = 1.25e9  # 10 Gbit/s replication network per node

# Incident script, seconds after start_ms.
STALL_UNTIL_S = 35
STALL_LAG_AT_START_S = 40
LINK_FROM_S, LINK_UNTIL_S = 5, 45
LINK_LAG_AT_START_S = 28
LINK_BURST_SHARE = 0.8  # each of the two bursting VMs writes 80 % of the instance's capacity
NODE_SILENT_FROM_S, NODE_SILENT_UNTIL_S = 5, 40
BACKUP_FAIL_FROM_S, BACKUP_FAIL_UNTIL_S, BACKUP_RETRY_S = 2, 45, 5
BACKUP_AGE_AT_START_S = 86_400 - 20
# A real DPM/MABS transient VSS failure, so the demo reads like the product.
MABS_ERROR_CODE = "30111"
MABS_ERROR_MESSAGE = (
    "DPM encountered a retryable VSS error. (ID 30111 Details: VssError:The writer experienced "
    "a transient error. If the backup process is retried, the error may not reoccur. (0x800423F3))"
)

# Heap actions; the value orders simultaneous work so that output is reproducible.
_HEARTBEAT, _REPLICATE, _BACKUP_START, _BACKUP_END = 0, 1, 2, 3


@dataclass(frozen=True)
class Emitted:
    stream: Stream  # REPLICATION | BACKUP | HEARTBEAT
    key: str  # cluster_id: the Kafka message key
    node_id: str  # node the event is about / published from (MQTT topic level)
    payload: bytes  # compact UTF-8 JSON


@dataclass(frozen=True)
class Incident:
    name: str
    start_s: float
    end_s: float
    description: str
    entity: str  # e.g. "vm-...", "node ..."


@dataclass(frozen=True, slots=True)
class _Vm:
    vm_id: str
    cluster: int
    node: int  # global node index
    target_id: str
    technology: str
    frequency_s: int
    service_group: str
    storage_path_id: str
    vhd_bytes: int
    churn: float  # bytes/s
    product: str


@lru_cache(maxsize=4096)
def _second(epoch_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s))


def rfc3339(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with milliseconds (`2026-11-24T10:00:30.123Z`)."""
    seconds, millis = divmod(ms, 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


def _dumps(event: dict[str, object]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


T = TypeVar("T")


def _pick(rng: random.Random, weighted: tuple[tuple[T, float], ...]) -> T:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


class FleetSimulator:
    def __init__(
        self,
        vms: int = 200,
        *,
        clusters: int | None = None,
        nodes_per_cluster: int = 4,
        start_ms: int,
        seed: int = 7,
        incidents: bool = True,
        heartbeat_interval_s: float = 5.0,
    ) -> None:
        n_clusters = max(2, vms // 100) if clusters is None else clusters
        if vms < 1 or nodes_per_cluster < 1 or heartbeat_interval_s <= 0:
            raise ValueError("vms, nodes_per_cluster and heartbeat_interval_s must be positive")
        if n_clusters < 2:
            raise ValueError("Hyper-V Replica needs a second instance: clusters must be >= 2")
        if incidents and (vms // n_clusters + (vms % n_clusters > 0) < 4 or nodes_per_cluster < 2):
            raise ValueError("incidents need at least 4 VMs and 2 nodes in the first instance")
        self._rng = random.Random(seed)
        self._start = start_ms
        self._hb_ms = int(heartbeat_interval_s * 1000)
        self._npc = nodes_per_cluster
        self._clusters = tuple(
            f"hci-{REGIONS[c % len(REGIONS)][0]}-{c + 1:02d}" for c in range(n_clusters)
        )
        self._nodes = tuple(f"{c}-n{k + 1}" for c in self._clusters for k in range(nodes_per_cluster))
        self._vms: list[_Vm] = []
        for c in range(n_clusters):
            self._add_cluster_vms(c, vms // n_clusters + (c < vms % n_clusters))

        # Mutable per-VM state, in lists indexed like self._vms.
        rng = self._rng
        count = len(self._vms)
        self._last_rp = [0] * count  # newest replication recovery point (ms)
        self._last_done = [0] * count  # when the cycle that made it completed
        self._pending = [0] * count
        self._job_start = [0] * count  # backup job currently running / last run
        self._job_end = [0] * count
        self._heap: list[tuple[int, int, int]] = []
        for i, vm in enumerate(self._vms):
            freq_ms = vm.frequency_s * 1000
            due = start_ms + rng.randrange(1, freq_ms + 1)  # phase spreads cycles over the interval
            self._last_done[i] = due - freq_ms
            self._last_rp[i] = self._last_done[i] - rng.randrange(1000, 3000)
            self._heap.append((due, _REPLICATE, i))
            self._job_start[i] = start_ms - rng.randrange(3_600_000, 20 * 3_600_000)
            self._job_end[i] = self._job_start[i] + rng.randrange(300_000, MAX_JOB_MS)
            self._heap.append((self._job_start[i] + BACKUP_EVERY_MS, _BACKUP_START, i))
        for n in range(len(self._nodes)):
            self._heap.append((start_ms + rng.randrange(1, self._hb_ms + 1), _HEARTBEAT, n))
        # Per-node baselines; heartbeats wobble around them.
        self._node_mem = [rng.uniform(0.45, 0.65) for _ in self._nodes]
        self._node_cpu = [rng.uniform(0.15, 0.5) for _ in self._nodes]
        self._node_iops = [rng.uniform(0.2, 0.5) for _ in self._nodes]
        self._node_churn = [0.0] * len(self._nodes)
        for vm in self._vms:
            self._node_churn[vm.node] += vm.churn
        used = Counter[str]()
        for vm in self._vms:
            used[vm.storage_path_id] += vm.vhd_bytes
        self._storage = [self._storage_of(c, used) for c in range(n_clusters)]

        # The incident script: which entity misbehaves when (absolute ms windows).
        self._holds: dict[int, tuple[int, int]] = {}  # vm -> no completed cycles in window
        self._burst: dict[int, float] = {}  # vm -> churn while held
        self._silent: dict[int, tuple[int, int]] = {}  # node -> no heartbeats in window
        self._saturated: dict[int, tuple[int, int]] = {}  # cluster -> link at capacity
        self._failing: dict[int, tuple[int, int]] = {}  # vm -> backup jobs fail in window
        self._incidents: tuple[Incident, ...] = ()
        if incidents:
            self._script_incidents()
        heapq.heapify(self._heap)
        self._bootstrapped = False

    # --- fleet ------------------------------------------------------------------------------

    def _add_cluster_vms(self, c: int, count: int) -> None:
        rng = self._rng
        cluster = self._clusters[c]
        site, azure_region = REGIONS[c % len(REGIONS)]
        short = f"{site}{c + 1:02d}"
        partner = self._clusters[(c + 1) % len(self._clusters)]
        # Service groups of 2-6 instances, spread over the storage paths so that no group has
        # every instance on one volume (that would be a StoragePathConcentration finding).
        order = list(range(count))
        rng.shuffle(order)
        group_of: dict[int, tuple[str, str]] = {}
        while order:
            size = len(order) if len(order) <= 6 else rng.randint(2, min(6, len(order) - 2))
            members, order = order[:size], order[size:]
            name = f"{rng.choice(SERVICES)}-{short}-{len(group_of) + 1}"
            offset = rng.randrange(STORAGE_PATHS_PER_CLUSTER)
            for j, member in enumerate(members):
                path = f"{cluster}-csv{(offset + j) % STORAGE_PATHS_PER_CLUSTER + 1}"
                group_of[member] = (name, path)
        for j in range(count):
            asr = rng.random() < 0.2
            group, path = group_of[j]
            self._vms.append(
                _Vm(
                    vm_id=f"vm-{short}-{j + 1:04d}",
                    cluster=c,
                    node=c * self._npc + j % self._npc,
                    target_id=f"azure:{azure_region}" if asr else partner,
                    technology="asr" if asr else "hyperv_replica",
                    frequency_s=_pick(rng, FREQUENCY_WEIGHTS),
                    service_group=group,
                    storage_path_id=path,
                    vhd_bytes=rng.randrange(40 * GIB, 500 * GIB),
                    # Log-uniform: most VMs change little, a few change a lot.
                    churn=round(math.exp(rng.uniform(math.log(50e3), math.log(5e6))), 1),
                    product=_pick(rng, PRODUCT_WEIGHTS),
                )
            )

    def _storage_of(self, c: int, used_by_path: Counter[str]) -> list[dict[str, object]]:
        """The instance's cluster shared volumes, sized so that they are about 70 % full at most."""
        paths = []
        for p in range(STORAGE_PATHS_PER_CLUSTER):
            path_id = f"{self._clusters[c]}-csv{p + 1}"
            used = used_by_path[path_id]
            capacity = max(16 * TIB, math.ceil(used / 0.7 / TIB) * TIB)
            paths.append(
                {
                    "path_id": path_id,
                    "capacity_bytes": capacity,
                    "free_bytes": capacity - used,
                    "iops_capacity": NODE_IOPS_CAPACITY * self._npc / STORAGE_PATHS_PER_CLUSTER,
                    "iops_used": round(NODE_IOPS_CAPACITY * self._npc / STORAGE_PATHS_PER_CLUSTER * 0.3),
                    "online": True,
                }
            )
        return paths

    def _script_incidents(self) -> None:
        """Bend the first instance's VMs 1-4 and its last node into the four incidents. The
        fleet itself was drawn first, so incidents=False gives the same fleet without them."""
        s = self._start
        first = self._vms[:4]
        stall, link_a, link_b, backup = (vm.vm_id for vm in first)
        partner = self._clusters[1]
        lost = self._npc - 1
        capacity = NODE_NET_CAPACITY * self._npc
        self._vms[0] = replace(self._vms[0], frequency_s=30)
        for i in (1, 2):
            self._vms[i] = replace(self._vms[i], frequency_s=30, technology="hyperv_replica", target_id=partner)
        self._vms[3] = replace(self._vms[3], product="mabs")

        # 1. Stall: the last recovery point is already 40 s old and nothing completes until 35 s.
        self._set_replication(0, last_rp=s - STALL_LAG_AT_START_S * 1000, next_due=s + 20_000)
        self._holds[0] = (s, s + STALL_UNTIL_S * 1000)
        # 2. Link saturation: two VMs burst above the link; their cycles are held back.
        for i in (1, 2):
            self._set_replication(i, last_rp=s - LINK_LAG_AT_START_S * 1000, next_due=s + LINK_FROM_S * 1000)
            self._holds[i] = (s + LINK_FROM_S * 1000, s + LINK_UNTIL_S * 1000)
            self._burst[i] = LINK_BURST_SHARE * capacity
        self._saturated[0] = (s + LINK_FROM_S * 1000, s + LINK_UNTIL_S * 1000)
        # 3. The last node goes silent.
        self._silent[lost] = (s + NODE_SILENT_FROM_S * 1000, s + NODE_SILENT_UNTIL_S * 1000)
        # 4. Backups fail from 2 s; the last success is 24 h - 20 s old, so the RPO breaks at 20 s.
        self._job_start[3] = s - BACKUP_AGE_AT_START_S * 1000
        self._job_end[3] = self._job_start[3] + 1_800_000
        self._failing[3] = (s + BACKUP_FAIL_FROM_S * 1000, s + BACKUP_FAIL_UNTIL_S * 1000)
        self._heap = [e for e in self._heap if not (e[1] == _BACKUP_START and e[2] == 3)]
        self._heap.append((s + BACKUP_FAIL_FROM_S * 1000, _BACKUP_START, 3))

        stall_risk = 0.8 * 60 - STALL_LAG_AT_START_S
        link_risk, link_breach = 0.8 * 60 - LINK_LAG_AT_START_S, 60 - LINK_LAG_AT_START_S
        self._incidents = (
            Incident(
                "replication-stall", 0, STALL_UNTIL_S,
                f"{stall} completes no replication cycle: at-risk at ~{stall_risk:.0f} s, "
                f"RPO breach at ~{60 - STALL_LAG_AT_START_S} s, caught up at {STALL_UNTIL_S} s.",
                stall,
            ),
            Incident(
                "link-saturation", LINK_FROM_S, LINK_UNTIL_S,
                f"A write burst on {link_a} and {link_b} pushes the {self._clusters[0]} -> {partner} "
                f"link above capacity; their cycles are held back (at-risk ~{link_risk:.0f} s, "
                f"breach ~{link_breach} s) until they catch up at {LINK_UNTIL_S} s.",
                f"link {self._clusters[0]} -> {partner}",
            ),
            Incident(
                "node-heartbeat-lost", NODE_SILENT_FROM_S, NODE_SILENT_UNTIL_S,
                f"{self._nodes[lost]} sends no heartbeat from {NODE_SILENT_FROM_S} s "
                f"(lost after the timeout) and reports again at {NODE_SILENT_UNTIL_S} s.",
                f"node {self._nodes[lost]}",
            ),
            Incident(
                "backup-chain-failing", BACKUP_FAIL_FROM_S, BACKUP_FAIL_UNTIL_S,
                f"MABS jobs of {backup} fail every {BACKUP_RETRY_S} s (VSS error 30111); its last "
                f"backup passes 24 h at ~20 s; a job succeeds at {BACKUP_FAIL_UNTIL_S} s.",
                backup,
            ),
        )

    def _set_replication(self, i: int, *, last_rp: int, next_due: int) -> None:
        self._last_rp[i], self._last_done[i] = last_rp, last_rp + 2000
        self._heap = [e for e in self._heap if not (e[1] == _REPLICATE and e[2] == i)]
        self._heap.append((next_due, _REPLICATE, i))

    # --- public -----------------------------------------------------------------------------

    @property
    def incidents(self) -> tuple[Incident, ...]:
        return self._incidents

    @property
    def cluster_ids(self) -> tuple[str, ...]:
        return self._clusters

    def step(self, now_ms: int) -> list[Emitted]:
        """Everything that happened since the previous step, up to and including `now_ms`."""
        out: list[Emitted] = []
        if not self._bootstrapped:
            self._bootstrapped = True
            self._bootstrap(out)
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            due, action, index = heapq.heappop(heap)
            if action == _REPLICATE:
                self._replicate(due, index, out)
            elif action == _HEARTBEAT:
                self._heartbeat(due, index, out)
            elif action == _BACKUP_START:
                self._backup_start(due, index, out)
            else:
                self._backup_end(due, index, out)
        return out

    # --- events -----------------------------------------------------------------------------

    def _bootstrap(self, out: list[Emitted]) -> None:
        """Restate every VM's newest points and every node once, so that a consumer starting
        now knows the whole fleet at once (agents report their last state on startup)."""
        for i, vm in enumerate(self._vms):
            self._emit_replication(out, vm, self._last_done[i], "cycle_completed", {
                "recovery_point_ts": rfc3339(self._last_rp[i]),
                "bytes": int(vm.churn * vm.frequency_s),
                "pending_bytes": 0,
                "churn_bytes_per_s": vm.churn,
                "duration_ms": self._last_done[i] - self._last_rp[i],
            })
            self._emit_backup(out, vm, self._job_end[i], self._job_start[i], "succeeded", {
                "recovery_point_ts": rfc3339(self._job_start[i]),
                "bytes": int(vm.churn * 86_400 * 0.25),
            })
        for n in range(len(self._nodes)):
            self._emit_heartbeat(out, n, self._start)

    def _replicate(self, due: int, i: int, out: list[Emitted]) -> None:
        vm = self._vms[i]
        rng = self._rng
        freq_ms = vm.frequency_s * 1000
        hold = self._holds.get(i)
        if hold is not None and hold[0] <= due < hold[1]:
            # Held back: the change log grows (bounded below the resync threshold of 50 %).
            churn = self._burst.get(i, vm.churn)
            grown = vm.churn * (due - self._last_done[i]) + churn * (due - hold[0])
            self._pending[i] = min(int(grown / 1000), int(vm.vhd_bytes * 0.45))
            self._emit_replication(out, vm, due, "cycle_missed", {
                "pending_bytes": self._pending[i],
                "churn_bytes_per_s": churn,
            }, suffix="-missed")
            heapq.heappush(self._heap, (min(due + freq_ms, hold[1]), _REPLICATE, i))
            return
        sent = int(vm.churn * vm.frequency_s * rng.uniform(0.8, 1.2)) + self._pending[i]
        duration = min(1000 + rng.randrange(2000) + int(sent * 1000 / NODE_NET_CAPACITY), freq_ms // 10)
        self._pending[i] = 0
        self._last_done[i], self._last_rp[i] = due, due - duration
        self._emit_replication(out, vm, due, "cycle_completed", {
            "recovery_point_ts": rfc3339(due - duration),
            "bytes": sent,
            "pending_bytes": int(vm.churn * rng.uniform(0.0, 2.0)),
            "churn_bytes_per_s": round(vm.churn * rng.uniform(0.9, 1.1), 1),
            "duration_ms": duration,
        })
        heapq.heappush(self._heap, (due + freq_ms, _REPLICATE, i))

    def _backup_start(self, due: int, i: int, out: list[Emitted]) -> None:
        vm = self._vms[i]
        failing = self._failing.get(i)
        if failing is not None and failing[0] <= due < failing[1]:
            self._emit_backup(out, vm, due, due, "failed", {
                "error_code": MABS_ERROR_CODE,
                "error_message": MABS_ERROR_MESSAGE,
            })
            heapq.heappush(self._heap, (min(due + BACKUP_RETRY_S * 1000, failing[1]), _BACKUP_START, i))
            return
        if failing is not None and due == failing[1]:
            # The retry that works: a quick incremental whose point is now.
            self._job_start[i] = self._job_end[i] = due
            self._emit_backup(out, vm, due, due, "succeeded", {"recovery_point_ts": rfc3339(due)})
            heapq.heappush(self._heap, (due + BACKUP_EVERY_MS, _BACKUP_START, i))
            return
        self._job_start[i] = due
        self._emit_backup(out, vm, due, due, "started", {})
        heapq.heappush(self._heap, (due + self._rng.randrange(300_000, MAX_JOB_MS), _BACKUP_END, i))

    def _backup_end(self, due: int, i: int, out: list[Emitted]) -> None:
        vm = self._vms[i]
        start = self._job_start[i]
        self._job_end[i] = due
        self._emit_backup(out, vm, due, start, "succeeded", {
            "recovery_point_ts": rfc3339(start),
            "bytes": int(vm.churn * 86_400 * self._rng.uniform(0.15, 0.35)),
        })
        heapq.heappush(self._heap, (start + BACKUP_EVERY_MS, _BACKUP_START, i))

    def _heartbeat(self, due: int, n: int, out: list[Emitted]) -> None:
        silent = self._silent.get(n)
        if silent is not None and silent[0] <= due < silent[1]:
            heapq.heappush(self._heap, (silent[1], _HEARTBEAT, n))  # back exactly at the end
            return
        self._emit_heartbeat(out, n, due)
        heapq.heappush(self._heap, (due + self._hb_ms, _HEARTBEAT, n))

    # --- payloads ---------------------------------------------------------------------------

    def _vm_node(self, vm: _Vm, ts: int) -> str:
        """Where the VM's events come from: while its node is lost, failover clustering has
        restarted it on the next node of the instance."""
        silent = self._silent.get(vm.node)
        if silent is not None and silent[0] <= ts < silent[1]:
            c = vm.cluster
            return self._nodes[c * self._npc + (vm.node - c * self._npc + 1) % self._npc]
        return self._nodes[vm.node]

    def _emit_replication(
        self, out: list[Emitted], vm: _Vm, ts: int, kind: str, fields: dict[str, object], suffix: str = ""
    ) -> None:
        cluster = self._clusters[vm.cluster]
        event: dict[str, object] = {
            "event_id": f"rep-{vm.vm_id}-{ts}{suffix}",
            "ts": rfc3339(ts),
            "vm_id": vm.vm_id,
            "cluster_id": cluster,
            "target_id": vm.target_id,
            "technology": vm.technology,
            "kind": kind,
            "frequency_s": vm.frequency_s,
            **fields,
            "vhd_bytes": vm.vhd_bytes,
            "storage_path_id": vm.storage_path_id,
            "service_group": vm.service_group,
        }
        out.append(Emitted(Stream.REPLICATION, cluster, self._vm_node(vm, ts), _dumps(event)))

    def _emit_backup(
        self, out: list[Emitted], vm: _Vm, ts: int, job_start: int, kind: str, fields: dict[str, object]
    ) -> None:
        cluster = self._clusters[vm.cluster]
        job_id = f"job-{vm.vm_id}-{job_start}"
        event: dict[str, object] = {
            "event_id": f"bak-{job_id}-{kind}",
            "ts": rfc3339(ts),
            "vm_id": vm.vm_id,
            "cluster_id": cluster,
            "job_id": job_id,
            "product": vm.product,
            "level": "host",
            "kind": kind,
            "backup_type": "incremental",
            "retention_tier": "daily",
            "location": PRODUCT_LOCATION[vm.product],
            **fields,
        }
        out.append(Emitted(Stream.BACKUP, cluster, self._vm_node(vm, ts), _dumps(event)))

    def _emit_heartbeat(self, out: list[Emitted], n: int, ts: int) -> None:
        rng = self._rng
        c = n // self._npc
        cluster, node = self._clusters[c], self._nodes[n]
        saturated = self._saturated.get(c)
        if saturated is not None and saturated[0] <= ts < saturated[1]:
            net = NODE_NET_CAPACITY * rng.uniform(0.96, 0.995)
        else:
            net = self._node_churn[n] * rng.uniform(0.9, 1.1)
        event: dict[str, object] = {
            "event_id": f"{node}:{ts}",
            # Even-numbered nodes run an older agent that sends epoch milliseconds (both are
            # in the contract, and consumers must handle both).
            "ts": ts if (n % self._npc) % 2 else rfc3339(ts),
            "cluster_id": cluster,
            "node_id": node,
            "state": "up",
            "memory_bytes": NODE_MEMORY_BYTES,
            "memory_used_bytes": int(NODE_MEMORY_BYTES * (self._node_mem[n] + rng.uniform(-0.02, 0.02))),
            "cpu_cores": NODE_CPU_CORES,
            "cpu_used_ratio": round(self._node_cpu[n] + rng.uniform(-0.05, 0.05), 3),
            "iops_capacity": NODE_IOPS_CAPACITY,
            "iops_used": round(NODE_IOPS_CAPACITY * (self._node_iops[n] + rng.uniform(-0.05, 0.05))),
            "net_capacity_bytes_per_s": NODE_NET_CAPACITY,
            "net_replication_bytes_per_s": round(net, 1),
            "storage": self._storage[c],
        }
        out.append(Emitted(Stream.HEARTBEAT, cluster, node, _dumps(event)))

