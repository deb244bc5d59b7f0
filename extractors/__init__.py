"""Feature extractors. Each module registers its extractors in EXTRACTORS by name."""

from pipeline.registry import Registry

EXTRACTORS = Registry("extractor", package="extractors")
