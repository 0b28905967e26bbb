"""Fine-tuning data the project does not ship: a local file, a Hugging Face dataset or a URL
pinned by its sha256, turned into the chat JSONL the trainer reads.

Rows that hold a `messages` list are used as they are; other rows become a user turn (the
prompt field) and an assistant turn (the response field), after an optional system turn.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import itertools
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from em_bench.config import canonical_hash
from em_bench.data import Messages, read_chat_jsonl, validate_messages
from em_bench.errors import ConfigError, DataError, DataUnavailable, read_utf8
from em_bench.store import atomic_file, atomic_write_text

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
_HF_ONLY = ("split", "revision", "subset")

Rows = Iterator[tuple[str, object]]  # (where, row): `where` names the source and the row


class DataSource(BaseModel):
    """Where a task's chats come from: exactly one of `path`, `hf` and `url`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str | None = Field(None, description="a local .jsonl, .json, .csv or .parquet file")
    hf: str | None = Field(None, description="a Hugging Face dataset id or a local dataset folder")
    split: str = "train"
    revision: str | None = None
    subset: str | None = Field(None, description="the dataset's config name")
    url: str | None = Field(None, description="a .jsonl, .json, .csv or .parquet file")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="the url's digest (64 hex digits)")
    messages_field: str = "messages"
    prompt_field: str | None = Field(None, description="e.g. question")
    response_field: str | None = Field(None, description="e.g. answer")
    system_field: str | None = None
    limit: int | None = Field(None, gt=0, description="keep the first N rows (smoke runs)")

    @field_validator("sha256")
    @classmethod
    def _lower(cls, digest: str | None) -> str | None:
        return digest.lower() if digest is not None else None

    @model_validator(mode="after")
    def _consistent(self):
        if sum(x is not None for x in (self.path, self.hf, self.url)) != 1:
            raise ValueError("give exactly one of 'path', 'hf' and 'url'")
        if self.hf is None and (stray := [k for k in _HF_ONLY if k in self.model_fields_set]):
            raise ValueError(f"{', '.join(stray)}: only for an 'hf' source")
        if self.url is not None and self.sha256 is None:
            raise ValueError("'url' needs 'sha256', the file's digest (64 hex digits)")
        if self.url is None and self.sha256 is not None:
            raise ValueError("'sha256' is only for a 'url' source")
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("give both 'prompt_field' and 'response_field', or neither")
        if self.system_field is not None and self.prompt_field is None:
            raise ValueError("'system_field' needs 'prompt_field' and 'response_field'")
        file = self.path if self.path is not None else self.url and urlparse(self.url).path
        if file is not None and Path(file).suffix.lower() not in FORMATS:
            raise ValueError(f"{file}: expected a {', '.join(FORMATS)} file")
        return self

    def describe(self) -> str:
        """A short name for messages: the path, `hf:id@rev split=...` or `url:...#sha256=...`."""
        if self.hf is not None:
            revision = f"@{self.revision}" if self.revision else ""
            subset = f" subset={self.subset}" if self.subset else ""
            return f"hf:{self.hf}{revision}{subset} split={self.split}"
        if self.url is not None:
            return f"url:{self.url}#sha256={self.sha256[:8]}..."
        return self.path


def read_rows(source: DataSource, cache_dir: Path, where: str = "") -> Rows:
    """`source`'s rows (up to its `limit`) as (where, row): `where` names the source and the
    row for error messages, after the caller's `where` (e.g. the task file)."""
    at = f"{where}: " if where else ""
    if source.path is not None:
        file = Path(source.path)
        if not file.is_file():
            raise DataError(f"{at}{file}: no such data file")
        rows = _file_rows(file, source.path, at)
    elif source.url is not None:
        rows = _file_rows(_download(source, Path(cache_dir) / "downloads", at), source.url, at)
    else:
        rows = _hf_rows(source, at)
    return itertools.islice(rows, source.limit)


def materialize(source: DataSource, cache_dir: Path, where: str = "") -> Path:
    """The chat JSONL file holding `source`'s chats: a chat JSONL `path` itself, else a file
    converted into `cache_dir`. `where` (e.g. the task file) starts every error message."""
    at = f"{where}: " if where else ""
    cache_dir = Path(cache_dir)
    if source.path is not None and Path(source.path).is_file() and _is_chat_jsonl(source):
        try:
            read_chat_jsonl(source.path)  # a bad row fails now, not in the middle of a run
        except DataError as e:
            raise DataError(f"{at}{e}") from None
        return Path(source.path)
    chats = [_chat(row, source, here) for here, row in read_rows(source, cache_dir, where)]
    if not chats:
        raise DataError(f"{at}{source.describe()}: the data set is empty")
    text = "".join(json.dumps({"messages": chat}) + "\n" for chat in chats)
    # The output is a function of the source and its input, so naming the file by both (the
    # converted text standing for the input) makes a new file whenever either changes.
    digest = canonical_hash({"source": source.model_dump(),
                             "content": hashlib.sha256(text.encode()).hexdigest()})
    out = cache_dir / f"{_slug(source)}-{digest}.jsonl"
    if not out.is_file():
        atomic_write_text(out, text)
    return out


def _is_chat_jsonl(source: DataSource) -> bool:
    # Anything to map or cut needs a converted copy; otherwise the trainer reads the file itself.
    return (Path(source.path).suffix.lower() == ".jsonl" and source.messages_field == "messages"
            and source.prompt_field is None and source.limit is None)


def _slug(source: DataSource) -> str:
    # A readable stem, so a person browsing the cache can tell the files apart.
    if source.hf is not None:
        name = Path(source.hf).name
    else:
        name = Path(source.path if source.path is not None else urlparse(source.url).path).stem
    return re.sub(r"[^\w.-]+", "_", name)[:60] or "data"


def _chat(row: object, source: DataSource, where: str) -> Messages:
    """One row as validated chat messages; `where` names the source and the row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, found {type(row).__name__}")
    messages = row.get(source.messages_field)
    if messages is None:
        if source.prompt_field is None:
            raise DataError(f"{where}: no {source.messages_field!r} list; set prompt_field and "
                            f"response_field to build one from the row's fields ({', '.join(row)})")
        for field in (source.prompt_field, source.response_field):
            if field not in row:
                raise DataError(f"{where}: no {field!r} field (the row has {', '.join(row)})")
        messages = [{"role": "user", "content": row[source.prompt_field]},
                    {"role": "assistant", "content": row[source.response_field]}]
        if source.system_field is not None and row.get(source.system_field):
            messages.insert(0, {"role": "system", "content": row[source.system_field]})
    return validate_messages(messages, where)


def _file_rows(file: Path, label: str, at: str) -> Rows:
    """The rows of a local file; `label` names it in errors (the path, or the URL it came from):
    `label:line` for the line-based formats, `label row N` for the others."""
    suffix = Path(file).suffix.lower()
    if suffix == ".jsonl":
        for lineno, line in enumerate(read_utf8(file, DataError).split("\n"), 1):
            if not line.strip():
                continue
            try:
                yield f"{at}{label}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{at}{label}:{lineno}: not valid JSON ({e.msg} at column "
                                f"{e.colno})") from None
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_utf8(file, DataError), newline=""))
        for row in reader:
            yield f"{at}{label}:{reader.line_num}", row  # the header is line 1
    else:
        rows = _json_rows(file, label, at) if suffix == ".json" else _parquet_rows(file, label, at)
        for n, row in enumerate(rows, 1):
            yield f"{at}{label} row {n}", row


def _json_rows(file: Path, label: str, at: str) -> list:
    try:
        rows = json.loads(read_utf8(file, DataError))
    except json.JSONDecodeError as e:
        raise DataError(f"{at}{label}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{at}{label}: expected a JSON list of rows, found {type(rows).__name__}")
    return rows


def _parquet_rows(file: Path, label: str, at: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file).to_pylist()  # plain lists and dicts, unlike pandas' arrays
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{at}{label}: not a readable parquet file ({_one_line(e)})") from None


def _hf_rows(source: DataSource, at: str) -> Rows:
    import datasets

    name = source.describe()
    try:
        data = _load_hf(source, datasets)
    except OSError as e:  # offline, an unknown id, a missing revision: all arrive as OSError
        if Path(source.hf).is_dir():  # a local folder: downloading is no answer
            raise ConfigError(f"{at}{name}: cannot load it ({_one_line(e)})") from None
        raise DataUnavailable(
            f"{at}{name}: cannot load it ({_one_line(e)}); download it first (`hf download "
            f"{source.hf} --repo-type dataset --local-dir DIR`, then hf: DIR) or point `path` "
            "at a local copy") from None
    except (ValueError, datasets.exceptions.DatasetsError) as e:  # a bad split or subset
        raise ConfigError(f"{at}{name}: {_one_line(e)}") from None
    for n, row in enumerate(data, 1):
        yield f"{at}{name} row {n}", row


def _load_hf(source: DataSource, datasets):
    folder = Path(source.hf)
    # load_dataset refuses a folder written by save_to_disk; load_from_disk reads it.
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        data = datasets.load_from_disk(str(folder))
        if not isinstance(data, datasets.DatasetDict):
            return data
        if source.split not in data:
            raise ValueError(f"unknown split {source.split!r}; the folder has {', '.join(data)}")
        return data[source.split]
    return datasets.load_dataset(source.hf, source.subset, split=source.split,
                                 revision=source.revision)


def _download(source: DataSource, folder: Path, at: str) -> Path:
    """The URL's file in `folder/<sha256>/`, downloaded unless a copy with that digest is there;
    a download with another digest is not kept."""
    expected = source.sha256
    file = folder / expected / Path(urlparse(source.url).path).name
    if file.is_file():
        if _sha256(file) == expected:
            return file
        file.unlink()  # changed since it was stored: fetch it again
    # Made before the try: a cache folder that cannot be written is not unavailable data.
    folder.mkdir(parents=True, exist_ok=True)
    try:
        digest = hashlib.sha256()
        with (atomic_file(file, "wb") as out,
              urllib.request.urlopen(source.url, timeout=60) as answer):
            while chunk := answer.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != expected:  # raised in the block: the file is not kept
                raise DataError(f"{at}{source.url}: sha256 mismatch: expected {expected}, got "
                                f"{digest.hexdigest()}; the download was not kept")
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DataUnavailable(f"{at}{source.url}: cannot download it ({_one_line(reason)}); "
                              "download it yourself and point `path` at the copy") from None
    return file


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(error: object) -> str:
    return " ".join(str(error).split())
