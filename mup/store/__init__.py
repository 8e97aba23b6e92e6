"""mup.store: the zarr v3 activation store (ragged [T, D] per layer), local or S3 / R2.

Writing is crash-safe and resumable (see `StoreWriter`); reading refuses incomplete stores and
stores that lost objects, and every chunk carries a checksum (format 2) that every read checks.
`python -m mup.store verify URL...` (`mup store verify`) checks whole stores. The on-disk format
is documented in `mup/store/_format.py`.
"""

# Format
from mup.store._format import (
    CHUNK_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    JOB_ATTRS,
    SHARD_BYTES,
    STORAGE_DTYPES,
    store_key,
)

# isort: split
# Locations, access checks and errors
from mup.store._io import StoreNotFoundError
from mup.store._location import Location, StoreAccessError, StoreError, parse_location, preflight

# isort: split
# Creating and writing
from mup.store._create import Occupant, StoreExistsError, create, inspect
from mup.store._writer import (
    DEFAULT_RETRIES,
    DEFAULT_S3_UPLOAD,
    MAX_INFLIGHT_SHARDS,
    StoreWriter,
    open_writer,
)

# isort: split
# Reading and listing
from mup.store._reader import (
    ActivationStore,
    IncompleteStoreError,
    StoreListing,
    list_stores,
    open,
)

# isort: split
# Streaming: chunked, prefetched reads and the ragged helpers every reader shares
from mup.store._chunks import (
    READ_CHUNK_BYTES,
    masked_lengths,
    plan_chunks,
    prefetched,
    token_bytes,
    token_indices,
)

# isort: split
# Integrity: what a store must hold, and checking all of it
from mup.store._integrity import DamagedStoreError
from mup.store._verify import Verdict, verify, verify_all

# isort: split
# zarr-python interop
from mup.store._zarr_compat import register_zarr_bfloat16

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_RETRIES",
    "DEFAULT_S3_UPLOAD",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "JOB_ATTRS",
    "MAX_INFLIGHT_SHARDS",
    "READ_CHUNK_BYTES",
    "SHARD_BYTES",
    "STORAGE_DTYPES",
    "ActivationStore",
    "DamagedStoreError",
    "IncompleteStoreError",
    "Location",
    "Occupant",
    "StoreAccessError",
    "StoreError",
    "StoreExistsError",
    "StoreListing",
    "StoreNotFoundError",
    "StoreWriter",
    "Verdict",
    "create",
    "inspect",
    "list_stores",
    "masked_lengths",
    "open",
    "open_writer",
    "parse_location",
    "plan_chunks",
    "prefetched",
    "preflight",
    "register_zarr_bfloat16",
    "store_key",
    "token_bytes",
    "token_indices",
    "verify",
    "verify_all",
]
