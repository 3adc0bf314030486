"""Reading a checkpoint the way doctor does: config.json and safetensors headers only.

A safetensors header is an 8-byte little-endian length, then a JSON table of names,
dtypes and shapes: a few MB for a 15 GB checkpoint. For a hub repository, only
``config.json`` and huggingface_hub's header-only safetensors metadata are fetched,
never a weight. Anything unreadable becomes an :class:`InputError` with its exit code.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .core import ExitCode


class InputError(Exception):
    """A checkpoint doctor cannot read: a message for the user and its exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------- reading


class TensorInfo(NamedTuple):
    dtype: str  # safetensors dtype string: BF16, I32, F8_E4M3, U8, ...
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    source: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[str]


INDEX_FILE = "model.safetensors.index.json"
# A safetensors header is JSON of ~200 bytes per tensor; anything beyond this is a
# corrupt length field, not a header worth reading.
MAX_HEADER_BYTES = 512 * 2**20


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of one safetensors file, from its header alone.

    Layout: 8-byte little-endian header length N, N bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
    then the data. Offsets are checked against the file size, so a truncated download is
    reported here instead of halfway through vLLM's load.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(
                ExitCode.UNREADABLE, f"{path}: {size} bytes, too short for a safetensors header"
            )
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise InputError(
                ExitCode.UNREADABLE,
                f"{path}: header length {length} but the file has {size} bytes "
                "(truncated or not a safetensors file)",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            ExitCode.UNREADABLE, f"{path}: safetensors header is not JSON ({exc})"
        ) from None
    if not isinstance(header, dict):
        raise InputError(ExitCode.UNREADABLE, f"{path}: safetensors header is not a table")
    data_size = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            end = int(entry["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputError(
                ExitCode.UNREADABLE, f"{path}: malformed header entry for {name!r}"
            ) from None
        if end > data_size:
            raise InputError(
                ExitCode.UNREADABLE,
                f"{path}: tensor {name!r} ends at byte {end} of the data, which has "
                f"{data_size} bytes (truncated download?)",
            )
        tensors[name] = TensorInfo(dtype, shape)
    return tensors


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(ExitCode.UNREADABLE, f"{path}: {what} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(ExitCode.UNREADABLE, f"{path}: {what} is not a JSON object")
    return data


def read_local(directory: Path) -> Checkpoint:
    if not directory.is_dir():
        raise InputError(ExitCode.NOT_FOUND, f"{directory}: not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InputError(ExitCode.NOT_FOUND, f"{directory}: no config.json")
    config = _read_json(config_path, "config.json")
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(ExitCode.UNREADABLE, f"{index_path}: no weight_map")
        files = sorted(set(map(str, weight_map.values())))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise InputError(
                ExitCode.UNREADABLE,
                f"{index_path} names {len(missing)} missing shard(s): {', '.join(missing[:3])}",
            )
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise InputError(ExitCode.NOT_FOUND, f"{directory}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        tensors.update(read_safetensors_header(directory / name))
    return Checkpoint(str(directory), config, tensors, files)


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def read_hub(repo_id: str, revision: str | None) -> Checkpoint:
    """config.json and the safetensors headers of a hub repository; never a weight."""
    try:
        import huggingface_hub
    except ImportError:
        raise InputError(
            ExitCode.NO_HUB_CLIENT,
            f"{repo_id!r} is not a local directory, and huggingface_hub (needed to read "
            "a hub repository) is not installed",
        ) from None
    try:
        # First the metadata call: it does not retry, so an unreachable hub is reported
        # in about a second (hf_hub_download would retry for half a minute).
        metadata = huggingface_hub.get_safetensors_metadata(repo_id, revision=revision)
        config_path = huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as exc:
        raise _hub_error(repo_id, exc) from None
    config = _read_json(Path(config_path), "config.json")
    tensors = {}
    for file_meta in metadata.files_metadata.values():
        for name, info in file_meta.tensors.items():
            tensors[name] = TensorInfo(str(info.dtype), tuple(int(d) for d in info.shape))
    return Checkpoint(f"hub:{repo_id}", config, tensors, sorted(metadata.files_metadata))


def _hub_error(repo_id: str, exc: Exception) -> InputError:
    """Sort huggingface_hub's exceptions into 'cannot reach' and 'not there'."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
        return InputError(
            ExitCode.HUB_UNREACHABLE,
            f"{repo_id}: the hub cannot be reached (offline mode or no network) and the "
            f"files are not cached: {text}",
        )
    if names & {
        "RepositoryNotFoundError",
        "GatedRepoError",
        "RevisionNotFoundError",
        "EntryNotFoundError",
        "RemoteEntryNotFoundError",
        "NotASafetensorsRepoError",
        "DisabledRepoError",
    }:
        return InputError(ExitCode.HUB_NOT_FOUND, f"{repo_id}: {text}")
    if "SafetensorsParsingError" in names:
        return InputError(ExitCode.UNREADABLE, f"{repo_id}: {text}")
    # Connection refused, DNS failure, timeouts: httpx's and requests' errors and OSError.
    return InputError(ExitCode.HUB_UNREACHABLE, f"{repo_id}: the hub cannot be reached: {text}")


def read_checkpoint(source: str, revision: str | None = None) -> Checkpoint:
    path = Path(source).expanduser()
    if path.exists():
        return read_local(path)
    if _REPO_ID.match(source) and not source.startswith((".", "/", "~")):
        return read_hub(source, revision)
    raise InputError(ExitCode.NOT_FOUND, f"{source}: no such directory (nor a hub repo id)")
