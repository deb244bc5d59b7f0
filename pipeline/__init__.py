"""vmr pipeline core: CLI, params schema, provenance, atomic writes, progress, and the data library."""

__version__ = "0.1.0"
