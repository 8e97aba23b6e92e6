"""Stakes data sets: records of labelled conversations, loaded from .jsonl / .csv files.

ds = load_records(find_dataset("training"), binary=True)
ds.labels          # int8 [N]: 1 high-stakes, 0 low-stakes, -1 none/ambiguous
ds.split("train")  # records whose `split` field is "train"
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
)

# isort: split
# Where data sets live
from mup.data._locate import (
    HUB_REPO,
    HubUnavailable,
    bundled_path,
    dataset_names,
    download,
    evaluation_sets,
    find_dataset,
    is_bundled,
)

__all__ = [
    "AMBIGUOUS",
    "HIGH_STAKES",
    "HUB_REPO",
    "HubUnavailable",
    "LABEL_NAMES",
    "LOW_STAKES",
    "ROLES",
    "DataError",
    "Dataset",
    "Message",
    "Record",
    "bundled_path",
    "dataset_names",
    "download",
    "evaluation_sets",
    "find_dataset",
    "is_bundled",
    "load_records",
]
