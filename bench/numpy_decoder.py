"""The baseline the decode kernel is measured against: a straightforward vectorised numpy decoder."""

from __future__ import annotations

import struct

import numpy as np

HEADER = struct.Struct("<HBBHHQIIqhBBIIHHII")
BLOCK = 64


def decode_numpy(buf: bytes) -> list[np.ndarray]:
    """A straightforward vectorised numpy decoder of the same format (the benchmark's baseline).

    What a competent user would write with np.frombuffer and np.cumsum: per frame and axis, the
    residuals are gathered block by block and integrated twice. Assumes valid frames (no CRC, no checks),
    so the comparison flatters numpy, not the kernel.
    """
    count = struct.unpack_from("<I", buf, 4)[0]
    lengths = np.frombuffer(buf, "<u4", count, 12)
    pos = 12 + 4 * count
    out = []
    for length in lengths:
        h = HEADER.unpack_from(buf, pos)
        n = h[13]
        p = pos + h[3]
        nres = n - 1
        nblocks = -(-nres // BLOCK)
        anchors = np.frombuffer(buf, "<i2", 3, p)
        widths = np.frombuffer(buf, np.uint8, 3 * nblocks, p + 6).reshape(3, nblocks)
        q = p + 6 + 3 * nblocks
        axes = []
        for a in range(3):
            sizes = np.minimum(BLOCK, nres - np.arange(nblocks) * BLOCK)
            if (widths[a] == 1).all():
                res = np.frombuffer(buf, np.int8, nres, q).astype(np.int64)
                q += nres
            else:
                parts = []
                for w, k in zip(widths[a], sizes, strict=True):
                    if w == 1:
                        parts.append(np.frombuffer(buf, np.int8, k, q).astype(np.int64))
                    else:
                        lo = np.frombuffer(buf, np.uint8, k, q).astype(np.int64)
                        hi = np.frombuffer(buf, np.int8, k, q + k).astype(np.int64)
                        parts.append(lo | (hi << 8))
                    q += w * k
                res = np.concatenate(parts)
            values = np.empty(n, np.int64)
            values[0] = anchors[a]
            values[1:] = anchors[a] + np.cumsum(np.cumsum(res))
            axes.append(values.astype(np.int16))
        out.append(np.stack(axes, axis=1))
        pos += int(length)
    return out
