"""Stakes data sets: records of labelled conversations, loaded from .jsonl / .csv files.

ds = load_records(find_dataset("training"), binary=True)
ds.labels          # int8 [N]: 1 high-stakes, 0 low-stakes, -1 none/ambiguous
ds.split("train")  # records whose `split` field is "train"
balance(ds, seed=0).records  # as many high- as low-stakes records, pairs kept whole
"""

# Records and data sets
from mup.data._records import (
    AMBIGUOUS,
    HIGH_STAKES,
    LABEL_NAMES,
    LOW_STAKES,
    ROLES,
    DataError,
    Dataset,
    Message,
    Record,
    load_records,
    write_records,
)

# isort: split
# JSON-lines files of other objects (score files, deployments, benchmark sets)
from mup.data._jsonl import jsonl_objects

# isort: split
# Where data sets live
from mup.data._locate import (
    DEFAULT_DOWNLOADS,
    HUB_REPO,
    SOURCES,
    HubUnavailable,
    bundled_path,
    data_roots,
    dataset_names,
    download,
    evaluation_sets,
    find_dataset,
    is_bundled,
)

# isort: split
# Data set tools (`mup data stats|balance|split|overlap`)
from mup.data._overlap import format_overlap, overlap
from mup.data._stats import dataset_stats, format_stats
from mup.data._transform import SampleError, balance, split_by_pair

__all__ = [
    "AMBIGUOUS",
    "DEFAULT_DOWNLOADS",
    "HIGH_STAKES",
    "HUB_REPO",
    "HubUnavailable",
    "LABEL_NAMES",
    "LOW_STAKES",
    "ROLES",
    "SOURCES",
    "DataError",
    "Dataset",
    "Message",
    "Record",
    "SampleError",
    "balance",
    "bundled_path",
    "data_roots",
    "dataset_names",
    "dataset_stats",
    "download",
    "format_overlap",
    "format_stats",
    "evaluation_sets",
    "find_dataset",
    "is_bundled",
    "jsonl_objects",
    "load_records",
    "overlap",
    "split_by_pair",
    "write_records",
]
