"""Real-component test harness: start Kafka, Mosquitto, Prometheus and
Alertmanager as subprocesses on free 127.0.0.1 ports, wait until they are
really ready, and stop them again.

Every service has ``start()``, ``stop()`` and ``close()`` (stop + delete its
temporary directory) and works as a context manager. The session fixtures in
``tests/conftest.py`` are the usual way in; construct a service directly when
a test needs a private instance (e.g. one it may kill).

Missing binaries or Kafka jars raise :class:`HarnessError` telling to run
``scripts/install-test-deps``.
"""

from .alertmanager import Alertmanager
from .kafka import KafkaBroker, kafka_lib_dir
from .mosquitto import Mosquitto
from .ports import free_port
from .process import HarnessError, Service
from .prometheus import Prometheus

__all__ = [
    "Alertmanager",
    "HarnessError",
    "KafkaBroker",
    "Mosquitto",
    "Prometheus",
    "Service",
    "free_port",
    "kafka_lib_dir",
]
