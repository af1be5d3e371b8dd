"""Grain input pipelines (sources, formats, packing) and built-in tasks. See `pipeline.py`."""

from jaxpost.data import formats, packing, sources, tasks
from jaxpost.data.formats import FORMATS, TRUNCATION, Encoder
from jaxpost.data.packing import PackingStats, packing_efficiency
from jaxpost.data.pipeline import Pipeline, PipelineConfig
from jaxpost.data.sources import DataError, MalformedRow, open_source

__all__ = [
    "FORMATS",
    "TRUNCATION",
    "DataError",
    "Encoder",
    "MalformedRow",
    "PackingStats",
    "Pipeline",
    "PipelineConfig",
    "formats",
    "open_source",
    "packing",
    "packing_efficiency",
    "sources",
    "tasks",
]
