"""Loading an fsdp checkpoint (torch.distributed.checkpoint, DCP) that may have come from anyone.

DCP unpickles two things with plain pickle: the checkpoint's `.metadata`, and every non-tensor
item of its shards (an optimizer's lr, betas, ...: DefaultLoadPlanner.load_bytes calls
torch.load with weights_only=False). Either could run any code. Here `.metadata` is read by an
unpickler that can reach only the classes DCP's metadata is made of (plain data: dataclasses,
torch.Size, dtypes, a layout, an enum, a path), then checked object by object; the shard items
are read with weights_only=True. Any refusal, and any file that does not load, is one line.

Imported only for fsdp checkpoints: DCP takes ~0.5 s to import.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import pathlib
import pickle
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from dptrain.storage.safeload import (LoadError, check_archive, first_line, open_regular,
                                      read_bounded, weights_only_reason)
from dptrain.storage.statecheck import StateMismatch, check_tensor, check_value

DCP_METADATA = ".metadata"  # DCP's own name for it (filesystem._metadata_fn)
# Bounds on what DCP may read: `.metadata` (a few KB for dptrain's models; entries grow with
# the ranks and tensors), and beyond its tensor's bytes, each stored item's torch.save archive
# (~1.2 KB each; a non-tensor item, such as an lr, is all overhead).
METADATA_LIMIT = 16 << 20
ITEM_OVERHEAD = 64 << 10


# The classes of DCP's metadata: a pickle may build (BUILD) instances of these only.
_DATA_CLASSES = (dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata,
                 dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata,
                 dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
                 dcp_metadata.StorageMeta, filesystem._StorageInfo)


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Everything a `.metadata` pickle of this torch may name, by (module, name)."""
    classes = [*_DATA_CLASSES, dcp_metadata._MEM_FORMAT_ENCODING, torch.Size, pathlib.PosixPath]
    allowed = {(c.__module__, c.__qualname__): c for c in classes}
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath  # its module's name varies by Python
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed.update({("torch", name): value for name, value in vars(torch).items()
                    if isinstance(value, torch.dtype)})
    return allowed


def _guard(opcode: bytes, target, allowed: tuple[type, ...]):
    """pickle's handler of `opcode`, run only when the object it changes is of an allowed type
    (never a class, an enum member or another global: a pickle must not alter them)."""
    original = pickle._Unpickler.dispatch[opcode[0]]

    def load(unpickler) -> None:
        changed = target(unpickler)
        if type(changed) not in allowed:
            raise LoadError(f"it alters a {type(changed).__name__}, which DCP's metadata never "
                            "does")
        original(unpickler)

    return load


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python pickle machine, with every global looked up in the allowlist (nothing
    else can be called) and every object it fills in or updates of a type that is plain data."""

    dispatch = {**pickle._Unpickler.dispatch,
                pickle.BUILD[0]: _guard(pickle.BUILD, lambda u: u.stack[-2], _DATA_CLASSES),
                pickle.APPEND[0]: _guard(pickle.APPEND, lambda u: u.stack[-2], (list,)),
                pickle.APPENDS[0]: _guard(pickle.APPENDS, lambda u: u.metastack[-1][-1], (list,)),
                pickle.SETITEM[0]: _guard(pickle.SETITEM, lambda u: u.stack[-3], (dict,)),
                pickle.SETITEMS[0]: _guard(pickle.SETITEMS, lambda u: u.metastack[-1][-1], (dict,)),
                pickle.ADDITEMS[0]: _guard(pickle.ADDITEMS, lambda u: u.metastack[-1][-1], (set,))}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise LoadError(f"it names {module}.{name}, which DCP's metadata never "
                            "holds") from None


def read_dcp_metadata(folder: Path, sizes: dict[str, int]) -> dcp_metadata.Metadata:
    """The checkpoint's `.metadata`, unpickled through the allowlist and checked: only DCP's
    metadata classes, with shard files among `sizes` (name -> bytes) and within them."""
    path = Path(folder) / DCP_METADATA
    data = read_bounded(path, METADATA_LIMIT, follow_links=False)
    try:
        found = _MetadataUnpickler(io.BytesIO(data)).load()
    except LoadError as e:
        raise LoadError(f"{path}: refused: {e}") from None
    except Exception as e:  # any damage a pickle can hold: only allowlisted code has run
        raise LoadError(f"{path}: cannot read it ({type(e).__name__}: {first_line(e)})") from None
    try:
        _check_metadata(found, sizes)
    except LoadError as e:
        raise LoadError(f"{path}: refused: {e}") from None
    return found


def _fields(obj: Any, cls: type) -> dict[str, Any]:
    """The dataclass fields of `obj`, which must be exactly a `cls` with no other attributes."""
    if type(obj) is not cls:
        raise LoadError(f"expected a {cls.__name__}, found a {type(obj).__name__}")
    names = {f.name for f in fields(cls)}
    extra = set(vars(obj)) - names
    if extra:
        raise LoadError(f"a {cls.__name__} with unknown attributes {sorted(extra)}")
    try:  # a field that a pickle left out has its class default, or is missing
        return {name: getattr(obj, name) for name in names}
    except AttributeError as e:
        raise LoadError(f"a {cls.__name__} without {e.name}") from None


def _sizes(value: Any) -> bool:
    return type(value) is torch.Size and all(type(n) is int and n >= 0 for n in value)


def _optional(value: Any, *types: type) -> bool:
    return value is None or isinstance(value, types)


def _check_metadata(found: Any, sizes: dict[str, int]) -> None:
    top = _fields(found, dcp_metadata.Metadata)
    items, storage = top["state_dict_metadata"], top["storage_data"]
    if not isinstance(items, dict) or not isinstance(storage, dict):
        raise LoadError("state_dict_metadata and storage_data must be tables")
    for key, item in items.items():
        if not isinstance(key, str):
            raise LoadError(f"a state key {key!r} that is not a string")
        if type(item) is not dcp_metadata.BytesStorageMetadata:
            _check_tensor(key, item)
    for index, where in storage.items():
        _check_storage(index, where, items, sizes)
    planner = top["planner_data"]
    if not _optional(planner, dict) or any(
            not isinstance(k, str) or not isinstance(path, (tuple, list))
            or not all(isinstance(p, (str, int)) for p in path) for k, path in (planner or {}).items()):
        raise LoadError("planner_data must map keys to paths")
    if top["storage_meta"] is not None:
        meta = _fields(top["storage_meta"], dcp_metadata.StorageMeta)
        if not (_optional(meta["checkpoint_id"], str, os.PathLike)
                and _optional(meta["save_id"], str) and _optional(meta["load_id"], str)
                and isinstance(meta["modules"], list)
                and all(isinstance(m, str) for m in meta["modules"])):
            raise LoadError("storage_meta holds values of the wrong type")
    if not _optional(top["version"], str):
        raise LoadError("version must be a string")


def _check_tensor(key: str, item: Any) -> None:
    tensor = _fields(item, dcp_metadata.TensorStorageMetadata)
    props = _fields(tensor["properties"], dcp_metadata.TensorProperties)
    ok = (isinstance(props["dtype"], torch.dtype) and isinstance(props["layout"], torch.layout)
          and isinstance(props["memory_format"], torch.memory_format)
          and type(props["requires_grad"]) is bool and type(props["pin_memory"]) is bool
          and _sizes(tensor["size"]) and isinstance(tensor["chunks"], list))
    if not ok:
        raise LoadError(f"{key}: tensor properties of the wrong type")
    for chunk in tensor["chunks"]:
        parts = _fields(chunk, dcp_metadata.ChunkStorageMetadata)
        if not (_sizes(parts["offsets"]) and _sizes(parts["sizes"])
                and len(parts["offsets"]) == len(parts["sizes"]) == len(tensor["size"])):
            raise LoadError(f"{key}: a chunk that does not fit its tensor")


def _check_storage(index: Any, where: Any, items: dict, sizes: dict[str, int]) -> None:
    """A stored item: a known key, in a listed shard file, within its bytes, untransformed."""
    key = _fields(index, dcp_metadata.MetadataIndex)
    if key["fqn"] not in items or not (key["offset"] is None or _sizes(key["offset"])) \
            or not _optional(key["index"], int):
        raise LoadError(f"storage of an unknown or malformed key {key['fqn']!r}")
    info = _fields(where, filesystem._StorageInfo)
    name, offset, length = info["relative_path"], info["offset"], info["length"]
    if not isinstance(name, str) or name not in sizes or name == DCP_METADATA:
        raise LoadError(f"{key['fqn']} is stored in {name!r}, which is not a listed shard file")
    if not (type(offset) is int and type(length) is int and 0 <= offset
            and 0 <= length <= sizes[name] - offset):
        raise LoadError(f"{key['fqn']}: bytes {offset!r}+{length!r} are outside {name}")
    if info["transform_descriptors"]:  # compression and the like: never written by dptrain
        raise LoadError(f"{key['fqn']}: stored with transforms {info['transform_descriptors']!r}")


class _SafeReader(filesystem.FileSystemReader):
    """DCP's file reader, handing DCP the `.metadata` that read_dcp_metadata has checked
    (read_metadata takes no rank: DCP then never looks for per-rank metadata files)."""

    def __init__(self, folder: Path, checked: dcp_metadata.Metadata):
        super().__init__(folder)
        self.checked = checked

    def read_metadata(self) -> dcp_metadata.Metadata:
        if self.checked.storage_meta is None:
            self.checked.storage_meta = dcp_metadata.StorageMeta()
        self.checked.storage_meta.load_id = self.load_id  # as FileSystemReader's does
        return self.checked


class _SafePlanner(DefaultLoadPlanner):
    """DCP's planner, with the shards' non-tensor items loaded with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise LoadError(f"item {read_item.dest_index.fqn}: refused: it holds more than "
                            f"plain values ({weights_only_reason(e)})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # as the parent

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def dcp_load(state: dict[str, Any], folder: Path) -> None:
    """dcp.load of `folder` into `state`, in place; LoadError in one line if it fails.

    `state` is also what the checkpoint must hold (for a model and optimizer, get_state_dict's,
    whose optimizer state is initialized): before anything is read, each of its tensors must
    be stored with the same global shape and dtype, in chunks that tile it, each in a bounded,
    uncompressed archive; after, every setting must be what it was (the lr aside: see
    statecheck.RUNNING) and every tensor finite. Without a process group, it reads every shard
    into the full tensors of `state`.
    """
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(folder)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    checked = read_dcp_metadata(folder, sizes)
    expected, _ = flatten_state_dict(state)
    settings = {key: copy.deepcopy(value) for key, value in expected.items()
                if not isinstance(value, torch.Tensor)}
    try:
        for key, value in expected.items():
            _check_item(key, value, checked.state_dict_metadata.get(key))
        _check_archives(folder, checked, expected)
    except LoadError as e:
        raise LoadError(f"{folder}: {e}") from None
    reader = _SafeReader(folder, checked)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=_SafePlanner())
    except CheckpointException as e:  # each rank's exception, wrapped
        causes = [failure[0] if isinstance(failure, tuple) else failure
                  for failure in e.failures.values()]
        cause = next((c for c in causes if isinstance(c, LoadError)), causes[0] if causes else e)
        if isinstance(cause, LoadError):  # the reader's name their file; the planner's do not
            text = str(cause)
            raise LoadError(text if text.startswith(str(folder)) else f"{folder}: {text}") from None
        raise LoadError(f"{folder}: cannot load it ({type(cause).__name__}: "
                        f"{first_line(cause)})") from None
    loaded, _ = flatten_state_dict(state)
    try:
        for key, value in loaded.items():
            if key in settings:
                check_value(value, settings[key], key)
            else:
                check_tensor(value, expected[key], key)
    except LoadError as e:
        raise LoadError(f"{folder}: {e}") from None


def _check_item(key: str, value: Any, item: Any) -> None:
    """The checkpoint stores `key` as `value` needs: a tensor of its global shape and dtype,
    tiled by its chunks, or a plain item."""
    if item is None:
        raise StateMismatch(f"it lacks {key}, which the run's config needs")
    if not isinstance(value, torch.Tensor):
        if type(item) is not dcp_metadata.BytesStorageMetadata:
            raise StateMismatch(f"{key} is stored as a tensor, where the run has a "
                                "setting")
        return
    if type(item) is not dcp_metadata.TensorStorageMetadata:
        raise StateMismatch(f"{key} is not stored as a tensor")
    dtype = item.properties.dtype
    if tuple(item.size) != tuple(value.shape) or dtype != value.dtype:
        raise StateMismatch(f"{key} is a {_name(dtype)} tensor of shape "
                            f"{list(item.size)}, where the run's config gives "
                            f"{_name(value.dtype)} {list(value.shape)}")
    inside = all(o + n <= s for c in item.chunks for o, n, s in zip(c.offsets, c.sizes, item.size))
    if not inside or sum(math.prod(c.sizes) for c in item.chunks) != math.prod(item.size):
        raise StateMismatch(f"the chunks of {key} do not tile its shape "
                            f"{list(item.size)}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_archives(folder: Path, checked: dcp_metadata.Metadata,
                    expected: dict[str, Any]) -> None:
    """Each item that will be read is a torch.save archive that torch.load reads within its
    bytes: its tensor chunk's, plus ITEM_OVERHEAD (check_archive)."""
    items = checked.state_dict_metadata
    for index, where in checked.storage_data.items():
        if index.fqn not in expected:
            continue  # never read
        limit = ITEM_OVERHEAD
        item = items[index.fqn]
        if type(item) is dcp_metadata.TensorStorageMetadata:
            chunk = next((c for c in item.chunks if c.offsets == index.offset), None)
            if chunk is None:
                raise StateMismatch(f"{index.fqn} is stored at offsets "
                                    f"{index.offset!r}, which no chunk has")
            limit += math.prod(chunk.sizes) * item.properties.dtype.itemsize
        if where.length > limit:
            raise LoadError(f"{where.relative_path}: refused: {index.fqn} takes {where.length:,} "
                            f"bytes, more than the {limit:,} it can need")
        with open_regular(folder / where.relative_path, follow_links=False) as f:
            f.seek(where.offset)
            data = f.read(where.length)
        try:
            check_archive(io.BytesIO(data), len(data), limit)
        except LoadError as e:
            raise LoadError(f"{where.relative_path}: {index.fqn}: {e}") from None
