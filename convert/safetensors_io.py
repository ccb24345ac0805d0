"""Reading and writing safetensors checkpoints with numpy only (no torch).

Reading uses the ``safetensors`` library (``safe_open(..., framework="numpy")``; bf16 comes back as
``ml_dtypes.bfloat16``). A checkpoint is opened once to parse every shard's header (names, shapes, dtypes:
cheap, no tensor data), then tensors are read group by group, each group with its own short-lived
``safe_open`` so the shard's memory map is dropped between groups and resident memory stays near one layer.

Writing streams: the header is computed from the tensor specs up front and each tensor's bytes are written
as they are produced, so memory never holds a whole shard.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype, which safe_open(framework="numpy") needs)
import numpy as np
from safetensors import SafetensorError, safe_open

from timjax.base.errors import (
    CorruptFileError,
    MissingFileError,
    NonFiniteTensorError,
    OutputExistsError,
    OutputWriteError,
    TensorDtypeError,
    TimjaxError,
    UnreadableFileError,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Files copied alongside the weights (whichever exist), in both directions.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)

_ST_TO_NP = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}

DTYPE_NAMES = {"bfloat16": _ST_TO_NP["BF16"], "float16": _ST_TO_NP["F16"], "float32": _ST_TO_NP["F32"]}
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
}


def resolve_dtype(dtype) -> np.dtype:
    """``"bfloat16"``/``"bf16"``/``np.float16``/``jnp.float32``/... -> a numpy dtype among bf16, f16, f32."""
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
        if name.startswith("torch."):
            name = name[len("torch.") :]
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        raise TimjaxError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TimjaxError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}") from None
    if dt not in _NP_TO_ST:
        raise TimjaxError(f"unsupported dtype {dt}: choose one of {', '.join(DTYPE_NAMES)}")
    return dt


def dtype_name(dt: np.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[np.dtype(dt)]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: "BF16", "F32", ...

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ST_TO_NP.get(self.dtype, np.dtype(np.uint8)).itemsize


def check_readable(path: Path) -> None:
    """An existing file or directory that cannot be read is reported as such, with the OS reason, rather
    than as missing (``Path.is_file()`` and safetensors both say "No such file" for an unreadable one)."""
    path = Path(path)
    what = "file"
    try:
        if path.is_dir():
            what = "directory"
            os.listdir(path)
        elif path.exists():
            open(path, "rb").close()
        elif not path.parent.exists() or os.access(path.parent, os.X_OK):
            return  # really missing: the caller's "not found" message is the right one
        else:
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UnreadableFileError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def _open(path: Path):
    check_readable(path)
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as e:
        raise CorruptFileError(f"{path}: corrupted safetensors file ({e})") from None


def read_header(path: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes of the tensors in one safetensors file (reads no tensor data)."""
    with _open(path) as f:
        out = []
        for name in f.keys():
            try:
                s = f.get_slice(name)
                out.append(TensorInfo(name, path, tuple(int(d) for d in s.get_shape()), str(s.get_dtype())))
            except SafetensorError as e:
                raise CorruptFileError(f"{path}: corrupted safetensors file at tensor {name} ({e})") from None
    return out


# exponent bits of each float type: a value is NaN or inf exactly when all of them are set
_EXPONENT = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
}


def _all_finite(y: np.ndarray) -> bool:
    """Chunked, with one small reused buffer: ``|bits| < exponent mask`` (a SIMD max over the sign-cleared bits,
    ~6x faster than ``np.isfinite`` on bfloat16, which goes through a float conversion)."""
    flat = y.reshape(-1)
    step = 1 << 20
    if y.dtype not in _EXPONENT:
        return all(np.isfinite(flat[i : i + step]).all() for i in range(0, flat.size, step))
    utype, mask = _EXPONENT[y.dtype]
    bits = flat.view(utype)
    tmp = np.empty(min(step, bits.size), utype)
    sign_clear = np.array((1 << (8 * bits.itemsize - 1)) - 1, utype)  # every bit but the sign
    for i in range(0, bits.size, step):
        chunk = bits[i : i + step]
        out = tmp[: chunk.size]
        np.bitwise_and(chunk, sign_clear, out=out)
        if out.size and out.max() >= mask:
            return False
    return True


def check_finite(where: str, name: str, y: np.ndarray, source: np.ndarray | None = None) -> None:
    """Refuse NaN / inf weights (issue 10: a NaN model generated token 0 forever and reported "length").

    Converters read every tensor anyway; the scan costs about a third of reading the tensor from the page
    cache (bench/reliability.py). ``source`` (the tensor before a cast) tells a broken checkpoint from a
    cast that overflows float16."""
    if _all_finite(y):
        return
    if source is not None and source.dtype != y.dtype and _all_finite(np.ascontiguousarray(source)):
        raise NonFiniteTensorError(
            f"{where}: tensor {name} overflows {dtype_name(y.dtype)} (values beyond its range become inf); "
            f"use bfloat16 or float32"
        )
    flat = y.reshape(-1)
    bad = int(np.count_nonzero(~np.isfinite(flat)))
    raise NonFiniteTensorError(f"{where}: tensor {name} has {bad} non-finite values (NaN or inf) of {flat.size}")


def check_dtype(info: TensorInfo) -> None:
    if info.dtype not in _ST_TO_NP:
        raise TensorDtypeError(
            f"{info.file}: tensor {info.name} has dtype {info.dtype}; only {', '.join(_ST_TO_NP)} are supported"
        )


@dataclass
class HFWeights:
    """The safetensors files of a Hugging Face checkpoint directory and the tensors they hold."""

    directory: Path
    source: Path  # model.safetensors or the index: what error messages about missing tensors name
    files: list[Path]  # in the order to read them
    tensors: dict[str, TensorInfo]

    @classmethod
    def scan(cls, directory: str | Path) -> "HFWeights":
        directory = Path(directory)
        single, index = directory / SINGLE_FILE, directory / INDEX_FILE
        if single.is_file():  # transformers prefers the single file too
            source, files = single, [single]
            claimed: dict[str, str] | None = None
        elif index.is_file():
            source = index
            try:
                raw = json.loads(index.read_text())
                weight_map = raw["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptFileError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            claimed = {str(k): str(v) for k, v in weight_map.items()}
            files = []
            for shard in dict.fromkeys(claimed.values()):  # first-appearance order, deduplicated
                path = directory / shard
                if not path.is_file():
                    raise MissingFileError(f"{index}: shard {shard} named in weight_map not found in {directory}")
                files.append(path)
        else:
            hint = ""
            if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
                hint = " (torch .bin/.pt checkpoints are not supported: re-save with save_pretrained(safe_serialization=True))"
            raise MissingFileError(f"{directory}: no weights found: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")

        tensors: dict[str, TensorInfo] = {}
        for path in files:
            for info in read_header(path):
                if info.name in tensors:
                    raise CorruptFileError(
                        f"{path}: tensor {info.name} is stored twice (also in {tensors[info.name].file.name})"
                    )
                tensors[info.name] = info
        if claimed is not None:
            for name, shard in claimed.items():
                if name not in tensors or tensors[name].file.name != Path(shard).name:
                    raise CorruptFileError(
                        f"{index}: tensor {name} is mapped to {shard} but that file does not contain it"
                    )
        return cls(directory, source, files, tensors)

    def read(self, infos: Iterable[TensorInfo]) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Read the given tensors (all from one file) into fresh arrays.

        The header was parsed and validated by ``safe_open`` in :meth:`scan`; the data is read with plain
        ``readinto`` at the header's offsets rather than through ``safe_open``'s memory map, whose touched
        pages would count as resident memory on top of the copy (2x a 1.2 GB embedding).
        """
        infos = list(infos)
        if not infos:
            return
        path = infos[0].file
        assert all(i.file == path for i in infos)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            base = 8 + n
            for info in infos:
                begin, end = header[info.name]["data_offsets"]
                x = np.empty(info.shape, dtype=_ST_TO_NP[info.dtype])
                buf = x.reshape(-1).view(np.uint8)
                if end - begin != buf.size:
                    raise CorruptFileError(f"{path}: tensor {info.name} has {end - begin} bytes for shape {info.shape}")
                f.seek(base + begin)
                if f.readinto(buf) != buf.size:
                    raise CorruptFileError(f"{path}: truncated while reading tensor {info.name}")
                yield info, x
                del x, buf


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps large freed arenas resident otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _header_bytes(
    specs: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, int]:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dt, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _NP_TO_ST[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to an 8-byte boundary
    return struct.pack("<Q", len(raw)) + raw, offset


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: specs first (they fix the header), then the data in order."""

    def __init__(
        self,
        path: Path,
        specs: list[tuple[str, np.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        *,
        shown: Path | None = None,
    ):
        self.path = Path(path)
        self.shown = shown or self.path  # the name errors give (the final path, not the temp dir's)
        self.specs = [(n, np.dtype(d), tuple(s)) for n, d, s in specs]
        header, self.data_bytes = _header_bytes(self.specs, metadata)
        self._f = None
        with self._io():
            self._f = open(self.path, "wb")
            self._f.write(header)
        self._next = 0

    @contextmanager
    def _io(self):
        try:
            yield
        except OSError as e:  # disk full, file too large, ...: one line naming the file, not the temp path
            raise OutputWriteError(
                f"{self.shown}: cannot write ({e.strerror or e} [errno {e.errno}]); "
                f"the output directory is left as it was"
            ) from None

    def write(self, name: str, x: np.ndarray) -> None:
        want_name, want_dt, want_shape = self.specs[self._next]
        if name != want_name or x.dtype != want_dt or tuple(x.shape) != want_shape:
            raise AssertionError(f"writer expected {want_name} {want_dt} {want_shape}, got {name} {x.dtype} {x.shape}")
        with self._io():
            self._f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            self._f.close()
            raise AssertionError(f"{self.path}: {len(self.specs) - self._next} tensors never written")
        with self._io():
            self._f.close()  # flushes: a full disk may show only here

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass  # the write already failed; the temp dir goes away


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy whichever tokenizer / generation-config files exist in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


@contextmanager
def staged_output_dir(out_dir: str | Path, overwrite: bool, *, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temp dir next to ``out_dir``; on success it replaces ``out_dir``, on any failure it is removed.

    A failure therefore leaves neither ``out_dir`` nor temp litter; an existing ``out_dir`` is refused unless
    ``overwrite`` (and survives intact if the job fails).
    """
    out = Path(out_dir).absolute()
    for p in protect:
        p = Path(p).resolve()
        if out.resolve() == p or p in out.resolve().parents:
            raise OutputExistsError(f"{out}: refusing to write the output into the source checkpoint {p}")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output directory exists (pass --overwrite / overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputExistsError(
                    f"{out}: output directory appeared while writing (pass --overwrite to replace it)"
                )
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = _written_path(e, tmp, out)
        if where is None:
            raise
        raise OutputWriteError(
            f"{where}: cannot write ({e.strerror or e} [errno {e.errno}]); the output directory is left as it was"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


def _written_path(e: OSError, tmp: Path, out: Path) -> Path | None:
    """The output path an OSError is about (its temp path mapped to the final one), or None when it is not
    a failure to write the output (a read error keeps its own message)."""
    for name in (e.filename, e.filename2):
        if name:
            try:
                return out / Path(name).absolute().relative_to(tmp)
            except ValueError:
                continue
    return out if e.errno in _WRITE_ERRNOS else None
