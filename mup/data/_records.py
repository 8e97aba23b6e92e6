"""Records and data sets of labelled conversations, read from .jsonl or .csv files.

One row of a stakes data set becomes one `Record`. The columns (jsonl keys or csv header names)
are:

  * ``inputs`` (required): plain text, a JSON-encoded list of ``{"role", "content"}`` messages,
    or (jsonl only) a real list of such objects. Plain text becomes one user message.
  * ``ids`` (required): the record id, unique within the file (ints are turned into strings).
  * ``labels`` (optional): ``high-stakes`` / ``low-stakes`` / ``ambiguous`` or 1 / 0 / 2
    (ints or digit strings). Either every row has a label or none has.
  * ``scale_labels`` (optional): the labeller's numeric stakes score.
  * every other column is kept, unchanged, in `Record.fields` (csv values stay strings).

Arrays on a `Dataset` are indexed by record: N is the number of records.

`write_records` writes records back in the same schema (`record_row` is one row), so every file
the data set tools derive is again a file `load_records` reads.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, overload

import numpy as np

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

HIGH_STAKES, LOW_STAKES, AMBIGUOUS = 1, 0, 2
LABEL_NAMES: Mapping[str, int] = MappingProxyType(
    {"high-stakes": HIGH_STAKES, "low-stakes": LOW_STAKES, "ambiguous": AMBIGUOUS}
)
_LABEL_OF_CODE = {code: name for name, code in LABEL_NAMES.items()}
# Columns with a meaning of their own; everything else goes to Record.fields.
_KNOWN_COLUMNS = frozenset({"inputs", "ids", "labels", "scale_labels"})
# The largest record (one jsonl line, one csv field) a data file may hold: far above any
# conversation a model reads (a 128k-token context is ~0.5 MB of text), far below memory.
# csv's own default field limit (128 KiB) is raised to it.
MAX_RECORD_BYTES = 64 << 20


class DataError(ValueError):
    """A data file is malformed. The message names the file, the 1-based line and the field."""

    def __init__(self, source: str, field: str | None, problem: str):
        self.source = source
        self.field = field
        where = f"{source}: field {field!r}" if field else source
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Message:
    """One chat turn."""

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        """The ``{"role", "content"}`` form that chat templates expect."""
        return {"role": self.role, "content": self.content}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """One labelled conversation."""

    id: str
    messages: tuple[Message, ...]
    # 1 high-stakes, 0 low-stakes, 2 ambiguous; None when the file has no labels.
    label: int | None
    scale_label: float | None
    # Every other column of the row (pair_id, split, topic, ...), read-only.
    fields: Mapping[str, Any]
    # "file:line", for error messages further down the pipeline.
    source: str

    @property
    def text(self) -> str:
        """The content of all messages joined by blank lines (for prompted baselines, logs)."""
        return "\n\n".join(message.content for message in self.messages)


class Dataset(Sequence[Record]):
    """The records of one file, in file order, plus where they came from."""

    def __init__(
        self,
        records: Sequence[Record],
        *,
        path: Path,
        sha256: str,
        n_dropped_ambiguous: int = 0,
    ):
        self._records = tuple(records)
        labels = np.full(len(self._records), -1, dtype=np.int8)  # [N]
        for i, record in enumerate(self._records):
            if record.label in (HIGH_STAKES, LOW_STAKES):
                labels[i] = record.label
        labels.flags.writeable = False
        self._labels = labels
        self.path = path
        self.sha256 = sha256  # of the file's bytes: identifies the exact data a result used
        self.n_dropped_ambiguous = n_dropped_ambiguous

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Record]: ...
    def __getitem__(self, index):
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records)

    def __repr__(self) -> str:
        return f"Dataset({self.path.name!r}, {len(self)} records, sha256={self.sha256[:12]})"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(record.id for record in self._records)

    @property
    def labels(self) -> np.ndarray:
        """int8 [N], read-only: 1 high-stakes, 0 low-stakes, -1 unlabelled or ambiguous."""
        return self._labels

    def splits(self) -> tuple[str, ...]:
        """The distinct values of the ``split`` field, in order of first appearance."""
        return tuple(dict.fromkeys(str(r.fields["split"]) for r in self if "split" in r.fields))

    def split(self, name: str) -> Dataset:
        """The records whose ``split`` field equals `name` (same path and sha256)."""
        missing = [r.source for r in self._records if "split" not in r.fields]
        if missing:
            raise DataError(missing[0], "split", "no 'split' field, cannot select a split")
        chosen = [r for r in self._records if str(r.fields["split"]) == name]
        if not chosen:
            raise ValueError(
                f"{self.path}: no records with split {name!r}; splits present: {self.splits()}"
            )
        return Dataset(chosen, path=self.path, sha256=self.sha256)


def load_records(path: str | Path, *, binary: bool = False) -> Dataset:
    """Read a .jsonl or .csv stakes data set.

    With ``binary=True`` rows labelled ambiguous are dropped (the count is logged at INFO and
    kept in `Dataset.n_dropped_ambiguous`); probes and metrics are binary.
    Raises `DataError` naming file, line and field for any malformed row, and for duplicate ids.
    """
    path = Path(path)
    content = path.read_bytes()
    sha256 = hashlib.sha256(content).hexdigest()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path, content)
    elif suffix == ".csv":
        rows = _csv_rows(path, content)
    else:
        raise DataError(str(path), None, f"unsupported file type {suffix!r}; expected .jsonl/.csv")

    records: list[Record] = []
    first_line_of_id: dict[str, str] = {}
    unlabelled: list[str] = []
    for source, row, from_csv in rows:
        record = _parse_row(source, row, from_csv)
        if record.id in first_line_of_id:
            raise DataError(
                source,
                "ids",
                f"duplicate id {record.id!r}, first seen at {first_line_of_id[record.id]}",
            )
        first_line_of_id[record.id] = source
        if record.label is None:
            unlabelled.append(source)
        records.append(record)
    if not records:
        raise DataError(str(path), None, "the file holds no records")
    if unlabelled and len(unlabelled) != len(records):
        raise DataError(
            unlabelled[0], "labels", "missing label, but other rows of this file are labelled"
        )

    n_dropped = 0
    if binary:
        kept = [r for r in records if r.label != AMBIGUOUS]
        n_dropped = len(records) - len(kept)
        logger.info(
            "%s: dropped %d ambiguous of %d records (binary task)", path, n_dropped, len(records)
        )
        records = kept
    return Dataset(records, path=path, sha256=sha256, n_dropped_ambiguous=n_dropped)


def _jsonl_rows(path: Path, content: bytes) -> Iterator[tuple[str, Any, bool]]:
    # Split on b"\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    for number, raw in enumerate(content.split(b"\n"), start=1):
        source = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(source, None, f"not valid UTF-8 ({error})") from None
        if not line.strip():
            continue  # blank lines (a trailing newline) hold no record
        if len(raw) > MAX_RECORD_BYTES:
            raise DataError(
                source, None, f"{len(raw)} bytes, over the {MAX_RECORD_BYTES >> 20} MiB limit"
            )
        yield source, _json(source, None, line), False


def _json(source: str, field: str | None, text: str) -> Any:
    """json.loads, with each way it fails (decode error, nesting, huge ints) as a DataError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(source, field, f"invalid JSON: {error}") from None
    except RecursionError:
        raise DataError(source, field, "JSON nested too deeply to parse") from None
    except ValueError as error:  # an int literal over Python's digit limit (4300 by default)
        raise DataError(
            source, field, f"invalid JSON: {str(error).split(';')[0]} (write long ids as strings)"
        ) from None


def _csv_rows(path: Path, content: bytes) -> Iterator[tuple[str, Any, bool]]:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(str(path), None, f"not valid UTF-8 ({error})") from None
    if csv.field_size_limit() < MAX_RECORD_BYTES:
        csv.field_size_limit(MAX_RECORD_BYTES)  # process-wide; it is only ever raised
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}:1", None, "empty csv file, expected a header row") from None
    except csv.Error as error:
        raise DataError(f"{path}:1", None, f"unreadable csv header: {error}") from None
    if len(set(header)) != len(header):
        raise DataError(f"{path}:1", None, f"duplicate column names in header {header}")
    end_line = reader.line_num
    for values in _csv_records(path, reader):
        # A quoted field may span lines: report the line the row starts on.
        source = f"{path}:{end_line + 1}"
        end_line = reader.line_num
        if not values:
            continue  # blank line
        if len(values) != len(header):
            raise DataError(
                source, None, f"{len(values)} values but the header has {len(header)} columns"
            )
        yield source, dict(zip(header, values, strict=True)), True


def _csv_records(path: Path, reader) -> Iterator[list[str]]:
    while True:
        start = reader.line_num + 1
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # e.g. a field over MAX_RECORD_BYTES
            raise DataError(f"{path}:{start}", None, f"unreadable csv row: {error}") from None


def _parse_row(source: str, row: Any, from_csv: bool) -> Record:
    if not isinstance(row, dict):
        raise DataError(source, None, f"expected a JSON object, got {type(row).__name__}")
    if "inputs" not in row:
        raise DataError(source, "inputs", "missing (every row needs its text or messages)")
    if "ids" not in row:
        raise DataError(source, "ids", "missing (every row needs a unique id)")
    record_id = row["ids"]
    if isinstance(record_id, bool) or not isinstance(record_id, str | int) or record_id == "":
        raise DataError(
            source, "ids", f"expected a non-empty string or int, got {_short(record_id)}"
        )
    return Record(
        id=str(record_id),
        messages=_parse_inputs(source, row["inputs"], from_csv),
        label=_parse_label(source, row.get("labels")),
        scale_label=_parse_scale(source, row.get("scale_labels"), from_csv),
        fields=MappingProxyType({k: v for k, v in row.items() if k not in _KNOWN_COLUMNS}),
        source=source,
    )


def _parse_inputs(source: str, value: Any, from_csv: bool) -> tuple[Message, ...]:
    if isinstance(value, str):
        stripped = value.lstrip()
        if stripped.startswith("["):
            try:
                decoded = json.loads(value)
            except RecursionError:
                raise DataError(source, "inputs", "JSON nested too deeply to parse") from None
            except ValueError as error:
                if stripped[1:].lstrip().startswith("{"):
                    raise DataError(
                        source,
                        "inputs",
                        f"looks like a JSON list of messages but is invalid: {error}",
                    ) from None
                decoded = None  # plain text that happens to start with "["
            if isinstance(decoded, list):
                return _parse_messages(source, decoded)
        if not value.strip():
            raise DataError(source, "inputs", "empty text")
        return (Message(role="user", content=value),)
    if isinstance(value, list) and not from_csv:
        return _parse_messages(source, value)
    raise DataError(
        source, "inputs", f"expected text or a list of messages, got {type(value).__name__}"
    )


def _parse_messages(source: str, items: list[Any]) -> tuple[Message, ...]:
    if not items:
        raise DataError(source, "inputs", "empty list of messages")
    messages = []
    for i, item in enumerate(items):
        field = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise DataError(source, field, f"expected a {{role, content}} object, got {item!r:.80}")
        if set(item) != {"role", "content"}:
            raise DataError(source, field, f"expected keys role and content, got {sorted(item)}")
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise DataError(
                source, f"{field}.role", f"unknown role {role!r}; expected one of {ROLES}"
            )
        if not isinstance(content, str):
            raise DataError(source, f"{field}.content", f"expected a string, got {content!r:.80}")
        messages.append(Message(role=role, content=content))
    return tuple(messages)


def _parse_label(source: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        key = value.strip()
        if key.lower() in LABEL_NAMES:
            return LABEL_NAMES[key.lower()]
        if key.isdigit() and int(key) in (0, 1, 2):
            return int(key)
    elif isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return value
    raise DataError(
        source,
        "labels",
        f"unknown label {_short(value)}; expected high-stakes/low-stakes/ambiguous or 1/0/2",
    )


def _parse_scale(source: str, value: Any, from_csv: bool) -> float | None:
    if value is None or (from_csv and value == ""):
        return None
    if isinstance(value, bool):
        raise DataError(source, "scale_labels", f"expected a number, got {_short(value)}")
    try:
        number = float(value) if isinstance(value, int | float | str) else None
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        number = None
    if number is None or not math.isfinite(number):
        raise DataError(source, "scale_labels", f"expected a finite number, got {_short(value)}")
    return number


def _short(value: Any, limit: int = 80) -> str:
    """repr(value) for an error message, cut short: a value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def record_row(record: Record) -> dict[str, Any]:
    """`record` as one row of the stakes schema: inputs, ids, labels, scale_labels, then every
    other field unchanged.

    Labels are written by name and a single user message as plain text (the upstream form);
    anything else is a JSON-encoded list of messages, as the dialogue sets store it. A plain
    text that starts with "[" is written as a list too, so that reading it back cannot mistake
    it for an encoded conversation. `load_records` of the row gives `record` back.
    """
    messages = record.messages
    plain = len(messages) == 1 and messages[0].role == "user"
    if plain and not messages[0].content.lstrip().startswith("["):
        inputs = messages[0].content
    else:
        inputs = json.dumps([m.as_dict() for m in messages])
    row: dict[str, Any] = {"inputs": inputs, "ids": record.id}
    if record.label is not None:
        row["labels"] = _LABEL_OF_CODE[record.label]
    if record.scale_label is not None:
        scale = record.scale_label
        row["scale_labels"] = int(scale) if scale.is_integer() else scale
    row.update(record.fields)
    return row


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> Path:
    """Write records as a .jsonl stakes data set, atomically: a crash or a bad record leaves the
    old file or none, never half a file. Returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"{path}: records are written as .jsonl, got {path.suffix or 'no suffix'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for record in records:
                # ASCII escapes, as the upstream files have them: a raw U+2028 inside a string
                # would split the line for readers that use str.splitlines.
                out.write(json.dumps(record_row(record)) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after os.replace the name is gone: a no-op
    return path
