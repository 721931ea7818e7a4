"""Low-level Numba helpers: unaligned little-endian loads and CRC-32C.

Why intrinsics: reading a u64 byte by byte costs eight loads and shifts per word in Numba; one unaligned
load is what a C decoder would do. CRC-32C uses the SSE4.2 `crc32` instruction where the host has it
(about 8 bytes per 3 cycles) and a table otherwise, so the per-frame check stays far cheaper than decoding.
The wire format is little-endian and so are the hosts we target (x86-64, aarch64).
"""

from __future__ import annotations

import sys

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from decoder import config

if sys.byteorder != "little":  # pragma: no cover - no such host in the fleet
    raise ImportError("bandgate's decoder needs a little-endian host")


def _make_load(bits: int, result: types.Integer, *, signed: bool = False):
    @intrinsic
    def _load(typingctx, arr, idx):
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            index = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = builder.gep(builder.bitcast(ary.data, ir.IntType(8).as_pointer()), [index])
            value = builder.load(builder.bitcast(ptr, ir.IntType(bits).as_pointer()), align=1)
            stored = types.Integer(f"{'int' if signed else 'uint'}{bits}")
            return context.cast(builder, value, stored, sig.return_type)

        return result(arr, idx), codegen

    return _load


# Callers guarantee `idx + bits/8 <= arr.size`; these do no bounds check of their own.
load_u16 = _make_load(16, types.int64)
load_u32 = _make_load(32, types.int64)
load_u64 = _make_load(64, types.uint64)
load_i16 = _make_load(16, types.int16)
# One residual byte, sign-extended (the decode loops' load).
load_i8 = _make_load(8, types.int64, signed=True)


@intrinsic
def _hw_crc32c_u64(typingctx, crc, value):
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse42.crc32.64.64")
        return builder.call(fn, args)

    return types.uint64(types.uint64, types.uint64), codegen


@intrinsic
def _hw_crc32c_u8(typingctx, crc, value):
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32), ir.IntType(8)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse42.crc32.32.8")
        c32 = builder.trunc(args[0], ir.IntType(32))
        return builder.zext(builder.call(fn, [c32, args[1]]), ir.IntType(64))

    return types.uint64(types.uint64, types.uint8), codegen


def _crc_table() -> np.ndarray:
    poly = 0x82F63B78  # CRC-32C (Castagnoli), reflected
    table = np.zeros(256, dtype=np.uint64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table[i] = c
    return table


_TABLE = _crc_table()


@njit(**config.JIT)
def crc32c_update_hw(buf, start, end, crc):
    """Continue a CRC-32C (pre-inverted state `crc`) over buf[start:end] with the SSE4.2 instruction."""
    c = np.uint64(crc)
    i = start
    while i + 8 <= end:
        c = _hw_crc32c_u64(c, load_u64(buf, i))
        i += 8
    while i < end:
        c = _hw_crc32c_u8(c, np.uint8(buf[i]))
        i += 1
    return np.int64(c)


@njit(**config.JIT)
def crc32c_update_sw(buf, start, end, crc):
    """Table-driven CRC-32C, for hosts without the instruction; same contract as the hardware path."""
    c = np.int64(crc)
    for i in range(start, end):
        c = np.int64(_TABLE[(c ^ np.int64(buf[i])) & 0xFF]) ^ (c >> 8)
    return c


def _host_has_sse42() -> bool:
    try:
        return bool(llvm.get_host_cpu_features().get("sse4.2", False))
    except Exception:  # pragma: no cover - llvmlite without feature query
        return False


HARDWARE_CRC = _host_has_sse42()
crc32c_update = crc32c_update_hw if HARDWARE_CRC else crc32c_update_sw


def crc32c(data: bytes | np.ndarray) -> int:
    """CRC-32C of `data` through the kernel path (used by tests to cross-check the reference package)."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    return int(crc32c_update(buf, 0, buf.size, 0xFFFFFFFF) ^ 0xFFFFFFFF)


@intrinsic
def store_i16(typingctx, arr, idx, value):
    """arr[idx] = low 16 bits of value, for an int16 array, without the negative-index fix-up."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        index = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.gep(builder.bitcast(ary.data, ir.IntType(16).as_pointer()), [index])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store(builder.trunc(v, ir.IntType(16)), ptr)
        return context.get_dummy_value()

    return types.none(arr, idx, value), codegen
