"""JIT options and numeric constants of the kernels, in one place (nothing hard-coded in decorators)."""

from __future__ import annotations

import os

# cache=True: the gateway must be ready in seconds, so compiled kernels are reused across starts.
# nogil=True: the server runs kernels in a thread pool; they must not hold the GIL.
# NUMBA_DISABLE_JIT=1 runs the same code as plain Python (coverage, debugging).
JIT: dict = {"cache": True, "nogil": True, "error_model": "numpy"}
if os.environ.get("BANDGATE_JIT_NOCACHE"):
    JIT["cache"] = False

# --- wire format v1 (docs/wire-format.md) -------------------------------------------------------
FRAME_MAGIC = 0x4742  # bytes b"BG" read as little-endian u16
FORMAT_VERSION = 1  # the version this decoder reads and the encoder writes
FRAME_HEADER_LEN = 56  # v1 fixed header; later versions may append fields (header_len grows)
BATCH_MAGIC = 0x54424742  # bytes b"BGBT" read as little-endian u32
BATCH_HEADER_LEN = 12  # magic, frame count, index CRC; then one u32 length per frame
ACCEL_BLOCK = 64  # residuals per width block, per axis
RR_SECTION_HEADER = 4  # u32 time of the first beat, ms after the frame start

# Frame flags (u16).
FLAG_DATA_DROPPED_BEFORE = 1 << 0  # the band lost samples between the previous frame and this one
FLAG_CLOCK_ADJUSTED = 1 << 1  # the band's clock was corrected since the previous frame

# Plausibility bounds for header fields: outside them the frame is refused as IMPLAUSIBLE_VALUE.
MIN_SAMPLE_RATE_MHZ = 1_000  # 1 Hz
MAX_SAMPLE_RATE_MHZ = 1_000_000  # 1 kHz
MIN_START_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z
MAX_START_US = 4_102_444_800_000_000  # 2100-01-01T00:00:00Z
MAX_UTC_OFFSET_MIN = 18 * 60
ACCEL_RANGES_G = (2, 4, 8, 16)
MIN_ACCEL_BITS = 8
MAX_ACCEL_BITS = 16
MAX_HR_BPM = 250  # 0 means "no reading"; 1..MIN_HR_BPM-1 and above MAX are implausible
MIN_HR_BPM = 20

# --- batches --------------------------------------------------------------------------------------
# Every decompression is bounded: a batch that would expand past this is refused before allocation.
MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024
ZSTD_LEVEL = 3
