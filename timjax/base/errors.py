"""User-facing errors.

Everything a user can cause (a bad checkpoint, a bad config, an output directory in the way) raises a
``TimjaxError`` subclass whose message is one line naming the file (and tensor) at fault. The CLI prints
such errors as ``timjax: error: <message>`` without a traceback.
"""

from __future__ import annotations


class TimjaxError(Exception):
    """Base class of the errors the CLI reports as one line, without a traceback."""


class ParameterError(TimjaxError, ValueError):
    """A bad argument of the API or the CLI: ``invalid <parameter>=<value>: <what is allowed>`` (see
    ``timjax.base.validation``). Also a ValueError, which is what callers of a Python API expect."""


class CheckpointError(TimjaxError):
    """A checkpoint on disk that timjax cannot read or convert."""


class MissingFileError(CheckpointError):
    """A required file (config.json, weights, an indexed shard, timjax.json) is absent."""


class UnreadableFileError(CheckpointError):
    """A file or directory that exists but cannot be read (permissions, I/O error): the OS reason is given."""


class CorruptFileError(CheckpointError):
    """A file that exists but cannot be parsed (safetensors header, index JSON, timjax.json)."""


class TensorMissingError(CheckpointError):
    """A parameter the config requires is not in the checkpoint."""


class TensorShapeError(CheckpointError):
    """A tensor whose shape differs from the one the config implies."""


class TensorDtypeError(CheckpointError):
    """A tensor stored in a dtype timjax does not convert (only BF16, F16, F32)."""


class NonFiniteTensorError(CheckpointError):
    """A tensor holding NaN or inf (in the source, or made by a cast that overflows float16): a model built
    from it would sample garbage rather than fail."""


class UnexpectedTensorError(CheckpointError):
    """A tensor the config does not account for (refused rather than silently dropped)."""


class OutputWriteError(TimjaxError):
    """Writing the output failed (disk full, file too large, permissions); the message names the file and
    the OS reason. The output directory is left untouched (conversions write to a temp dir first)."""


class OutputExistsError(TimjaxError):
    """The output directory exists and overwriting was not requested."""


class EngineFull(TimjaxError):
    """``Engine.add_request`` on a full waiting queue (``max_waiting``): try again later (HTTP 429/503)."""


class EngineStopped(TimjaxError):
    """``Engine.add_request`` on an engine that is stopping or stopped."""
