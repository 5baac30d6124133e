"""The /metrics text, with the large families written by polars instead of line by line.

prometheus_client formats a scrape one sample at a time in Python (~7 µs each, after building
a `Sample` per value): with about 13 per-VM series per VM, 100,000 VMs took 10 s, past
Prometheus's default scrape timeout. A `FrameGauge` keeps its samples as a frame (label
columns and a value), and `encode` writes such a family with one vectorized string
concatenation; every other family, and each family's HELP and TYPE lines, still come from
prometheus_client, so its formats and escaping stay the reference. Anything else reading a
`FrameGauge` (prometheus_client's own encoders, tests) sees ordinary samples, built on first
read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import polars as pl
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.samples import Sample

VALUE = "__value"
_EOF = b"# EOF\n"


class FrameGauge(GaugeMetricFamily):
    """A gauge family whose samples are the rows of `frame`: the `labels` columns (String,
    without nulls) and `VALUE` (Float64, without nulls or NaN)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], frame: pl.DataFrame) -> None:
        self.frame = frame
        self._built: list[Sample] | None = None
        super().__init__(name, documentation, labels=list(labels))
        self.label_names = list(labels)

    @property
    def samples(self) -> list[Sample]:
        if self._built is None:
            names = self.label_names
            self._built = [
                Sample(self.name, dict(zip(names, row[:-1], strict=True)), row[-1])
                for row in self.frame.select(*names, VALUE).iter_rows()
            ]
        return self._built

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        # Metric.__init__ sets an empty list: the frame's rows are the samples until someone
        # assigns real ones.
        self._built = list(value) if value else None

    def text(self) -> bytes:
        """The family's sample lines (Prometheus text and OpenMetrics write gauges alike)."""
        if self.frame.is_empty():
            return b""
        parts: list[pl.Expr] = [pl.lit(self.name)]
        for i, label in enumerate(self.label_names):
            escaped = (
                pl.col(label)
                .str.replace_all("\\", "\\\\", literal=True)
                .str.replace_all("\n", "\\n", literal=True)
                .str.replace_all('"', '\\"', literal=True)
            )
            parts += [pl.lit(("{" if i == 0 else ",") + f'{label}="'), escaped, pl.lit('"')]
        if self.label_names:
            parts.append(pl.lit("}"))
        value = pl.col(VALUE)
        # polars writes the shortest text that reads back as the same float; infinities as
        # Go (and Prometheus) spell them.
        number = (
            pl.when(value == float("inf"))
            .then(pl.lit("+Inf"))
            .when(value == float("-inf"))
            .then(pl.lit("-Inf"))
            .otherwise(value.cast(pl.String))
        )
        lines = pl.concat_str([*parts, pl.lit(" "), number, pl.lit("\n")])
        text: str = self.frame.select(lines.str.join("")).item()
        return text.encode()


def encode(registry: CollectorRegistry, openmetrics: bool = False) -> bytes:
    """The exposition of `registry` in Prometheus text format 0.0.4 (or OpenMetrics),
    equivalent to prometheus_client's encoders."""
    generate: Callable[[CollectorRegistry], bytes] = generate_openmetrics if openmetrics else generate_latest
    out: list[bytes] = []
    plain: list[Metric] = []

    def flush() -> None:
        if plain:
            out.append(_without_eof(generate(_Fixed(plain))))
            plain.clear()

    for metric in registry.collect():
        if isinstance(metric, FrameGauge):
            flush()
            header = GaugeMetricFamily(metric.name, metric.documentation, labels=metric.label_names)
            out.append(_without_eof(generate(_Fixed([header]))))
            out.append(metric.text())
        else:
            plain.append(metric)
    flush()
    if openmetrics:
        out.append(_EOF)
    return b"".join(out)


def encoder_for(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """`encode` in the format the scraper asks for (its Accept header), and the content type."""
    _, content_type = choose_encoder(accept)
    if content_type.startswith("application/openmetrics-text"):
        return (lambda registry: encode(registry, openmetrics=True)), content_type
    return encode, content_type


class _Fixed(CollectorRegistry):
    """A registry of the given families, for prometheus_client's encoders."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        super().__init__(auto_describe=False)
        self._metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics


def _without_eof(text: bytes) -> bytes:
    return text[: -len(_EOF)] if text.endswith(_EOF) else text
