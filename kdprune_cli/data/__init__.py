"""Datasets as uint8 tensors on the training device, augmented there in batch.

:mod:`.sources` reads each dataset (one module per dataset behind the :class:`Source` protocol), :mod:`.cache`
keeps it as uint8 tensors with a content fingerprint, :mod:`.batching` holds it on the device and batches it.
"""
from kdprune_cli.data.batching import DeviceData, Split, load_data
from kdprune_cli.data.cache import dataset_fingerprint, ensure_cache, fingerprint, load_cached
from kdprune_cli.data.sources import DATASETS, SOURCES, get_source, read_raw
from kdprune_cli.data.sources.base import DataError, Source

__all__ = ["DATASETS", "SOURCES", "DataError", "DeviceData", "Source", "Split", "dataset_fingerprint",
           "ensure_cache", "fingerprint", "get_source", "load_cached", "load_data", "read_raw"]
