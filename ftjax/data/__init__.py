"""The SFT data pipeline on grain: sources, formats, packing, per-host sharding, resume."""

from ftjax.data.formats import FORMATS, TEMPLATES, BadRecord, EncodeDoc, Encoder
from ftjax.data.pipeline import (
    FIELDS,
    Options,
    Prefetcher,
    Source,
    TrainData,
    device_batches,
    documents,
    eval_batches,
    global_rows,
    to_global,
    train_batches,
)
from ftjax.data.preflight import Report, SourceReport, preflight
from ftjax.data.sources import DataError, kind_of, open_source, prepare

__all__ = ['FIELDS', 'FORMATS', 'TEMPLATES', 'BadRecord', 'DataError', 'EncodeDoc', 'Encoder',
           'Options', 'Prefetcher', 'Report', 'Source', 'SourceReport', 'TrainData',
           'device_batches', 'documents', 'eval_batches', 'global_rows', 'kind_of', 'open_source',
           'preflight', 'prepare', 'to_global', 'train_batches']
