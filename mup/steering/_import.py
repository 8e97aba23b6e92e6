"""Read steering vectors saved with ``torch.save`` (``.pt``) without torch, and import them.

Axis letters: D model width.

The BiPO steering study saves one vector per epoch as ``vec_ep{E}_layer{L}[_gpu{R}].pt`` (its L
is the steered block, mup's `block`): a bfloat16 tensor [D]
(``torch.save(vec.detach().cpu(), path)``). A ``.pt`` file is a pickle, and unpickling runs
whatever callables the file names, so ``pickle.load`` on an untrusted file is arbitrary code
execution. `read_pt` instead uses an
unpickler whose ``find_class`` knows a fixed table of names (torch's tensor and parameter
rebuild functions, the typed storage classes float32 / float16 / bfloat16 / float64,
``collections.OrderedDict`` for the empty backward-hook dict) and maps each to a small numpy
function here; any other global is refused before it is looked up. Storages are read as raw
little-endian bytes and viewed as numpy arrays.

Layouts read:
- zip (torch >= 1.6): ``ARCHIVE/data.pkl`` plus one raw file per storage ``ARCHIVE/data/KEY``;
  ``ARCHIVE/byteorder`` says little or big endian (absent = little).
- legacy (``_use_new_zipfile_serialization=False``): magic number, protocol and system-info
  pickles, the object pickle, the storage-key list, then per key an int64 element count and
  the raw bytes.

The object must be one tensor (or ``nn.Parameter``) of shape [D] or [1, D], or a dict holding
exactly one such tensor (a state dict of one vector); bfloat16 and float16 are widened to
float32 exactly.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np

from mup._renamed import old_keywords
from mup.steering._vector import SteeringVector, VectorFileError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# torch storage class -> (numpy dtype name, bytes per element); bfloat16 is read as uint16.
_STORAGES = {
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "DoubleStorage": ("float64", 8),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str  # a key of _STORAGES


@dataclasses.dataclass(frozen=True)
class _Storage:
    dtype: str
    data: np.ndarray  # 1-D, numpy dtype float32/float16/float64 or uint16 for bfloat16


@dataclasses.dataclass(frozen=True)
class _Tensor:
    array: np.ndarray  # float32 or float64, shape as saved
    dtype: str  # the torch dtype name: float32, float16, bfloat16, float64


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, hooks=None, *_):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor storage is not a storage record")
    size, stride = tuple(int(x) for x in size), tuple(int(x) for x in stride)
    if len(size) != len(stride) or any(x < 0 for x in (*size, *stride)) or storage_offset < 0:
        raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride}")
    n = storage.data.shape[0]
    last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if 0 not in size and last >= n:
        raise pickle.UnpicklingError(f"tensor reaches element {last} of a {n}-element storage")
    item = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.data[storage_offset:],
        shape=size,
        strides=tuple(st * item for st in stride),
        writeable=False,
    )
    arr = np.array(view)  # a copy: never alias the file buffer
    if storage.dtype == "bfloat16":  # the top 16 bits of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif storage.dtype == "float16":
        arr = arr.astype(np.float32)
    return _Tensor(array=arr, dtype=storage.dtype)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *_):
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return data


# (module, name) -> what it unpickles to. Nothing outside this table is ever imported.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage, table=None):
        super().__init__(file)
        self._load_storage = load_storage
        self._table = _ALLOWED if table is None else table

    def find_class(self, module, name):
        try:
            return self._table[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing pickle global {module}.{name} (only float tensors of one vector "
                "can be imported)"
            ) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        kind, key, numel = pid[1], str(pid[2]), int(pid[4])
        if self._load_storage is None:
            raise pickle.UnpicklingError("a storage where none belongs")
        if not isinstance(kind, _StorageType):
            raise pickle.UnpicklingError(f"storage type {kind!r:.80} is not a float storage")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (legacy view_metadata) are not supported")
        return self._load_storage(kind.name, key, numel)


def _storage_array(raw: bytes, kind: str, numel: int, big_endian: bool) -> _Storage:
    dtype, size = _STORAGES[kind]
    if len(raw) < numel * size:
        raise pickle.UnpicklingError(f"storage has {len(raw)} bytes, {numel * size} expected")
    np_dtype = np.dtype("uint16" if dtype == "bfloat16" else dtype).newbyteorder(
        ">" if big_endian else "<"
    )
    data = np.frombuffer(raw, dtype=np_dtype, count=numel).astype(np_dtype.newbyteorder("="))
    return _Storage(dtype=dtype, data=data)


def read_pt(path: str | Path) -> tuple[np.ndarray, str]:
    """The vector in a torch ``.pt`` file as float32 [D], and the dtype it was saved in."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vector file {path} does not exist")
    data = path.read_bytes()
    if not data:
        raise VectorFileError(f"{path}: empty file (0 bytes), not a torch .pt file")
    try:
        obj = _load_zip(data) if zipfile.is_zipfile(io.BytesIO(data)) else _load_legacy(data)
    except VectorFileError as e:
        raise VectorFileError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error) as e:
        problem = " ".join(str(e).split()) or type(e).__name__
        raise VectorFileError(f"{path}: not a readable torch vector file: {problem}") from None
    return _one_vector(obj, path)


def _load_zip(data: bytes):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise VectorFileError(f"zip holds no single ARCHIVE/data.pkl (found {names[:5]})")
        root = pkl[0][: -len("data.pkl")]
        big = root + "byteorder" in names and z.read(root + "byteorder").strip() == b"big"

        def load(kind, key, numel):
            name = f"{root}data/{key}"
            if name not in names:
                raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive")
            return _storage_array(z.read(name), kind, numel, big)

        return _RestrictedUnpickler(io.BytesIO(z.read(pkl[0])), load).load()


def _load_legacy(data: bytes):
    f = io.BytesIO(data)
    plain = _RestrictedUnpickler(f, None)
    try:
        magic = plain.load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise VectorFileError(f"neither a zip nor a legacy torch file ({e})") from None
    if magic != _LEGACY_MAGIC:
        raise VectorFileError("neither a zip nor a legacy torch file (no torch magic number)")
    _RestrictedUnpickler(f, None).load()  # protocol version
    info = _RestrictedUnpickler(f, None).load()
    big = isinstance(info, dict) and info.get("little_endian") is False
    wanted: dict[str, tuple[str, int]] = {}
    loaded: dict[str, _Storage] = {}

    class _Deferred:  # storages come after the object pickle: fill them in afterwards
        def __init__(self, key):
            self.key = key

    def defer(kind, key, numel):
        wanted[key] = (kind, numel)
        return _Deferred(key)

    # Rebuild after the bytes are known: collect (storage, geometry) first.
    calls: list = []

    def capture(storage, *args):
        calls.append((storage, args))
        return ("tensor", len(calls) - 1)

    table = dict(_ALLOWED)
    table[("torch._utils", "_rebuild_tensor_v2")] = capture
    table[("torch._utils", "_rebuild_parameter")] = lambda t, *a: t
    obj = _RestrictedUnpickler(f, defer, table).load()
    keys = _RestrictedUnpickler(f, None).load()
    if not isinstance(keys, list):
        raise VectorFileError("legacy file: storage key list missing")
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        if str(key) not in wanted:
            raise VectorFileError(f"legacy file: unexpected storage {key!r:.40}")
        kind, expected = wanted[str(key)]
        size = _STORAGES[kind][1]
        if numel != expected:
            raise VectorFileError(
                f"legacy file: storage {key} has {numel} elements, not {expected}"
            )
        loaded[str(key)] = _storage_array(f.read(numel * size), kind, numel, big)
    if not all(isinstance(st, _Deferred) and st.key in loaded for st, _ in calls):
        raise VectorFileError("legacy file: a tensor's storage is missing")
    tensors = [_rebuild_tensor(loaded[st.key], *args) for st, args in calls]

    def resolve(x):
        if isinstance(x, tuple) and len(x) == 2 and x[0] == "tensor":
            return tensors[x[1]]
        if isinstance(x, dict):
            return {k: resolve(v) for k, v in x.items()}
        return x

    return resolve(obj)


def _one_vector(obj, path: Path) -> tuple[np.ndarray, str]:
    if isinstance(obj, dict):
        tensors = [(k, v) for k, v in obj.items() if isinstance(v, _Tensor)]
        if len(tensors) != 1 or len(obj) != 1:
            raise VectorFileError(
                f"{path}: holds a dict with keys {list(obj)[:8]}; exactly one tensor is needed"
            )
        obj = tensors[0][1]
    if not isinstance(obj, _Tensor):
        raise VectorFileError(f"{path}: holds a {type(obj).__name__}, not a tensor")
    arr = obj.array
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.size == 0:
        raise VectorFileError(
            f"{path}: tensor has shape {list(obj.array.shape)}; a steering vector is [D] or [1, D]"
        )
    return np.ascontiguousarray(arr, dtype=np.float32), obj.dtype


# The study's file names call the steered block "layer".
_NAME = re.compile(r"vec_ep(?P<epoch>\d+)_layer(?P<block>\d+)")


@old_keywords(layer="block")
def import_pt(
    path: str | Path,
    *,
    block: int | None = None,
    model: str = "",
    d_model: int | None = None,
) -> SteeringVector:
    """A `SteeringVector` from a ``.pt`` file (see `read_pt`).

    block: the steered block; default: parsed from a ``vec_ep{E}_layer{L}`` file name (and an
      explicit block must agree with it). The epoch comes from the name too (0 otherwise).
      ``layer=`` is its old name.
    d_model: when given, the vector must have this many entries.
    """
    path = Path(path)
    vec, dtype = read_pt(path)
    m = _NAME.search(path.name)
    if block is None:
        if m is None:
            raise VectorFileError(
                f"{path}: the block is not in the file name (vec_ep{{E}}_layer{{L}}.pt); pass it "
                "(--block L, the block whose output the vector is added to)"
            )
        block = int(m["block"])
    elif m is not None and int(m["block"]) != int(block):
        raise VectorFileError(
            f"{path}: the file name says block {m['block']} (its _layer{m['block']}), but block "
            f"{block} was given"
        )
    if d_model is not None and vec.shape[0] != int(d_model):
        raise VectorFileError(
            f"{path}: vector has {vec.shape[0]} entries but the model has d_model={d_model}"
        )
    try:
        return SteeringVector(
            vector=vec,
            block=int(block),
            model=model,
            method="bipo-pt",
            epoch=int(m["epoch"]) if m is not None else 0,
            extra={"source": str(path), "source_dtype": dtype},
        )
    except ValueError as e:
        raise VectorFileError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# `mup steering import`
# ---------------------------------------------------------------------------------------------


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "import",
        help="convert a torch .pt steering vector (the BiPO study's files) to mup's format",
        description="Read a .pt vector without torch (restricted unpickler: float tensors of "
        "shape [D] or [1, D] only) and write it as a mup vector file.",
    )
    p.add_argument("path", metavar="VEC.pt", help="the torch vector file")
    p.add_argument(
        "--block",
        "--layer",
        dest="block",
        type=int,
        default=None,
        help="steered block L (default: from vec_ep*_layerL; --layer is its old name)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model spec the vector belongs to (its config checks d_model and the block)",
    )
    p.add_argument("--out", required=True, help="output .safetensors (or .npy)")
    return p


def run(args) -> int:
    from mup._resolve import resolve_spec
    from mup.models import config_from_hf, read_hf_config
    from mup.steering._vector import save_vector

    resolved = resolve_spec(args.model)
    config = config_from_hf(read_hf_config(resolved))  # the config only, no weights
    sv = import_pt(args.path, block=args.block, model=resolved.name, d_model=config.d_model)
    if sv.block >= config.n_layers:
        raise ValueError(
            f"--block {sv.block} is out of range: {resolved.name} has {config.n_layers} blocks"
        )
    out = save_vector(args.out, sv)
    print(
        f"imported {args.path} ({sv.extra['source_dtype']}, d={sv.d_model}, norm {sv.norm:.4g}) "
        f"as steered block {sv.block} of {resolved.name}, epoch {sv.epoch}: wrote {out}"
    )
    return 0
