"""Batches on the wire: zstd compression of a frame container, and its bounded decompression.

Decompression is where a hostile sender could make the gateway allocate: python-zstandard's
`max_output_size` is ignored when a zstd frame declares its content size (measured: a 6 KB frame
declaring 200 MB allocated 200 MB). So the declared size is read from the frame header and checked
against the limit before anything is allocated, frames that do not declare it are refused, and the
window a frame may ask for is capped.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import numpy as np
import zstandard

from decoder import config

_CONTENTSIZE_UNKNOWN = zstandard.CONTENTSIZE_UNKNOWN
_CONTENTSIZE_ERROR = zstandard.CONTENTSIZE_ERROR
MAX_WINDOW_BYTES = 8 * 1024 * 1024  # level 3 uses at most 2 MiB; a band has far less memory than this


class BatchErrorCode(enum.Enum):
    """Why a batch failed as a whole (the gateway answers INVALID_ARGUMENT with the reason)."""

    BAD_ENVELOPE = "bad_envelope"  # the envelope's own fields disagree, or with the frames inside
    BAD_COMPRESSION = "bad_compression"
    BAD_CONTAINER = "bad_container"  # the decompressed bytes are not a frame container
    UNKNOWN_DICTIONARY = "unknown_dictionary"
    DICTIONARY_MISMATCH = "dictionary_mismatch"
    NO_CONTENT_SIZE = "no_content_size"
    TOO_LARGE = "too_large"


class BatchError(ValueError):
    """A batch that cannot be decompressed. `reason` is safe to log and to send back: no payload bytes."""

    def __init__(self, code: BatchErrorCode, reason: str):
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason

    def __reduce__(self) -> tuple:  # crosses from a compute worker process intact
        return type(self), (self.code, self.reason)


def compress_batch(
    container: bytes,
    *,
    level: int = config.ZSTD_LEVEL,
    dictionary: zstandard.ZstdCompressionDict | None = None,
    checksum: bool = False,
) -> bytes:
    """Compress a frame container as one zstd frame that declares its content size."""
    compressor = zstandard.ZstdCompressor(
        level=level, dict_data=dictionary, write_content_size=True, write_checksum=checksum
    )
    return compressor.compress(container)


class BatchDecompressor:
    """Bounded zstd decompression with a set of trained dictionaries known by their zstd dictionary ID.

    One instance per thread: zstandard decompressor objects are not thread-safe.
    """

    def __init__(
        self,
        *,
        max_bytes: int = config.MAX_DECOMPRESSED_BYTES,
        dictionaries: Mapping[int, zstandard.ZstdCompressionDict] | None = None,
    ):
        self.max_bytes = max_bytes
        self._plain = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
        self._by_dict = {
            dict_id: zstandard.ZstdDecompressor(dict_data=d, max_window_size=MAX_WINDOW_BYTES)
            for dict_id, d in (dictionaries or {}).items()
        }

    def decompress(self, data: bytes, *, dict_id: int = 0) -> np.ndarray:
        """The decompressed container as a uint8 array; raises BatchError, never allocates past the limit.

        `dict_id` is the envelope's claim; it must match the zstd frame's own dictionary ID.
        """
        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError:
            raise BatchError(BatchErrorCode.BAD_COMPRESSION, "not a zstd frame") from None
        if params.dict_id != dict_id:
            raise BatchError(
                BatchErrorCode.DICTIONARY_MISMATCH,
                f"the envelope names dictionary {dict_id}, the zstd frame {params.dict_id}",
            )
        size = params.content_size
        if size in (_CONTENTSIZE_UNKNOWN, _CONTENTSIZE_ERROR):
            raise BatchError(BatchErrorCode.NO_CONTENT_SIZE, "the zstd frame must declare its content size")
        if size > self.max_bytes:
            raise BatchError(
                BatchErrorCode.TOO_LARGE,
                f"declares {size} bytes decompressed, over max_decompressed_bytes = {self.max_bytes}",
            )
        decompressor = self._plain
        if dict_id:
            decompressor = self._by_dict.get(dict_id)
            if decompressor is None:
                raise BatchError(BatchErrorCode.UNKNOWN_DICTIONARY, f"no dictionary with ID {dict_id}")
        try:
            out = decompressor.decompress(data, max_output_size=self.max_bytes, allow_extra_data=False)
        except zstandard.ZstdError as e:
            # zstd's messages name the failure (checksum, corrupt block, window too large), never the data.
            raise BatchError(BatchErrorCode.BAD_COMPRESSION, f"zstd: {e}") from None
        if len(out) != size:
            raise BatchError(
                BatchErrorCode.BAD_COMPRESSION, "decompressed size differs from the declared one"
            )
        return np.frombuffer(out, dtype=np.uint8)


def train_dictionary(containers: list[bytes], *, size: int = 16 * 1024) -> zstandard.ZstdCompressionDict:
    """Train a zstd dictionary on sample containers; its zstd ID is what batches refer to."""
    if len(containers) < 8:
        raise ValueError(f"need at least 8 sample batches to train a dictionary, got {len(containers)}")
    return zstandard.train_dictionary(size, containers)


def load_dictionary(data: bytes) -> zstandard.ZstdCompressionDict:
    """A dictionary from its file bytes (as written by `bandgate dict train`)."""
    d = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT)
    if d.dict_id() == 0:
        raise ValueError("not a zstd dictionary (no dictionary ID)")
    return d
