"""Reading a /metrics page (the Prometheus text format) the way Prometheus does: with
prometheus_client's own parser. One helper for the server harness and the bench."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["sample_sum"]


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (``extauthz_checks_total``, a histogram's ``_count``)
    whose labels include ``labels`` (0 when there is none): a label not named is summed over."""
    wanted = labels.items()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted <= sample.labels.items()
    )
