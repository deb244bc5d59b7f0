"""Feature extractors. Each module registers its extractors in EXTRACTORS by name."""

from pipeline.core.registry import Registry

EXTRACTORS = Registry("extractor", package="extractors", list_key="features", table_key="extractors")
