#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""svq.py: shadow virtqueues for Linux vhost-vdpa devices.

A vDPA device reads and writes guest memory by itself, so the hypervisor cannot
see which pages it dirtied.  A shadow virtqueue (SVQ) sits between the guest's
split ring and the device: it copies each guest descriptor chain into a shadow
ring it owns, translates guest addresses into the device's IOVA space, forwards
kicks (guest -> device) and calls (device -> guest), and writes the guest's
used ring itself, logging every page the device wrote.

    python3 svq.py /dev/vhost-vdpa-0            # built-in driver, shadow mode
    python3 svq.py /dev/vhost-vdpa-0 --direct   # same driver, no shadow
    python3 svq.py info /dev/vhost-vdpa-0       # identity and capabilities

Python 3.8+, standard library only.  Importing this module has no side effects.
The file reads top to bottom: uapi, errors, helpers, IOVA map, device, split
ring, shadow virtqueue, event loop, built-in driver, vhost-user, CLI.
"""

import signal

if __name__ == "__main__":
    # Run as a program: a SIGINT or SIGTERM while the modules below load (tens
    # of milliseconds) is noted, and main() reports it, instead of a
    # traceback from the middle of an import.
    _EARLY_SIGNALS = []
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import argparse
import array
import bisect
import ctypes
import errno
import fcntl
import json
import math
import mmap
import os
import selectors
import socket
import stat
import struct
import sys
import threading
import time
import zlib

__version__ = "0.1.0"

# ============================================================================
# uapi: ioctl encoding (include/uapi/asm-generic/ioctl.h)
# ============================================================================

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction, type_, nr, size):
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _IO(type_, nr):
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_, nr, ctype):
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(ctype))


def _IOW(type_, nr, ctype):
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


def _IOWR(type_, nr, ctype):
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


# ============================================================================
# uapi: structures (include/uapi/linux/vhost_types.h), named as in the kernel
# ============================================================================

class vhost_vring_state(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint), ("num", ctypes.c_uint)]


class vhost_vring_file(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint), ("fd", ctypes.c_int)]


class vhost_vring_addr(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint), ("flags", ctypes.c_uint),
                ("desc_user_addr", ctypes.c_uint64),
                ("used_user_addr", ctypes.c_uint64),
                ("avail_user_addr", ctypes.c_uint64),
                ("log_guest_addr", ctypes.c_uint64)]


class vhost_iotlb_msg(ctypes.Structure):
    _fields_ = [("iova", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("uaddr", ctypes.c_uint64), ("perm", ctypes.c_uint8),
                ("type", ctypes.c_uint8)]


class _vhost_msg_union(ctypes.Union):
    _fields_ = [("iotlb", vhost_iotlb_msg), ("padding", ctypes.c_uint8 * 64)]


class vhost_msg(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", ctypes.c_int), ("u", _vhost_msg_union)]


class vhost_msg_v2(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", ctypes.c_uint32), ("asid", ctypes.c_uint32),
                ("u", _vhost_msg_union)]


class vhost_memory_region(ctypes.Structure):
    _fields_ = [("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64),
                ("flags_padding", ctypes.c_uint64)]


class vhost_memory(ctypes.Structure):
    _fields_ = [("nregions", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class vhost_vdpa_config(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint32), ("len", ctypes.c_uint32)]


class vhost_vdpa_iova_range(ctypes.Structure):
    _fields_ = [("first", ctypes.c_uint64), ("last", ctypes.c_uint64)]


# ============================================================================
# uapi: constants and ioctl numbers (include/uapi/linux/vhost.h, 6.12)
# ============================================================================

VHOST_FILE_UNBIND = -1
VHOST_VIRTIO = 0xAF
VHOST_PAGE_SIZE = 0x1000

VHOST_VRING_F_LOG = 0
VHOST_ACCESS_RO = 0x1
VHOST_ACCESS_WO = 0x2
VHOST_ACCESS_RW = 0x3
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_IOTLB_BATCH_BEGIN = 5
VHOST_IOTLB_BATCH_END = 6
VHOST_IOTLB_MSG = 0x1
VHOST_IOTLB_MSG_V2 = 0x2

VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27
VHOST_BACKEND_F_IOTLB_MSG_V2 = 0x1
VHOST_BACKEND_F_IOTLB_BATCH = 0x2
VHOST_BACKEND_F_IOTLB_ASID = 0x3
VHOST_BACKEND_F_SUSPEND = 0x4
VHOST_BACKEND_F_RESUME = 0x5
VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 0x6
VHOST_BACKEND_F_DESC_ASID = 0x7
VHOST_BACKEND_F_IOTLB_PERSIST = 0x8

_u8, _u16, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, _u64)
VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, _u64)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = _IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, vhost_memory)
VHOST_SET_LOG_BASE = _IOW(VHOST_VIRTIO, 0x04, _u64)
VHOST_SET_LOG_FD = _IOW(VHOST_VIRTIO, 0x07, ctypes.c_int)
VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
VHOST_SET_VRING_ERR = _IOW(VHOST_VIRTIO, 0x22, vhost_vring_file)
VHOST_SET_BACKEND_FEATURES = _IOW(VHOST_VIRTIO, 0x25, _u64)
VHOST_GET_BACKEND_FEATURES = _IOR(VHOST_VIRTIO, 0x26, _u64)
VHOST_VDPA_GET_DEVICE_ID = _IOR(VHOST_VIRTIO, 0x70, _u32)
VHOST_VDPA_GET_STATUS = _IOR(VHOST_VIRTIO, 0x71, _u8)
VHOST_VDPA_SET_STATUS = _IOW(VHOST_VIRTIO, 0x72, _u8)
VHOST_VDPA_GET_CONFIG = _IOR(VHOST_VIRTIO, 0x73, vhost_vdpa_config)
VHOST_VDPA_SET_CONFIG = _IOW(VHOST_VIRTIO, 0x74, vhost_vdpa_config)
VHOST_VDPA_SET_VRING_ENABLE = _IOW(VHOST_VIRTIO, 0x75, vhost_vring_state)
VHOST_VDPA_GET_VRING_NUM = _IOR(VHOST_VIRTIO, 0x76, _u16)
VHOST_VDPA_SET_CONFIG_CALL = _IOW(VHOST_VIRTIO, 0x77, ctypes.c_int)
VHOST_VDPA_GET_IOVA_RANGE = _IOR(VHOST_VIRTIO, 0x78, vhost_vdpa_iova_range)
VHOST_VDPA_GET_CONFIG_SIZE = _IOR(VHOST_VIRTIO, 0x79, _u32)
VHOST_VDPA_GET_AS_NUM = _IOR(VHOST_VIRTIO, 0x7A, ctypes.c_uint)
VHOST_VDPA_GET_VRING_GROUP = _IOWR(VHOST_VIRTIO, 0x7B, vhost_vring_state)
VHOST_VDPA_SET_GROUP_ASID = _IOW(VHOST_VIRTIO, 0x7C, vhost_vring_state)
VHOST_VDPA_SUSPEND = _IO(VHOST_VIRTIO, 0x7D)
VHOST_VDPA_RESUME = _IO(VHOST_VIRTIO, 0x7E)
VHOST_VDPA_GET_VRING_DESC_GROUP = _IOWR(VHOST_VIRTIO, 0x7F, vhost_vring_state)
VHOST_VDPA_GET_VQS_COUNT = _IOR(VHOST_VIRTIO, 0x80, _u32)
VHOST_VDPA_GET_GROUP_NUM = _IOR(VHOST_VIRTIO, 0x81, _u32)
VHOST_VDPA_GET_VRING_SIZE = _IOWR(VHOST_VIRTIO, 0x82, vhost_vring_state)

# Names of the ioctls above, for error messages ("VHOST_SET_VRING_ADDR(vq 1)").
IOCTL_NAMES = {v: k for k, v in sorted(globals().items())
               if k.startswith("VHOST_") and isinstance(v, int)
               and (v >> _IOC_TYPESHIFT) & 0xff == VHOST_VIRTIO}

# ============================================================================
# virtio: feature bits, status, ring layout, net and blk (include/uapi/linux)
# ============================================================================

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
DEVICE_TYPES = {VIRTIO_ID_NET: "net", VIRTIO_ID_BLOCK: "blk"}

VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80
STATUS_NAMES = {1: "ACKNOWLEDGE", 2: "DRIVER", 4: "DRIVER_OK", 8: "FEATURES_OK",
                0x40: "NEEDS_RESET", 0x80: "FAILED"}

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41

COMMON_FEATURE_NAMES = {
    24: "NOTIFY_ON_EMPTY", 26: "LOG_ALL", 27: "ANY_LAYOUT", 28: "INDIRECT_DESC",
    29: "EVENT_IDX", 30: "PROTOCOL_FEATURES", 32: "VERSION_1",
    33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER",
    36: "ORDER_PLATFORM", 37: "SR_IOV", 38: "NOTIFICATION_DATA",
    39: "NOTIF_CONFIG_DATA", 40: "RING_RESET", 41: "ADMIN_VQ"}

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_SPEED_DUPLEX = 63
NET_FEATURE_NAMES = {
    0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC",
    6: "GSO", 7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO",
    11: "HOST_TSO4", 12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO",
    15: "MRG_RXBUF", 16: "STATUS", 17: "CTRL_VQ", 18: "CTRL_RX",
    19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA", 21: "GUEST_ANNOUNCE", 22: "MQ",
    23: "CTRL_MAC_ADDR", 52: "DEVICE_STATS", 56: "VQ_NOTF_COAL", 57: "NOTF_COAL",
    58: "GUEST_USO4", 59: "GUEST_USO6", 60: "HOST_USO", 61: "HASH_REPORT",
    62: "GUEST_HDRLEN", 63: "SPEED_DUPLEX"}

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
BLK_FEATURE_NAMES = {
    0: "BARRIER", 1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO",
    6: "BLK_SIZE", 7: "SCSI", 9: "FLUSH", 10: "TOPOLOGY", 11: "CONFIG_WCE",
    12: "MQ", 13: "DISCARD", 14: "WRITE_ZEROES", 15: "LIFETIME",
    16: "SECURE_ERASE", 17: "ZONED"}

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512

BACKEND_FEATURE_NAMES = {0: "IOTLB_MSG_V1", 1: "IOTLB_MSG_V2", 2: "IOTLB_BATCH",
                         3: "IOTLB_ASID", 4: "SUSPEND", 5: "RESUME",
                         6: "ENABLE_AFTER_DRIVER_OK", 7: "DESC_ASID",
                         8: "IOTLB_PERSIST"}

# Split ring (virtio 1.x section 2.7): descriptor table, avail ring, used ring.
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VRING_DESC_SIZE = 16
VRING_USED_ELEM_SIZE = 8
# Packed ring (virtio 1.1 section 2.8): flag bit numbers and event flags.
VRING_PACKED_DESC_F_AVAIL = 7
VRING_PACKED_DESC_F_USED = 15
VRING_PACKED_EVENT_FLAG_ENABLE = 0x0
VRING_PACKED_EVENT_FLAG_DISABLE = 0x1
VRING_PACKED_EVENT_FLAG_DESC = 0x2
VRING_PACKED_EVENT_F_WRAP_CTR = 15
VIRTIO_NET_HDR_SIZE = 12          # struct virtio_net_hdr_v1 (VERSION_1)

# Precompiled little-endian layouts: the hot path only calls these.
_DESC = struct.Struct("<QIHH")      # struct vring_desc {addr, len, flags, next}
_USED_ELEM = struct.Struct("<II")   # struct vring_used_elem {id, len}
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
# A descriptor's second 64-bit word (len | flags << 32 | next << 48) with
# every flag but NEXT and WRITE cleared.
_DESC_KEEP = 0xffff0003ffffffff
_DESC_NEXT = VRING_DESC_F_NEXT << 32                    # flags in a descriptor's second word
_DESC_WRITE_NEXT = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) << 32
_DESC_WRITE = VRING_DESC_F_WRITE << 32
_DESC_INDIRECT = VRING_DESC_F_INDIRECT << 32
_EVENTFD_ONE = _U64.pack(1)

PAGE_SIZE = 4096
PAGE_SHIFT = 12


def vring_desc_size(num):
    return VRING_DESC_SIZE * num


def vring_avail_size(num):
    return 4 + 2 * num + 2            # flags, idx, ring[num], used_event


def vring_used_size(num):
    return 4 + VRING_USED_ELEM_SIZE * num + 2   # flags, idx, ring[num], avail_event


def vring_need_event(event_idx, new_idx, old_idx):
    """virtio spec 2.7.10: notify iff event_idx lies in [old_idx, new_idx)."""
    return ((new_idx - event_idx - 1) & 0xffff) < ((new_idx - old_idx) & 0xffff)


def vring_wants_notify(ring16, event_idx, event_i, flag, new_idx, old_idx):
    """After publishing `new_idx` (the caller has issued the full barrier), does
    the peer want to be notified?  `ring16` is the peer-written part, as 16-bit
    words, holding its suppression flag (word 0) and its event index (word
    `event_i`): the used ring for kicks (NO_NOTIFY, avail_event), the avail
    ring for calls (NO_INTERRUPT, used_event)."""
    if event_idx:
        return vring_need_event(ring16[event_i], new_idx, old_idx)
    return not ring16[0] & flag


def feature_names(bits, type_names=None):
    names = []
    for bit in range(64):
        if bits >> bit & 1:
            name = (type_names or {}).get(bit) if bit < 24 or bit > 41 else None
            name = name or COMMON_FEATURE_NAMES.get(bit) or "bit%d" % bit
            names.append(name)
    return names


def status_names(status):
    return [n for b, n in sorted(STATUS_NAMES.items()) if status & b] or ["RESET"]


# ============================================================================
# Errors
# ============================================================================

class SvqError(Exception):
    """Root of every error svq.py reports; str() is one line for the user."""


class UsageError(SvqError):
    """A bad option or argument."""


class DeviceError(SvqError):
    """A failed ioctl or IOTLB message: keeps errno, the request and the queue."""

    def __init__(self, op, err, vq=None, hint=None):
        self.op, self.errno, self.vq, self.hint = op, err, vq, hint
        where = op if vq is None else "%s(vq %d)" % (op, vq)
        msg = "%s: %s" % (where, os.strerror(err) if err else "failed")
        if hint:
            msg += " (%s)" % hint
        super().__init__(msg)


class IOVAError(SvqError):
    """IOVA space exhausted, overlapping or unknown mapping."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside an event loop (during set-up): unwinds like
    KeyboardInterrupt, so every `except BaseException` clean-up runs."""

    def __init__(self, signum):
        self.signum = signum
        super().__init__(signum)


class RingError(SvqError):
    """A guest ring or device broke the virtio rules; the queue stops."""

    def __init__(self, side, vq, idx, what):
        self.side, self.vq, self.idx, self.what = side, vq, idx, what
        super().__init__("%s ring vq %d index %d: %s" % (side, vq, idx, what))


# ============================================================================
# Low-level helpers: native code, memory barriers, eventfds, shared memory
# ============================================================================

_MACHINE = os.uname().machine
_IS_X86 = _MACHINE in ("x86_64", "i686", "i386", "amd64")
_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


# Two things Python and its standard library cannot express: an atomic OR into
# memory that other processes share (the vhost-user dirty log: QEMU clears its
# bits while every vhost backend of the VM sets them, in the same bytes), and
# a full memory barrier on a weakly ordered CPU.  Each is a few instructions,
# kept here as machine code, copied into a page that is then made read-only
# and executable, and called through ctypes.  Assembler source beside each.
#
#   or_bytes(block): block is an array of 64-bit words: base, limit, n, then
#       n words w: if w >> 8 < limit, atomically base[w >> 8] |= w & 0xff
#       (one pointer argument: each ctypes argument costs a conversion)
#   fence(): a full barrier (store-load included)
_NATIVE_CODE = {
    "x86_64": (bytes.fromhex(
        "488b5710"      # or_bytes: mov  rdx, [rdi+16]    n
        "488b4f08"      #           mov  rcx, [rdi+8]     limit
        "4889fe"        #           mov  rsi, rdi
        "488b3f"        #           mov  rdi, [rdi]       base
        "4885d2"        #           test rdx, rdx
        "741f"          #           je   done
        "488b4618"      # loop:     mov  rax, [rsi+24]    the next word
        "440fb6c0"      #           movzx r8d, al         mask
        "48c1e808"      #           shr  rax, 8           byte index
        "4839c8"        #           cmp  rax, rcx
        "7305"          #           jae  skip
        "f044080407"    #           lock or byte [rdi+rax], r8b
        "4883c608"      # skip:     add  rsi, 8
        "48ffca"        #           dec  rdx
        "75e1"          #           jne  loop
        "c3"            # done:     ret
        "0faef0"        # fence:    mfence
        "c3"),          #           ret
        0x33),
    "aarch64": (b"".join(struct.pack("<I", w) for w in (
        0xd5033bbf,     # or_bytes: dmb  ish              earlier stores first
        0xa9400c01,     #           ldp  x1, x3, [x0]     base, limit
        0xf9400802,     #           ldr  x2, [x0, #16]    n
        0x91006000,     #           add  x0, x0, #24
        0xb40001a2,     #           cbz  x2, done
        0xf8408404,     # loop:     ldr  x4, [x0], #8
        0x12001c85,     #           and  w5, w4, #0xff
        0xd348fc84,     #           lsr  x4, x4, #8
        0xeb03009f,     #           cmp  x4, x3
        0x540000c2,     #           b.hs skip
        0x8b040026,     #           add  x6, x1, x4
        0x085f7cc7,     # retry:    ldxrb w7, [x6]
        0x2a0500e7,     #           orr  w7, w7, w5
        0x08087cc7,     #           stxrb w8, w7, [x6]
        0x35ffffa8,     #           cbnz w8, retry
        0xf1000442,     # skip:     subs x2, x2, #1
        0x54fffea1,     #           b.ne loop
        0xd5033bbf,     # done:     dmb  ish
        0xd65f03c0,     #           ret
        0xd5033bbf,     # fence:    dmb  ish
        0xd65f03c0)),   #           ret
        0x4c),
}
_NATIVE_CODE["amd64"] = _NATIVE_CODE["x86_64"]
_NATIVE_CODE["arm64"] = _NATIVE_CODE["aarch64"]
_native = None
_native_error = None


class _Native:
    def __init__(self, code, fence_off):
        PROT_RX = mmap.PROT_READ | mmap.PROT_EXEC
        self.page = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE)
        self.page[:len(code)] = code
        addr = mmap_address(self.page)
        lc = libc()
        lc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if lc.mprotect(addr, PAGE_SIZE, PROT_RX) != 0:
            err = ctypes.get_errno()
            self.page.close()
            raise OSError(err, "mprotect(PROT_EXEC): %s" % os.strerror(err))
        # CFUNCTYPE: the GIL is released around each call.
        self.or_bytes = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addr)
        self.fence = ctypes.CFUNCTYPE(None)(addr + fence_off)


def native():
    """The native helpers, made on first use; None where this CPU or kernel
    allows none (native_error() says why)."""
    global _native, _native_error
    if _native is None and _native_error is None:
        code = _NATIVE_CODE.get(_MACHINE)
        if code is None or struct.calcsize("P") != 8:
            _native_error = "no native code for %s" % _MACHINE
        else:
            try:
                _native = _Native(*code)
            except (OSError, ValueError, AttributeError) as e:
                _native_error = "cannot make executable memory (%s)" % e
    return _native


def native_error():
    native()
    return _native_error


if _IS_X86:
    _fence_lock = threading.Lock()

    def smp_mb():
        """Full memory barrier (store-load).  Taking a lock is a lock-prefixed
        read-modify-write, which on x86 orders every earlier load and store
        before every later one (and costs less than a ctypes call to mfence).
        Needed wherever we write a flag or index and then read the peer's."""
        _fence_lock.acquire()
        _fence_lock.release()

    # x86-64 is TSO: stores are not reordered with stores, loads not with
    # loads.  Each struct call is an opaque C function call, so the compiler
    # cannot move our accesses across it either.  Only store-load needs a fence.
    def smp_wmb():
        pass

    def smp_rmb():
        pass
else:
    # Weakly ordered (arm64): a lock round trip is an acquire and a release,
    # which let an earlier store pass a later load, so every barrier is a
    # real `dmb ish`, bound on first use.
    def smp_mb():
        global smp_mb, smp_wmb, smp_rmb
        n = native()
        if n is None:
            raise SvqError("no memory barrier on %s: %s" % (_MACHINE, native_error()))
        smp_mb = smp_wmb = smp_rmb = n.fence
        n.fence()

    smp_wmb = smp_rmb = smp_mb


def check_barriers():
    """Fail early, in one line, where the shadow rings would have no sound
    memory barriers (a weakly ordered CPU without the native fence)."""
    if not _IS_X86 and native() is None:
        raise SvqError("no memory barrier on %s: %s" % (_MACHINE, native_error()))


def eventfd():
    """A non-blocking, close-on-exec eventfd (os.eventfd is Python 3.10+)."""
    if hasattr(os, "eventfd"):
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fd = libc().eventfd(0, 0o2000000 | 0o4000)   # EFD_CLOEXEC | EFD_NONBLOCK
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def eventfd_drain(fd):
    """Read and clear an eventfd; returns the count (0 if it was not set)."""
    try:
        return _U64.unpack(os.read(fd, 8))[0]
    except BlockingIOError:
        return 0


def mmap_address(mm):
    """Host virtual address of an mmap object's first byte."""
    buf = (ctypes.c_char * 1).from_buffer(mm)
    addr = ctypes.addressof(buf)
    del buf                       # drop the export so the mmap can be closed
    return addr


def page_align_up(n):
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class SharedMemory:
    """A MAP_SHARED mapping: anonymous (shmem) or of a passed fd.  vdpa_sim and
    VDUSE map user memory by VMA and silently skip private anonymous memory,
    so every page a device may touch must come from here.  `leaks` counts the
    mappings a forgotten view kept alive past close() (a bug: tests check it)."""

    leaks = 0

    def __init__(self, size, fd=-1, offset=0, prot=mmap.PROT_READ | mmap.PROT_WRITE):
        self.size = size
        self.leaked = False
        if fd < 0:
            self.mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED, prot=prot)
        else:
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot,
                                offset=offset)
        self.hva = mmap_address(self.mm)
        self.mv = memoryview(self.mm)

    def close(self):
        if self.mm is not None:
            self.mv.release()
            try:
                self.mm.close()
            except BufferError:
                # A view is still alive somewhere: the mapping (and the fd
                # mmap dup()ed) go when the last view does.
                self.leaked = True
                SharedMemory.leaks += 1
                sys.stderr.write("svq: internal error: a view of a %d-byte shared mapping "
                                 "outlived it\n" % self.size)
            self.mm = None


# ============================================================================
# IOVA map: device IOVA ranges <-> host virtual ranges (bisect-based)
# ============================================================================

class IOVAMapping:
    __slots__ = ("iova", "size", "hva", "perm")

    def __init__(self, iova, size, hva, perm):
        self.iova, self.size, self.hva, self.perm = iova, size, hva, perm

    def __repr__(self):
        return "IOVAMapping(iova=%#x, size=%#x, hva=%#x, perm=%d)" % (
            self.iova, self.size, self.hva, self.perm)


class IOVAMap:
    """Sorted, non-overlapping IOVA ranges of the device, each backed by a host
    virtual range.  Allocation is first-fit, page aligned, inside the device's
    usable range [first, last] and never at page 0 (a zero IOVA looks like a
    NULL pointer to too many devices)."""

    def __init__(self, first=0, last=(1 << 64) - 1):
        if first > last:
            raise IOVAError("empty IOVA range [%#x, %#x]" % (first, last))
        self.first, self.last = first, last
        self._starts = []       # IOVA starts, sorted
        self._maps = []         # IOVAMapping, same order
        self._hva_starts = []   # host starts, sorted (may overlap)
        self._hva_maps = []

    def __len__(self):
        return len(self._maps)

    def __iter__(self):
        return iter(list(self._maps))

    def _check_free(self, iova, size):
        if size <= 0:
            raise IOVAError("empty mapping at IOVA %#x" % iova)
        end = iova + size - 1
        if iova < self.first or end > self.last:
            raise IOVAError("IOVA [%#x, %#x] outside the device range [%#x, %#x]"
                            % (iova, end, self.first, self.last))
        i = bisect.bisect_right(self._starts, iova)
        if i > 0:
            prev = self._maps[i - 1]
            if prev.iova + prev.size > iova:
                raise IOVAError("IOVA [%#x, %#x] overlaps %r" % (iova, end, prev))
        if i < len(self._maps) and self._maps[i].iova <= end:
            raise IOVAError("IOVA [%#x, %#x] overlaps %r" % (iova, end, self._maps[i]))
        return i

    def _insert(self, i, m):
        self._starts.insert(i, m.iova)
        self._maps.insert(i, m)
        j = bisect.bisect_right(self._hva_starts, m.hva)
        self._hva_starts.insert(j, m.hva)
        self._hva_maps.insert(j, m)
        return m

    def insert(self, iova, hva, size, perm=VHOST_ACCESS_RW):
        """Map [iova, iova+size) at a fixed place (direct mode: IOVA = GPA)."""
        return self._insert(self._check_free(iova, size), IOVAMapping(iova, size, hva, perm))

    def alloc(self, hva, size, perm=VHOST_ACCESS_RW):
        """First-fit allocation of a page-aligned IOVA range for [hva, hva+size)."""
        if size <= 0:
            raise IOVAError("empty mapping")
        size = page_align_up(size)
        cand = page_align_up(max(self.first, PAGE_SIZE))
        i = 0
        for i, m in enumerate(self._maps):
            if m.iova + m.size <= cand:
                continue
            if cand + size <= m.iova:
                break
            cand = page_align_up(m.iova + m.size)
        else:
            i = len(self._maps)
        if cand + size - 1 > self.last or cand + size - 1 >= 1 << 64:
            raise IOVAError("IOVA space exhausted: no %#x bytes free in [%#x, %#x]"
                            % (size, self.first, self.last))
        return self._insert(i, IOVAMapping(cand, size, hva, perm))

    def remove(self, iova):
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._starts) or self._starts[i] != iova:
            raise IOVAError("no mapping at IOVA %#x" % iova)
        m = self._maps.pop(i)
        del self._starts[i]
        j = self._hva_maps.index(m)
        del self._hva_maps[j]
        del self._hva_starts[j]
        return m

    def find_iova(self, iova):
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            m = self._maps[i]
            if iova < m.iova + m.size:
                return m
        return None

    def _find_hva(self, hva):
        # Host ranges may overlap (two IOVAs for one buffer), so look back
        # from the last start <= hva until a range contains it.
        for i in range(bisect.bisect_right(self._hva_starts, hva) - 1, -1, -1):
            m = self._hva_maps[i]
            if hva < m.hva + m.size:
                return m
        return None

    def translate(self, hva, size):
        """Host range -> list of (iova, length) pieces; may span several maps."""
        pieces = []
        while size > 0:
            m = self._find_hva(hva)
            if m is None:
                raise IOVAError("host address %#x is not mapped for the device" % hva)
            off = hva - m.hva
            n = min(size, m.size - off)
            pieces.append((m.iova + off, n))
            hva += n
            size -= n
        return pieces


# ============================================================================
# Device: /dev/vhost-vdpa-N
# ============================================================================

_MISSING_HINT = ("load vhost_vdpa and add a device: modprobe vhost_vdpa; "
                 "vdpa dev add mgmtdev vdpasim_net name vdpa0 "
                 "(without iproute2: svq.py dev add mgmtdev vdpasim_net name vdpa0)")


class VhostVdpa:
    """One open vhost-vdpa character device: thin, named wrappers around its
    ioctls and IOTLB messages.  Every failure is a DeviceError naming the op."""

    def __init__(self, path):
        self.path = path
        self.fd = -1
        self.backend_features = 0
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DeviceError("open %s" % path, errno.ENOENT, hint=_MISSING_HINT) from None
        except OSError as e:
            raise DeviceError("open %s" % path, e.errno) from None
        if not stat.S_ISCHR(st.st_mode):
            raise DeviceError("open %s" % path, errno.ENODEV,
                              hint="not a character device; expected /dev/vhost-vdpa-N")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            hint = {errno.EBUSY: "device busy: another process holds it open",
                    errno.EACCES: "permission denied: run as root or get access to the device",
                    errno.EPERM: "permission denied: run as root or get access to the device",
                    errno.ENXIO: _MISSING_HINT, errno.ENODEV: _MISSING_HINT}.get(e.errno)
            raise DeviceError("open %s" % path, e.errno, hint=hint) from None

    # -- plumbing --
    def ioctl(self, req, arg=0, vq=None):
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(self.fd, req, arg)
            return fcntl.ioctl(self.fd, req, arg, True)
        except OSError as e:
            hint = "not a vhost-vdpa device" if e.errno == errno.ENOTTY else None
            raise DeviceError(IOCTL_NAMES.get(req, "ioctl %#x" % req), e.errno, vq, hint) from None

    def _get(self, req, ctype, vq=None):
        v = ctype()
        self.ioctl(req, v, vq)
        return v.value

    def _set(self, req, ctype, value, vq=None):
        self.ioctl(req, ctype(value), vq)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- generic vhost --
    def set_owner(self):
        self.ioctl(VHOST_SET_OWNER)

    def get_features(self):
        return self._get(VHOST_GET_FEATURES, _u64)

    def set_features(self, features):
        self._set(VHOST_SET_FEATURES, _u64, features)

    def get_backend_features(self):
        return self._get(VHOST_GET_BACKEND_FEATURES, _u64)

    def set_backend_features(self, features):
        self._set(VHOST_SET_BACKEND_FEATURES, _u64, features)
        self.backend_features = features

    def set_vring_num(self, vq, num):
        self.ioctl(VHOST_SET_VRING_NUM, vhost_vring_state(vq, num), vq)

    def set_vring_base(self, vq, base):
        self.ioctl(VHOST_SET_VRING_BASE, vhost_vring_state(vq, base), vq)

    def get_vring_base(self, vq):
        s = vhost_vring_state(vq, 0)
        self.ioctl(VHOST_GET_VRING_BASE, s, vq)
        return s.num

    def set_vring_addr(self, vq, desc, avail, used, flags=0, log=0):
        self.ioctl(VHOST_SET_VRING_ADDR,
                   vhost_vring_addr(vq, flags, desc, used, avail, log), vq)

    def set_vring_kick(self, vq, fd):
        self.ioctl(VHOST_SET_VRING_KICK, vhost_vring_file(vq, fd), vq)

    def set_vring_call(self, vq, fd):
        self.ioctl(VHOST_SET_VRING_CALL, vhost_vring_file(vq, fd), vq)

    def set_vring_err(self, vq, fd):
        self.ioctl(VHOST_SET_VRING_ERR, vhost_vring_file(vq, fd), vq)

    # -- vhost-vdpa --
    def get_device_id(self):
        return self._get(VHOST_VDPA_GET_DEVICE_ID, _u32)

    def get_status(self):
        return self._get(VHOST_VDPA_GET_STATUS, _u8)

    def set_status(self, status):
        self._set(VHOST_VDPA_SET_STATUS, _u8, status)

    def get_config_size(self):
        return self._get(VHOST_VDPA_GET_CONFIG_SIZE, _u32)

    def get_config(self, off, length):
        buf = bytearray(ctypes.sizeof(vhost_vdpa_config) + length)
        struct.pack_into("<II", buf, 0, off, length)
        self.ioctl(VHOST_VDPA_GET_CONFIG, buf)
        return bytes(buf[8:])

    def set_config(self, off, data):
        buf = bytearray(ctypes.sizeof(vhost_vdpa_config) + len(data))
        struct.pack_into("<II", buf, 0, off, len(data))
        buf[8:] = data
        self.ioctl(VHOST_VDPA_SET_CONFIG, buf)

    def set_vring_enable(self, vq, enable=True):
        self.ioctl(VHOST_VDPA_SET_VRING_ENABLE, vhost_vring_state(vq, int(enable)), vq)

    def get_vring_num(self):
        return self._get(VHOST_VDPA_GET_VRING_NUM, _u16)

    def get_vring_size(self, vq):
        s = vhost_vring_state(vq, 0)
        self.ioctl(VHOST_VDPA_GET_VRING_SIZE, s, vq)
        return s.num

    def get_iova_range(self):
        r = vhost_vdpa_iova_range()
        self.ioctl(VHOST_VDPA_GET_IOVA_RANGE, r)
        return r.first, r.last

    def get_vqs_count(self):
        return self._get(VHOST_VDPA_GET_VQS_COUNT, _u32)

    def get_group_num(self):
        return self._get(VHOST_VDPA_GET_GROUP_NUM, _u32)

    def get_as_num(self):
        return self._get(VHOST_VDPA_GET_AS_NUM, ctypes.c_uint)

    def get_vring_group(self, vq):
        s = vhost_vring_state(vq, 0)
        self.ioctl(VHOST_VDPA_GET_VRING_GROUP, s, vq)
        return s.num

    def set_group_asid(self, group, asid):
        self.ioctl(VHOST_VDPA_SET_GROUP_ASID, vhost_vring_state(group, asid))

    def suspend(self):
        self.ioctl(VHOST_VDPA_SUSPEND)

    def resume(self):
        self.ioctl(VHOST_VDPA_RESUME)

    # -- IOTLB (vhost_msg_v2 written to the device fd) --
    def _iotlb(self, type_, iova=0, size=0, uaddr=0, perm=0, asid=0, what=None):
        msg = vhost_msg_v2()
        msg.type = VHOST_IOTLB_MSG_V2
        msg.asid = asid
        msg.iotlb.iova, msg.iotlb.size, msg.iotlb.uaddr = iova, size, uaddr
        msg.iotlb.perm, msg.iotlb.type = perm, type_
        try:
            os.write(self.fd, msg)
        except OSError as e:
            raise DeviceError(what or "VHOST_IOTLB(%d)" % type_, e.errno) from None

    def iotlb_update(self, iova, size, uaddr, perm, asid=0):
        self._iotlb(VHOST_IOTLB_UPDATE, iova, size, uaddr, perm, asid,
                    "VHOST_IOTLB_UPDATE(iova %#x size %#x)" % (iova, size))

    def iotlb_invalidate(self, iova, size, asid=0):
        self._iotlb(VHOST_IOTLB_INVALIDATE, iova, size, 0, 0, asid,
                    "VHOST_IOTLB_INVALIDATE(iova %#x size %#x)" % (iova, size))

    def iotlb_batch_begin(self):
        self._iotlb(VHOST_IOTLB_BATCH_BEGIN, what="VHOST_IOTLB_BATCH_BEGIN")

    def iotlb_batch_end(self):
        self._iotlb(VHOST_IOTLB_BATCH_END, what="VHOST_IOTLB_BATCH_END")


def decode_net_config(cfg, features):
    out = {}
    if len(cfg) >= 6 and features >> VIRTIO_NET_F_MAC & 1:
        out["mac"] = ":".join("%02x" % b for b in cfg[0:6])
    if len(cfg) >= 8 and features >> VIRTIO_NET_F_STATUS & 1:
        st = _U16.unpack_from(cfg, 6)[0]
        out["status"] = ["LINK_UP" if st & 1 else "LINK_DOWN"] + (["ANNOUNCE"] if st & 2 else [])
    if len(cfg) >= 10 and features >> VIRTIO_NET_F_MQ & 1:
        out["max_virtqueue_pairs"] = _U16.unpack_from(cfg, 8)[0]
    if len(cfg) >= 12 and features >> VIRTIO_NET_F_MTU & 1:
        out["mtu"] = _U16.unpack_from(cfg, 10)[0]
    if len(cfg) >= 17 and features >> VIRTIO_NET_F_SPEED_DUPLEX & 1:
        out["speed"], out["duplex"] = struct.unpack_from("<IB", cfg, 12)
    return out


def decode_blk_config(cfg, features):
    out = {}
    if len(cfg) >= 8:
        out["capacity"] = _U64.unpack_from(cfg, 0)[0]
    if len(cfg) >= 12 and features >> VIRTIO_BLK_F_SIZE_MAX & 1:
        out["size_max"] = struct.unpack_from("<I", cfg, 8)[0]
    if len(cfg) >= 16 and features >> VIRTIO_BLK_F_SEG_MAX & 1:
        out["seg_max"] = struct.unpack_from("<I", cfg, 12)[0]
    if len(cfg) >= 24 and features >> VIRTIO_BLK_F_BLK_SIZE & 1:
        out["blk_size"] = struct.unpack_from("<I", cfg, 20)[0]
    if len(cfg) >= 36 and features >> VIRTIO_BLK_F_MQ & 1:
        out["num_queues"] = _U16.unpack_from(cfg, 34)[0]
    if len(cfg) >= 33 and features >> VIRTIO_BLK_F_CONFIG_WCE & 1:
        out["writeback"] = cfg[32]
    return out


# Features the shadow virtqueue can carry, per device type, besides the
# transport bits.  MRG_RXBUF, CTRL_VQ, MQ and the packed ring are not shadowed.
SVQ_NET_FEATURES = ((1 << VIRTIO_NET_F_MTU) | (1 << VIRTIO_NET_F_MAC)
                    | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_SPEED_DUPLEX)
                    | (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM))
SVQ_BLK_FEATURES = ((1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_SEG_MAX)
                    | (1 << VIRTIO_BLK_F_GEOMETRY) | (1 << VIRTIO_BLK_F_RO)
                    | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
                    | (1 << VIRTIO_BLK_F_TOPOLOGY) | (1 << VIRTIO_BLK_F_CONFIG_WCE))
SVQ_TRANSPORT_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM)
                          | (1 << VIRTIO_F_ANY_LAYOUT) | (1 << VIRTIO_RING_F_EVENT_IDX))
# What the shadow offers its guest on top of the device: it flattens indirect
# tables, implements event-index suppression itself, and carries a packed
# guest ring to the device's split ring.
SVQ_GUEST_EXTRA_FEATURES = ((1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)
                            | (1 << VIRTIO_F_RING_PACKED))
SVQ_BACKEND_FEATURES = ((1 << VHOST_BACKEND_F_IOTLB_MSG_V2) | (1 << VHOST_BACKEND_F_IOTLB_BATCH)
                        | (1 << VHOST_BACKEND_F_IOTLB_ASID) | (1 << VHOST_BACKEND_F_SUSPEND)
                        | (1 << VHOST_BACKEND_F_RESUME))


def svq_device_features(device_type):
    return SVQ_TRANSPORT_FEATURES | {VIRTIO_ID_NET: SVQ_NET_FEATURES,
                                     VIRTIO_ID_BLOCK: SVQ_BLK_FEATURES}.get(device_type, 0)


class VdpaDevice:
    """A vhost-vdpa device brought up as a virtio driver would: owner, backend
    features, status handshake, config, IOTLB, per-queue setup, DRIVER_OK.
    close() undoes all of it in reverse on every exit path."""

    def __init__(self, path, opener=VhostVdpa):
        self.path = path
        self.dev = opener(path)
        self.iova_map = None
        self.status = 0
        self.features = 0
        self.batching = False
        self.enabled_vqs = []
        try:
            self.dev.set_owner()
            self.device_id = self.dev.get_device_id()
            self.type = DEVICE_TYPES.get(self.device_id, "id%d" % self.device_id)
            self.device_features = self.dev.get_features()
            offered = self.dev.get_backend_features()
            self.dev.set_backend_features(offered & SVQ_BACKEND_FEATURES)
            self.backend_features = offered & SVQ_BACKEND_FEATURES
            self.batching = bool(self.backend_features >> VHOST_BACKEND_F_IOTLB_BATCH & 1)
            first, last = self.dev.get_iova_range()
            self.iova_map = IOVAMap(first, last)
            self.max_queue_size = self.dev.get_vring_num()
            self.num_vqs = self.dev.get_vqs_count()
        except BaseException:
            self.dev.close()
            raise

    def has_backend(self, bit):
        return bool(self.backend_features >> bit & 1)

    def negotiate(self, wanted):
        """Reset, ACKNOWLEDGE|DRIVER, features, FEATURES_OK read back."""
        need = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM)
        if self.device_features & need != need:
            missing = [n for n in feature_names(need & ~self.device_features)]
            raise DeviceError("%s: features" % self.path, errno.ENOTSUP,
                              hint="device lacks %s, which svq.py requires" % ", ".join(missing))
        features = self.device_features & wanted
        self.set_status(0)
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        self.dev.set_features(features)
        self.set_status(self.status | VIRTIO_CONFIG_S_FEATURES_OK)
        got = self.dev.get_status()
        if not got & VIRTIO_CONFIG_S_FEATURES_OK:
            self.set_status(self.status | VIRTIO_CONFIG_S_FAILED)
            raise DeviceError("%s: FEATURES_OK" % self.path, errno.EPROTO,
                              hint="device refused features %s" % ",".join(feature_names(features)))
        self.features = features
        return features

    def set_status(self, status):
        self.dev.set_status(status)
        self.status = status

    def config(self):
        size = self.dev.get_config_size()
        raw = self.dev.get_config(0, size) if size else b""
        if self.device_id == VIRTIO_ID_NET:
            return decode_net_config(raw, self.features or self.device_features)
        if self.device_id == VIRTIO_ID_BLOCK:
            return decode_blk_config(raw, self.features or self.device_features)
        return {"raw": raw.hex()}

    # -- IOTLB: IOVA map kept in step with the device --
    def _batch(self, fn):
        if self.batching:
            self.dev.iotlb_batch_begin()
        try:
            return fn()
        finally:
            if self.batching:
                self.dev.iotlb_batch_end()

    def map(self, hva, size, perm=VHOST_ACCESS_RW, iova=None):
        """Map a host range for the device; IOVA allocated first-fit unless given."""
        m = (self.iova_map.alloc(hva, size, perm) if iova is None
             else self.iova_map.insert(iova, hva, size, perm))
        try:
            self._batch(lambda: self.dev.iotlb_update(m.iova, m.size, m.hva, perm))
        except BaseException:
            self.iova_map.remove(m.iova)
            raise
        return m

    def unmap(self, m):
        self.iova_map.remove(m.iova)
        self.dev.iotlb_invalidate(m.iova, m.size)

    def unmap_all(self):
        maps = list(self.iova_map) if self.iova_map is not None else []
        if not maps:
            return

        def run():
            for m in maps:
                self.iova_map.remove(m.iova)
                try:
                    self.dev.iotlb_invalidate(m.iova, m.size)
                except DeviceError:
                    pass
        self._batch(run)

    def setup_vq(self, vq, num, desc, avail, used, kick_fd, call_fd, base=0):
        """Per-queue setup in the kernel's order: num, base, addr, kick, call."""
        self.dev.set_vring_num(vq, num)
        self.dev.set_vring_base(vq, base)
        self.dev.set_vring_addr(vq, desc, avail, used)
        self.dev.set_vring_kick(vq, kick_fd)
        self.dev.set_vring_call(vq, call_fd)

    def start(self, vqs):
        for vq in vqs:
            self.dev.set_vring_enable(vq, True)
            self.enabled_vqs.append(vq)
        self.set_status(self.status | VIRTIO_CONFIG_S_DRIVER_OK)

    def suspend(self):
        if self.has_backend(VHOST_BACKEND_F_SUSPEND):
            self.dev.suspend()
            return True
        return False

    def reset(self):
        if self.dev.fd >= 0:
            try:
                self.set_status(0)
            except DeviceError:
                pass
        self.enabled_vqs = []

    def close(self):
        """Reset, unmap everything, close: safe to call twice."""
        if self.dev.fd < 0:
            return
        try:
            self.reset()
            for vq in range(self.num_vqs if self.iova_map is not None else 0):
                for setter in (self.dev.set_vring_kick, self.dev.set_vring_call):
                    try:
                        setter(vq, VHOST_FILE_UNBIND)
                    except DeviceError:
                        pass
            self.unmap_all()
        finally:
            self.dev.close()


# ============================================================================
# Guest memory and dirty log
# ============================================================================

class GuestRegion:
    __slots__ = ("gpa", "size", "end", "uaddr", "mem", "mv", "hva", "iova", "owned", "ident")

    def __init__(self, gpa, size, mem, uaddr=None, owned=True, ident=None):
        self.gpa, self.size, self.end = gpa, size, gpa + size
        self.uaddr = gpa if uaddr is None else uaddr   # frontend's own address
        self.mem, self.mv, self.hva = mem, mem.mv, mem.hva
        self.iova = None                               # set once mapped
        self.owned = owned
        self.ident = ident          # (st_dev, st_ino, offset) of a frontend's file


class GuestMemory:
    """Guest-physical address space: sorted regions backed by shared mappings."""

    def __init__(self, regions=()):
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise SvqError("guest memory regions overlap at GPA %#x" % b.gpa)
        self._starts = [r.gpa for r in self.regions]
        self.size = max((r.end for r in self.regions), default=0)
        self.fds = []               # memfd(): the regions' files

    @classmethod
    def anonymous(cls, layout):
        """[(gpa, size), ...] -> memory of fresh MAP_SHARED anonymous regions."""
        return cls([GuestRegion(gpa, size, SharedMemory(size)) for gpa, size in layout])

    @classmethod
    def memfd(cls, layout):
        """As anonymous(), but each region a memfd of its own (kept in
        .fds), its userspace address its mapping here: memory to hand to a
        vhost-user backend."""
        regions, fds = [], []
        try:
            for gpa, size in layout:
                fds.append(os.memfd_create("svq-guest", os.MFD_CLOEXEC))
                os.ftruncate(fds[-1], size)
                m = SharedMemory(size, fd=fds[-1])
                regions.append(GuestRegion(gpa, size, m, uaddr=m.hva))
            mem = cls(regions)
        except BaseException:
            for r in regions:
                r.mem.close()
            for fd in fds:
                os.close(fd)
            raise
        mem.fds = fds
        return mem

    def region(self, gpa):
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self.regions[i]
            if gpa < r.end:
                return r
        return None

    def view(self, gpa, size):
        """memoryview of [gpa, gpa+size) or None when it is not all in one region."""
        r = self.region(gpa)
        if r is None or size < 0 or gpa + size > r.end:
            return None
        off = gpa - r.gpa
        return r.mv[off:off + size]

    def _pieces(self, gpa, size):
        while size > 0:
            r = self.region(gpa)
            if r is None:
                raise SvqError("guest address %#x is outside guest memory" % gpa)
            n = min(size, r.end - gpa)
            yield r, gpa - r.gpa, n
            gpa += n
            size -= n

    def read(self, gpa, size):
        """Bytes at [gpa, gpa+size), across region boundaries."""
        return b"".join(bytes(r.mv[o:o + n]) for r, o, n in self._pieces(gpa, size))

    def write(self, gpa, data):
        done = 0
        for r, o, n in self._pieces(gpa, len(data)):
            r.mv[o:o + n] = data[done:done + n]
            done += n

    def region_by_uaddr(self, uaddr, size):
        for r in self.regions:
            if r.uaddr <= uaddr and uaddr + size <= r.uaddr + r.size:
                return r
        return None

    def close(self):
        for r in self.regions:
            if r.owned:
                r.mem.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


# Every page the device (or svq.py on its behalf) wrote is logged; tests flip
# this in a copy of svq.py to show that they catch a backend that does not.
LOG_DEVICE_WRITES = True


def log_words(gpa, length):
    """The log bits of pages [gpa, gpa+length): (words, inner) where each word
    is byte index << 8 | bit mask, and inner is None or a range() of the
    words of whole bytes in between (for a long run, kept as a range so that
    a chain's log costs O(1) memory whatever its size)."""
    if length <= 0:
        return (), None
    first = gpa >> PAGE_SHIFT
    last = (gpa + length - 1) >> PAGE_SHIFT
    fb, lb = first >> 3, last >> 3
    low = 0xff & (0xff << (first & 7))      # bits first%8..7 of byte fb
    high = (2 << (last & 7)) - 1            # bits 0..last%8 of byte lb
    if fb == lb:
        return (fb << 8 | (low & high),), None
    if lb - fb <= 8:
        return (fb << 8 | low,) + tuple(b << 8 | 0xff for b in range(fb + 1, lb)) \
            + (lb << 8 | high,), None
    return (fb << 8 | low, lb << 8 | high), range((fb + 1) << 8 | 0xff, lb << 8 | 0xff, 256)


class DirtyLog:
    """One bit per 4 KiB guest page (vhost's log layout: bit n of byte n//8 is
    page n), over our own bytearray or the frontend's shared log.

    mark() queues bits; commit() sets them.  The shadow queues commit only
    after they have published what the bits stand for (the guest's used
    index): a log reader clears a bit and then copies its page, so a bit set
    before the write it stands for could be cleared, its page copied without
    that write, and the write lost.  vhost logs after the used index too.

    In a shared log (shared=True) each bit is set with an atomic OR (native
    code): the frontend clears bits, and every other vhost backend of the VM
    sets bits, in the same bytes at the same moment (QEMU shares one log
    among its vhost devices), and a plain read-modify-write would drop
    theirs.  Bits past the end of the log are dropped."""

    def __init__(self, size_bytes=None, buf=None, shared=False):
        self.buf = buf if buf is not None else bytearray((size_bytes + 7) // 8)
        self.size = len(self.buf)
        self.limit = self.size * 8          # pages covered
        self.pending = []                   # words to set (see log_words)
        self.pending_runs = []              # range()s of words to set
        self.shared = shared
        if shared:
            n = native()
            if n is None:
                raise SvqError("shared dirty log: no atomic OR: %s" % native_error())
            self._or_bytes = n.or_bytes
            view = (ctypes.c_char * 1).from_buffer(self.buf)
            self._head = (ctypes.addressof(view), self.size)     # base, limit
            del view                        # no export left behind

    def mark(self, gpa, length):
        page = gpa >> PAGE_SHIFT
        if length > 0 and (gpa + length - 1) >> PAGE_SHIFT == page:    # the common case
            self.pending.append((page >> 3) << 8 | 1 << (page & 7))
            return
        words, inner = log_words(gpa, length)
        self.pending.extend(words)
        if inner is not None:
            self.pending_runs.append(inner)

    def commit(self):
        """Set every queued bit (the caller has published the writes)."""
        p, runs = self.pending, self.pending_runs
        if runs:
            for r in runs:
                p.extend(r)
            runs.clear()
        if not p:
            return
        if self.shared:
            block = array.array("Q", self._head)
            block.append(len(p))
            block.extend(p)
            self._or_bytes(block.buffer_info()[0])
        else:
            buf, size = self.buf, self.size
            for w in set(p):            # buffers share pages: each word once
                if w >> 8 < size:
                    buf[w >> 8] |= w & 0xff
        p.clear()

    def close(self):
        """Drop queued bits and let go of the buffer (before it is unmapped)."""
        self.pending.clear()
        self.pending_runs.clear()
        self.buf = bytearray()
        self.size = self.limit = 0
        if self.shared:
            self._head = (0, 0)             # a stray commit() sets nothing

    def pages(self):
        return [i * 8 + b for i, byte in enumerate(self.buf) if byte
                for b in range(8) if byte >> b & 1]

    def count(self):
        return sum(bin(b).count("1") for b in self.buf if b)

    def clear(self):
        self.buf[:] = bytes(len(self.buf))


# ============================================================================
# Split ring memory
# ============================================================================

class SplitRing:
    """Views over one split ring's three parts: descriptor table, avail, used."""

    def __init__(self, num, desc, avail, used):
        if num < 1 or num > 32768 or num & (num - 1):
            raise SvqError("queue size %d is not a power of two in [1, 32768]" % num)
        self.num = num
        self.desc, self.avail, self.used = desc, avail, used
        if (len(desc) < vring_desc_size(num) or len(avail) < vring_avail_size(num)
                or len(used) < vring_used_size(num)):
            raise SvqError("ring of %d entries does not fit its memory" % num)
        # Indexes, flags and event indexes are read and written while the peer
        # runs on another CPU, so they go through 16-bit views: one item is one
        # 16-bit load or store.  struct.pack_into is no good here: it zero-fills
        # its target before writing, so a peer can read a transient 0 index.
        if sys.byteorder != "little":
            raise SvqError("virtio 1.x rings are little-endian; this host is not")
        self.avail16 = avail.cast("H")         # flags, idx, ring[num], used_event
        self.used16 = used.cast("H")           # flags, idx, ring[num] (8 bytes each), avail_event
        self.desc64 = desc.cast("Q")           # per descriptor: addr, then len|flags<<32|next<<48
        self.used_event_i = 2 + num            # word of used_event in avail
        self.avail_event_i = 2 + 4 * num       # word of avail_event in used

    def release(self):
        """Release the views (the 16-bit casts first: they pin their bases),
        so that the memory under them can be unmapped."""
        for view in (self.avail16, self.used16, self.desc64, self.desc, self.avail, self.used):
            view.release()

    @staticmethod
    def layout(num):
        """(total, desc_off, avail_off, used_off): desc+avail in the first pages,
        used in its own pages (the device writes only those)."""
        avail_off = vring_desc_size(num)
        used_off = page_align_up(avail_off + vring_avail_size(num))
        return used_off + page_align_up(vring_used_size(num)), 0, avail_off, used_off


def ring_read(view, num, size, pos, n):
    """A private copy of n ring entries of `size` bytes from free-running
    index `pos` (avail: size 2, used: size 8; entries start at byte 4).  What
    is validated is this copy, never the shared ring a peer can rewrite."""
    s = pos & (num - 1)
    if s + n <= num:
        return bytes(view[4 + s * size:4 + (s + n) * size])
    return bytes(view[4 + s * size:4 + num * size]) + bytes(view[4:4 + (s + n - num) * size])


def ring_write(view, num, size, pos, raw):
    """Store the entries in `raw` at free-running index `pos` (wrapping)."""
    s = pos & (num - 1)
    n = len(raw) // size
    if s + n <= num:
        view[4 + s * size:4 + (s + n) * size] = raw
    else:
        k = (num - s) * size
        view[4 + s * size:4 + num * size] = raw[:k]
        view[4:4 + len(raw) - k] = raw[k:]


# ============================================================================
# Packed ring memory (virtio 1.1 section 2.8)
# ============================================================================

class PackedRing:
    """Views over one packed ring: the descriptor ring (both sides write it),
    the driver event suppression area (the driver writes it) and the device
    event suppression area (the device writes it).  A descriptor is 16 bytes:
    addr, len, id, flags; flags and the event words go through 16-bit views,
    one item one load or store, as in SplitRing."""

    def __init__(self, num, desc, driver, device):
        if not 1 <= num <= 32768:
            raise SvqError("packed queue size %d is not in [1, 32768]" % num)
        if len(desc) < VRING_DESC_SIZE * num or len(driver) < 4 or len(device) < 4:
            raise SvqError("packed ring of %d entries does not fit its memory" % num)
        if sys.byteorder != "little":
            raise SvqError("virtio 1.x rings are little-endian; this host is not")
        self.num = num
        self.desc, self.driver, self.device = desc, driver, device
        self.desc64 = desc.cast("Q")           # per descriptor: addr, then len|id<<32|flags<<48
        self.desc32 = desc.cast("I")           # len at 4i+2
        self.desc16 = desc.cast("H")           # id at 8i+6, flags at 8i+7
        self.driver16 = driver.cast("H")       # off_wrap, flags
        self.device16 = device.cast("H")

    def release(self):
        for view in (self.desc64, self.desc32, self.desc16, self.driver16, self.device16,
                     self.desc, self.driver, self.device):
            view.release()

    @staticmethod
    def layout(num):
        """(total, desc_off, driver_off, device_off): the ring, then both event
        areas in the page after it."""
        driver_off = page_align_up(VRING_DESC_SIZE * num)
        return driver_off + PAGE_SIZE, 0, driver_off, driver_off + 4


def packed_store_flags(d16, entries):
    """Store the flags of a batch of packed descriptors, [(position, flags)],
    whose other fields are written: after a write barrier, the first
    entry's flags last (after another), so a peer reading in ring order sees
    the batch whole (as QEMU's virtqueue_packed_flush does)."""
    smp_wmb()
    for pos, flags in entries[1:]:
        d16[8 * pos + 7] = flags
    if len(entries) > 1:
        smp_wmb()
    d16[8 * entries[0][0] + 7] = entries[0][1]


def packed_need_event(off_wrap, new, wrap, count, num):
    """Does a peer whose event suppression word is `off_wrap` (offset, wrap
    counter in bit 15) want to hear of `count` descriptors made available
    (or used) up to position `new` with wrap counter `wrap`?  The event
    offset is put on the same line as new and old: an offset of the
    previous lap (its wrap counter differs) counts num less (as Linux's
    virtqueue_kick_prepare_packed does)."""
    event = off_wrap & 0x7fff
    if off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR != wrap:
        event -= num
    return vring_need_event(event & 0xffff, new & 0xffff, (new - count) & 0xffff)


# ============================================================================
# Driver rings: svq.py as the driver of a split or packed ring
# ============================================================================
#
# The same driver code serves the built-in driver (its rings in guest
# memory) and the device side of the shadow virtqueue (the shadow ring the
# vDPA device reads).  add() queues a chain of (address, length, writable)
# buffers with a token, kick() publishes and notifies unless the device
# suppressed it, get_used() returns (token, length) in the order the device
# completed them.

class SplitDriver:
    """The driver side of a split ring.  Descriptors come from a private free
    list, as in a guest kernel's virtio_ring, or, with `fixed`, from where the
    caller says (add(..., at=)): each buffer then keeps its descriptors and
    the table does not change from one request to the next, as with DPDK's
    virtio PMD.  `indirect` is (view, address, entries per chain) of an
    indirect table area: chains of 2..entries buffers then take one
    descriptor."""

    def __init__(self, index, ring, event_idx, kick_fd, call_fd, base=0, fixed=False,
                 indirect=None, side="driver"):
        self.index, self.ring, self.num = index, ring, ring.num
        self.event_idx, self.fixed, self.side = event_idx, fixed, side
        self.indirect = indirect
        self.kick_fd, self.call_fd = kick_fd, call_fd
        num = self.num
        self.free_head, self.num_free = 0, num
        self.desc_next = list(range(1, num)) + [0]
        self.chain_len = [0] * num      # descriptors per head in flight
        self.chain_last = [0] * num     # the last of them (to splice the chain back)
        self.tokens = [None] * num
        # Rings start at index `base` (0 normally): both indexes are written
        # before the device starts, as SET_VRING_BASE tells it.
        self.avail_idx = self.kicked_idx = self.last_used_idx = base & 0xffff
        ring.avail16[0] = 0
        ring.avail16[1] = self.avail_idx
        ring.used16[1] = self.last_used_idx
        ring.avail16[ring.used_event_i] = self.last_used_idx
        ring.used16[ring.avail_event_i] = self.avail_idx
        self.kicks = 0
        self.in_flight = 0

    def add_heads(self, raw):
        """Make available chains whose descriptors the caller wrote itself at
        the slots named in `raw` (16-bit heads): the mirrored layout."""
        ring_write(self.ring.avail, self.num, 2, self.avail_idx, raw)
        n = len(raw) // 2
        self.avail_idx = (self.avail_idx + n) & 0xffff
        self.in_flight += n

    def take_used(self, count):
        """A private copy of the next `count` used entries (the caller checks
        them), consumed: the mirrored layout."""
        raw = ring_read(self.ring.used, self.num, 8, self.last_used_idx, count)
        self.last_used_idx = (self.last_used_idx + count) & 0xffff
        self.in_flight -= count
        return raw

    def add(self, bufs, token, at=None):
        """Queue one chain of (address, length, writable) buffers; False if it
        does not fit now.  A fixed queue puts it at descriptors at, at+1, ...
        (False while the chain there is still in flight)."""
        if self.fixed or self.indirect is not None:
            return self._add_placed(bufs, token, at)
        # The shadow ring's case, per guest request: descriptors from the
        # free list.  Two 64-bit stores a descriptor, each written with NEXT
        # and its free-list successor; the last one's flags word again
        # without NEXT (nothing is published until the avail index is).
        n = len(bufs)
        if n > self.num_free or not n:
            if not n:
                raise SvqError("vq %d: a chain of no buffers" % self.index)
            return False
        desc64, desc_next = self.ring.desc64, self.desc_next
        head = slot = last = self.free_head
        word = 0
        for gpa, length, write in bufs:
            nxt = desc_next[slot]
            desc64[2 * slot] = gpa
            word = length | (_DESC_WRITE_NEXT if write else _DESC_NEXT) | nxt << 48
            desc64[2 * slot + 1] = word
            last, slot = slot, nxt
        desc64[2 * last + 1] = word ^ _DESC_NEXT
        self.free_head = slot
        return self._post(head, n, last, token)

    def _post(self, head, need, last, token):
        """A chain written at `head` (`need` descriptors, the last `last`):
        account for it and put it in the avail ring (not yet published)."""
        self.num_free -= need
        self.chain_len[head] = need
        self.chain_last[head] = last
        self.tokens[head] = token
        self.in_flight += 1
        idx = self.avail_idx
        self.ring.avail16[2 + (idx & (self.num - 1))] = head
        self.avail_idx = (idx + 1) & 0xffff
        return True

    def _add_placed(self, bufs, token, at):
        """add() for a fixed queue or one with an indirect table area."""
        n = len(bufs)
        ind = self.indirect
        use_indirect = ind is not None and 1 < n <= ind[2]
        need = 1 if use_indirect else n
        if need > self.num_free:
            return False
        if self.fixed:
            if at is None or at + need > self.num:
                raise SvqError("fixed driver queue: chain of %d at %r" % (need, at))
            if self.tokens[at] is not None:
                return False
            head = at
        else:
            head = self.free_head
        desc_next = self.desc_next
        if use_indirect:
            view, addr, per = ind
            base = head * per * 16
            for i, (gpa, length, write) in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if write else 0) | (VRING_DESC_F_NEXT if i + 1 < n else 0)
                _DESC.pack_into(view, base + i * 16, gpa, length, flags, i + 1)
            _DESC.pack_into(self.ring.desc, head * 16, addr + base, n * 16, VRING_DESC_F_INDIRECT, 0)
            last = head
            slot = desc_next[head]
        else:
            # Two 64-bit stores per descriptor, as a kernel driver's field
            # stores: rewriting a descriptor with the values it holds changes
            # nothing a reader can see (pack_into would zero it first).
            desc64 = self.ring.desc64
            fixed = self.fixed
            slot = last = head
            k = 1
            for gpa, length, write in bufs:
                nxt = slot + 1 if fixed else desc_next[slot]
                desc64[2 * slot] = gpa
                if k < n:
                    desc64[2 * slot + 1] = (length | (VRING_DESC_F_WRITE if write else 0) << 32
                                            | VRING_DESC_F_NEXT << 32 | nxt << 48)
                else:
                    desc64[2 * slot + 1] = (length | (VRING_DESC_F_WRITE if write else 0) << 32
                                            | (0 if fixed else nxt) << 48)
                last, slot = slot, nxt
                k += 1
        if not self.fixed:
            self.free_head = slot
        return self._post(head, need, last, token)

    def publish(self):
        """Make the chains added so far visible; returns the previous index."""
        old, self.kicked_idx = self.kicked_idx, self.avail_idx
        # Write barrier: descriptors and ring entries before the avail index.
        smp_wmb()
        self.ring.avail16[1] = self.avail_idx
        return old

    def notify(self, old):
        """Kick the device for the entries published since `old` unless it
        asked not to be (NO_NOTIFY/avail_event).  The caller has published
        them and issued a full barrier after: else a stale suppression flag
        could skip a needed kick."""
        ring = self.ring
        if vring_wants_notify(ring.used16, self.event_idx, ring.avail_event_i,
                              VRING_USED_F_NO_NOTIFY, self.avail_idx, old):
            os.write(self.kick_fd, _EVENTFD_ONE)
            self.kicks += 1
            return True
        return False

    def kick(self):
        """Publish new avail entries and notify the device if it wants it."""
        if self.avail_idx == self.kicked_idx:
            return False
        old = self.publish()
        # Full barrier: avail index store before reading NO_NOTIFY/avail_event.
        smp_mb()
        return self.notify(old)

    def used_pending(self):
        return (self.ring.used16[1] - self.last_used_idx) & 0xffff

    def get_used(self):
        """(token, len) of the next used entry, or None.  A used id that is not
        in flight is a RingError: nothing the device writes is trusted."""
        idx = self.last_used_idx
        if idx == self.ring.used16[1]:
            return None
        # Read barrier: used index before the entry.
        smp_rmb()
        head, length = _USED_ELEM.unpack_from(self.ring.used, 4 + (idx & (self.num - 1)) * 8)
        token = self.tokens[head] if head < self.num else None
        if token is None:
            raise RingError(self.side, self.index, idx, "used id %d was never made available" % head)
        self.tokens[head] = None
        if not self.fixed:
            # Return the chain to the free list in one splice.
            self.desc_next[self.chain_last[head]] = self.free_head
            self.free_head = head
        self.num_free += self.chain_len[head]
        self.in_flight -= 1
        self.last_used_idx = (idx + 1) & 0xffff
        return token, length

    def used_batch(self):
        """Every used entry the device has published: [(token, len)], each
        checked as in get_used(), its chain back on the free list."""
        ring, num, tokens = self.ring, self.num, self.tokens
        idx, end = self.last_used_idx, ring.used16[1]
        if idx == end:
            return ()
        # Read barrier: used index before the entries.
        smp_rmb()
        count = (end - idx) & 0xffff
        if count > self.in_flight:
            raise RingError(self.side, self.index, end, "used index moved by %d with %d requests "
                            "in flight" % (count, self.in_flight))
        # The entries read in one go, into a private copy (what is checked
        # is what is used).
        ents = memoryview(ring_read(ring.used, num, 8, idx, count)).cast("I")
        desc_next, chain_last, chain_len = self.desc_next, self.chain_last, self.chain_len
        fixed = self.fixed
        out = []
        append = out.append
        free_head, num_free = self.free_head, self.num_free
        try:
            for head, length in zip(ents[0::2], ents[1::2]):
                token = tokens[head] if head < num else None
                if token is None:
                    raise RingError(self.side, self.index, (idx + len(out)) & 0xffff,
                                    "used id %d was never made available" % head)
                tokens[head] = None
                if not fixed:
                    desc_next[chain_last[head]] = free_head
                    free_head = head
                num_free += chain_len[head]
                append((token, length))
        finally:
            self.free_head, self.num_free = free_head, num_free
            self.in_flight -= len(out)
            self.last_used_idx = (idx + len(out)) & 0xffff
        return out

    def disable_cb(self):
        if not self.event_idx:
            self.ring.avail16[0] = VRING_AVAIL_F_NO_INTERRUPT

    def enable_cb(self):
        """Ask for a call on the next used entry; True if none is pending."""
        if self.event_idx:
            self.ring.avail16[self.ring.used_event_i] = self.last_used_idx
        else:
            self.ring.avail16[0] = 0
        # Full barrier: the suppression store before re-reading the used index.
        smp_mb()
        return self.last_used_idx == self.ring.used16[1]

    def reset_free_list(self):
        """A fresh free list (nothing in flight): after the mirrored layout."""
        self.desc_next[:] = list(range(1, self.num)) + [0]
        self.free_head, self.num_free = 0, self.num

    def release(self):
        """Let go of the ring's memory (before it is unmapped)."""
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        if self.indirect is not None:
            self.indirect[0].release()
            self.indirect = None


class PackedDriver:
    """The driver side of a packed ring (the built-in driver's --packed).
    Each chain takes consecutive descriptors in ring order and a buffer id
    from a private list; its first descriptor's flags, the ones that make it
    available, are stored by kick(), after a write barrier, so the device
    never sees half a chain, and sees a batch when it is notified of it (as
    a split ring's avail index is published at the kick): a device that
    polls never finds work the driver has not announced yet."""

    def __init__(self, index, ring, event_idx, kick_fd, call_fd, base=None, indirect=None,
                 side="driver"):
        self.index, self.ring, self.num = index, ring, ring.num
        self.event_idx, self.side = event_idx, side
        self.indirect = indirect
        self.kick_fd, self.call_fd = kick_fd, call_fd
        num = self.num
        # Position and wrap counter of the next descriptor to make available
        # and of the next used one; both counters start at 1 (spec 2.8.1).
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        if base is not None:
            self.next_avail, self.avail_wrap = base & 0x7fff, base >> 15 & 1
            self.next_used, self.used_wrap = base >> 16 & 0x7fff, base >> 31 & 1
        self.num_free = num
        self.free_ids = list(range(num - 1, -1, -1))
        self.tokens = [None] * num
        self.chain_len = [0] * num
        self.added = 0                  # descriptors made available since the last kick
        self.heads = []                 # (position, flags) of chains added, not published
        self.kicks = 0
        self.in_flight = 0
        ring.driver16[0] = ring.driver16[1] = 0
        self.fixed = False

    def state(self):
        """The ring state as VHOST_(GET|SET)_VRING_BASE carry it for packed rings."""
        return (self.next_avail | self.avail_wrap << 15 | self.next_used << 16
                | self.used_wrap << 31)

    def add(self, bufs, token, at=None):
        n = len(bufs)
        ind = self.indirect
        use_indirect = ind is not None and 1 < n <= ind[2]
        need = 1 if use_indirect else n
        if need > self.num_free or not self.free_ids:
            return False
        bid = self.free_ids.pop()
        ring, num = self.ring, self.num
        d64, d16 = ring.desc64, ring.desc16
        pos, wrap = self.next_avail, self.avail_wrap
        first, first_flags = pos, 0
        if use_indirect:
            view, addr, per = ind
            base = bid * per * 16
            for i, (gpa, length, write) in enumerate(bufs):
                _DESC.pack_into(view, base + i * 16, gpa, length, 0,
                                VRING_DESC_F_WRITE if write else 0)   # pvirtq_desc: id, flags
            bufs = [(addr + base, n * 16, VRING_DESC_F_INDIRECT)]
        else:
            bufs = [(gpa, length, VRING_DESC_F_WRITE if write else 0) for gpa, length, write in bufs]
        d32 = ring.desc32
        k = 0
        for gpa, length, flags in bufs:
            k += 1
            f = (flags | (VRING_DESC_F_NEXT if k < len(bufs) else 0)
                 | (wrap << VRING_PACKED_DESC_F_AVAIL) | ((wrap ^ 1) << VRING_PACKED_DESC_F_USED))
            d64[2 * pos] = gpa
            if pos == first:
                first_flags = f                 # its flags are stored last, below
                d32[4 * pos + 2] = length
                d16[8 * pos + 6] = bid
            else:
                d64[2 * pos + 1] = length | bid << 32 | f << 48
            pos += 1
            if pos == num:
                pos, wrap = 0, wrap ^ 1
        self.heads.append((first, first_flags))
        self.next_avail, self.avail_wrap = pos, wrap
        self.num_free -= need
        self.tokens[bid] = token
        self.chain_len[bid] = need
        self.added += need
        self.in_flight += 1
        return True

    def publish(self):
        """Make the chains added since the last publish available."""
        if self.heads:
            packed_store_flags(self.ring.desc16, self.heads)
            self.heads = []

    def kick(self):
        if not self.added:
            return False
        self.publish()
        count, self.added = self.added, 0
        # Full barrier: the flags stores before reading the device's event area.
        smp_mb()
        dev = self.ring.device16
        flags = dev[1] & 3
        if flags == VRING_PACKED_EVENT_FLAG_DESC and self.event_idx:
            need = packed_need_event(dev[0], self.next_avail, self.avail_wrap, count, self.num)
        else:
            need = flags != VRING_PACKED_EVENT_FLAG_DISABLE
        if need:
            os.write(self.kick_fd, _EVENTFD_ONE)
            self.kicks += 1
        return need

    def _used_here(self):
        f = self.ring.desc16[8 * self.next_used + 7]
        w = self.used_wrap
        return (f >> VRING_PACKED_DESC_F_USED & 1) == w and (f >> VRING_PACKED_DESC_F_AVAIL & 1) == w

    def get_used(self):
        if not self._used_here():
            return None
        # Read barrier: the flags before the id and length.
        smp_rmb()
        pos = self.next_used
        bid = self.ring.desc16[8 * pos + 6]
        length = self.ring.desc32[4 * pos + 2]
        token = self.tokens[bid] if bid < self.num else None
        if token is None:
            raise RingError(self.side, self.index, pos, "used buffer id %d is not in flight" % bid)
        self.tokens[bid] = None
        n = self.chain_len[bid]
        pos += n
        if pos >= self.num:
            pos -= self.num
            self.used_wrap ^= 1
        self.next_used = pos
        self.num_free += n
        self.free_ids.append(bid)
        self.in_flight -= 1
        return token, length

    def disable_cb(self):
        self.ring.driver16[1] = VRING_PACKED_EVENT_FLAG_DISABLE

    def enable_cb(self):
        drv = self.ring.driver16
        if self.event_idx:
            drv[0] = self.next_used | self.used_wrap << VRING_PACKED_EVENT_F_WRAP_CTR
            drv[1] = VRING_PACKED_EVENT_FLAG_DESC
        else:
            drv[1] = VRING_PACKED_EVENT_FLAG_ENABLE
        smp_mb()
        return not self._used_here()

    def release(self):
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        if self.indirect is not None:
            self.indirect[0].release()
            self.indirect = None


def driver_queue(index, mem, num, ring_gpa, features, kick_fd, call_fd, indirect_gpa=None,
                 indirect_max=0, base=0, fixed=False):
    """A driver ring in guest memory at `ring_gpa`, zeroed, split or (with
    VIRTIO_F_RING_PACKED in `features`) packed: the built-in driver's.  Its
    addresses are in .desc_gpa, .avail_gpa (the driver area) and .used_gpa
    (the device area)."""
    packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
    layout = PackedRing.layout(num) if packed else SplitRing.layout(num)
    total, doff, aoff, uoff = layout
    view = mem.view(ring_gpa, total)
    if view is None:
        raise SvqError("driver ring vq %d outside guest memory" % index)
    view[:] = bytes(total)
    event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
    indirect = None
    if features >> VIRTIO_RING_F_INDIRECT_DESC & 1 and indirect_gpa is not None and indirect_max > 1:
        ind_view = mem.view(indirect_gpa, num * indirect_max * 16)
        indirect = (ind_view, indirect_gpa, indirect_max)
    if packed:
        ring = PackedRing(num, view[doff:aoff], view[aoff:aoff + 4], view[uoff:uoff + 4])
        q = PackedDriver(index, ring, event_idx, kick_fd, call_fd,
                         base=None if not base else base, indirect=indirect)
    else:
        ring = SplitRing(num, view[doff:aoff], view[aoff:uoff], view[uoff:total])
        q = SplitDriver(index, ring, event_idx, kick_fd, call_fd, base=base, fixed=fixed,
                        indirect=indirect)
    view.release()
    q.packed = packed
    q.desc_gpa, q.avail_gpa, q.used_gpa = ring_gpa + doff, ring_gpa + aoff, ring_gpa + uoff
    return q


# Kept for the tests' and the benchmark's frontends: a split driver ring in
# guest memory.
def DriverVirtqueue(index, mem, num, ring_gpa, features, kick_fd, call_fd, indirect_gpa=None,
                    indirect_max=0, base=0, fixed=False):
    return driver_queue(index, mem, num, ring_gpa, features & ~(1 << VIRTIO_F_RING_PACKED),
                        kick_fd, call_fd, indirect_gpa, indirect_max, base, fixed)


# ============================================================================
# Guest rings: svq.py as the device of a guest's split or packed ring
# ============================================================================
#
# The guest side of a shadow virtqueue, behind one interface:
#   pop()            the next available chain: (id, [(gpa, len, writable)], ndescs),
#                    every virtio rule about its shape checked, indirect
#                    tables flattened; None when nothing is available
#   push(id, len, ndescs) a used entry, not visible yet; publish() makes the
#                    pushed entries visible; wants_call(mark) after it
#   disable_kicks(), arm_kicks() (the caller then issues a full barrier and
#                    asks has_avail() again)
#   avail_state()    where the next pop() reads, to restart from (rewind)
# Everything is read from the shared ring once, into locals, then checked:
# nothing the guest can rewrite after the check is used.

class SplitGuest:
    """The guest's split ring, as its device sees it."""

    packed = False

    def __init__(self, svq, ring, features, last_avail_idx, used_idx):
        self.svq, self.ring, self.num = svq, ring, ring.num
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        self.last_avail_idx = last_avail_idx & 0xffff
        self.avail_seen = self.last_avail_idx       # the avail index last read
        self.used_idx = used_idx & 0xffff
        self.published = self.used_idx
        self.signalled = self.used_idx              # used index at the last call decision
        self.log_gpa = None                         # GPA the used ring's writes are logged at

    def avail_state(self):
        return self.last_avail_idx

    def set_avail_state(self, state):
        self.last_avail_idx = self.avail_seen = state & 0xffff

    def restart_base(self):
        """VHOST_USER_GET_VRING_BASE: the next avail index."""
        return self.last_avail_idx

    def read_avail(self):
        """Read the guest's avail index (and check it); how many are pending."""
        idx = self.ring.avail16[1]
        # Read barrier: the avail index before the ring entries it covers.
        smp_rmb()
        pending = (idx - self.last_avail_idx) & 0xffff
        if pending > self.num:
            self.svq._fail("guest", idx, "avail index jumped by %d (queue size %d)"
                           % (pending, self.num))
        self.avail_seen = idx
        return pending

    def has_avail(self):
        return self.ring.avail16[1] != self.last_avail_idx

    def pop(self):
        """The next available chain: (head, buffers, descriptors it takes in
        the guest ring: 1, avail state before it), or None."""
        idx = self.last_avail_idx
        if idx == self.avail_seen and not self.read_avail():
            return None
        head = self.ring.avail16[2 + (idx & (self.num - 1))]
        if head >= self.num:
            self.svq._fail("guest", idx, "avail head %d out of range" % head)
        bufs = self.chain(head)
        self.last_avail_idx = (idx + 1) & 0xffff
        return head, bufs, 1, idx

    def chain(self, head):
        """The chain at `head` as [(gpa, len, writable)], its indirect table
        flattened."""
        fail, idx = self.svq._fail, self.last_avail_idx
        table, table_n = self.ring.desc, self.num
        unpack = _DESC.unpack_from
        bufs = []
        append = bufs.append
        i = head
        hops = 0
        limit = min(table_n, VIRTQUEUE_MAX_SIZE)   # a longer chain loops, or is too long
        seen_write = indirect = False
        while True:
            if i >= table_n:
                fail("guest", idx, "descriptor index %d out of range (head %d)" % (i, head))
            addr, length, flags, nxt = unpack(table, i << 4)
            hops += 1
            if hops > limit:
                fail("guest", idx, "descriptor chain from head %d loops or is longer than %d"
                     % (head, limit))
            if flags & VRING_DESC_F_INDIRECT:
                if indirect or not self.indirect or flags & VRING_DESC_F_NEXT:
                    fail("guest", idx, "indirect descriptor %s (head %d)" % (
                        "nested" if indirect else "with NEXT" if self.indirect
                        else "not negotiated", head))
                table, table_n = self.svq.indirect_table(addr, length, head)
                i, hops, indirect = 0, 0, True
                limit = table_n
                continue
            write = flags & VRING_DESC_F_WRITE
            if write:
                seen_write = True
            elif seen_write:
                fail("guest", idx, "device-readable descriptor after a writable one (head %d)" % head)
            append((addr, length, write))
            if not flags & VRING_DESC_F_NEXT:
                return bufs
            i = nxt

    # -- used side --
    def push(self, head, length, ndescs=1):
        _USED_ELEM.pack_into(self.ring.used, 4 + ((self.used_idx & (self.num - 1)) << 3),
                             head, length)
        self.used_idx = (self.used_idx + 1) & 0xffff

    def push_many(self, entries):
        """push() of each entry of the flat sequence `entries` (head, length,
        ndescs, head, ...), in one store of their used elements."""
        raw = array.array("I", entries)
        del raw[2::3]                   # vring_used_elem: id, len
        self.push_raw(raw.tobytes())

    def push_raw(self, raw):
        """Used entries as the device wrote them (the mirrored layout)."""
        ring_write(self.ring.used, self.num, 8, self.used_idx, raw)
        self.used_idx = (self.used_idx + len(raw) // 8) & 0xffff

    def publish(self):
        """Make the pushed entries visible (and log them); False if there were
        none."""
        first = self.published
        if first == self.used_idx:
            return False
        # Write barrier: used entries (and the buffers copied back) before
        # the used index the guest polls.
        smp_wmb()
        self.ring.used16[1] = self.used_idx
        self.published = self.used_idx
        if self.log_gpa is not None:
            self._log_used(first, (self.used_idx - first) & 0xffff)
        return True

    def _log_used(self, first, count):
        """Log the used-ring entries [first, first+count) and the index."""
        base, num, mark = self.log_gpa, self.num, self.svq.log.mark
        start = first & (num - 1)
        n = min(count, num - start)
        mark(base + 4 + start * 8, n * 8)
        if count > n:
            mark(base + 4, min(count - n, num) * 8)
        mark(base + 2, 2)

    def wants_call(self):
        """After publish() and a full barrier: does the guest want a call for
        the entries published since the last decision (NO_INTERRUPT,
        used_event)?  As vhost's signalled_used, `old` moves on either way."""
        old, self.signalled = self.signalled, self.used_idx
        return vring_wants_notify(self.ring.avail16, self.event_idx, self.ring.used_event_i,
                                  VRING_AVAIL_F_NO_INTERRUPT, self.used_idx, old)

    # -- kick suppression towards the guest --
    def _store_used16(self, word, value):
        self.ring.used16[word] = value
        if self.log_gpa is not None:
            self.svq.log.mark(self.log_gpa + 2 * word, 2)

    def disable_kicks(self):
        if not self.event_idx:
            self._store_used16(0, VRING_USED_F_NO_NOTIFY)

    def arm_kicks(self):
        """Re-arm guest kicks (the caller issues the full barrier before it
        looks for avail entries again)."""
        if self.event_idx:
            self._store_used16(self.ring.avail_event_i, self.last_avail_idx)
        else:
            self._store_used16(0, 0)

    def start(self):
        """The ring's first writes: kicks on, avail_event at the start."""
        self._store_used16(0, 0)
        self._store_used16(self.ring.avail_event_i, self.last_avail_idx)


class PackedGuest:
    """The guest's packed ring, as its device sees it: available descriptors
    are read in ring order (AVAIL == the wrap counter, USED != it), used
    descriptors written in completion order, each advancing the used
    position by the number of descriptors its chain took."""

    packed = True

    def __init__(self, svq, ring, features, state, gpas):
        self.svq, self.ring, self.num = svq, ring, ring.num
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        # state: VHOST_SET_VRING_BASE's packed encoding (None: a fresh ring):
        # avail position and wrap counter in bits 0-15, used ones in 16-31.
        # QEMU sends both; DPDK's virtio-user sends the avail half only, the
        # used half being the same at any clean stop (everything taken was
        # used), as DPDK's vhost library reads it too.
        if state is None:
            state = 1 << 15 | 1 << 31
        elif not state >> 16:
            state |= state << 16
        self.last_avail, self.avail_wrap = state & 0x7fff, state >> 15 & 1
        self.used_pos, self.used_wrap = state >> 16 & 0x7fff, state >> 31 & 1
        if self.last_avail >= self.num or self.used_pos >= self.num:
            raise SvqError("packed ring state %#x outside a ring of %d" % (state, self.num))
        self.desc_gpa, self.device_gpa = gpas          # for the log
        self.log_ring = False
        self.ids = bytearray(self.num)                 # 1: buffer id in flight
        self.pending = []                              # (position, flags) pushed, not published
        self.advanced = 0                              # descriptors used since the last call decision

    def avail_state(self):
        return self.last_avail | self.avail_wrap << 15

    def set_avail_state(self, state):
        self.last_avail, self.avail_wrap = state & 0x7fff, state >> 15 & 1

    def restart_base(self):
        return (self.last_avail | self.avail_wrap << 15 | self.used_pos << 16
                | self.used_wrap << 31)

    def _avail_at(self, pos, wrap):
        f = self.ring.desc16[8 * pos + 7]
        return (f >> VRING_PACKED_DESC_F_AVAIL & 1) == wrap and (f >> VRING_PACKED_DESC_F_USED & 1) != wrap

    def has_avail(self):
        return self._avail_at(self.last_avail, self.avail_wrap)

    def pop(self):
        """As SplitGuest.pop: (buffer id, buffers, descriptors, avail state
        before it), or None."""
        pos, wrap, num = self.last_avail, self.avail_wrap, self.num
        if not self._avail_at(pos, wrap):
            return None
        state = pos | wrap << 15
        # Read barrier: the first descriptor's flags before the chain.
        smp_rmb()
        fail = self.svq._fail
        d64, d32, d16 = self.ring.desc64, self.ring.desc32, self.ring.desc16
        bufs = []
        n = 0
        seen_write = False
        while True:
            flags = d16[8 * pos + 7]
            if n and not ((flags >> VRING_PACKED_DESC_F_AVAIL & 1) == wrap
                          and (flags >> VRING_PACKED_DESC_F_USED & 1) != wrap):
                fail("guest", self.last_avail, "descriptor %d of a chain is not available "
                     "(wrap counter %d)" % (pos, wrap))
            addr, length, bid = d64[2 * pos], d32[4 * pos + 2], d16[8 * pos + 6]
            n += 1
            if flags & VRING_DESC_F_INDIRECT:
                if n > 1 or flags & VRING_DESC_F_NEXT or not self.indirect:
                    fail("guest", self.last_avail, "indirect descriptor %s at %d" % (
                        "not negotiated" if not self.indirect else "in a chain", pos))
                bufs = self._indirect(addr, length, pos)
            else:
                write = flags & VRING_DESC_F_WRITE
                if write:
                    seen_write = True
                elif seen_write:
                    fail("guest", self.last_avail,
                         "device-readable descriptor after a writable one at %d" % pos)
                bufs.append((addr, length, write))
            pos += 1
            if pos == num:
                pos, wrap = 0, wrap ^ 1
            if not flags & VRING_DESC_F_NEXT:
                break
            if n >= num:
                fail("guest", self.last_avail, "chain of more descriptors than the ring has")
        if bid >= num:
            fail("guest", self.last_avail, "buffer id %d out of range" % bid)
        if self.ids[bid]:
            fail("guest", self.last_avail, "buffer id %d is already in flight" % bid)
        self.ids[bid] = 1
        self.last_avail, self.avail_wrap = pos, wrap
        return bid, bufs, n, state

    def _indirect(self, addr, length, pos):
        table, n = self.svq.indirect_table(addr, length, pos)
        bufs = []
        seen_write = False
        unpack = _DESC.unpack_from
        for i in range(n):
            a, ln, _bid, flags = unpack(table, i << 4)      # pvirtq_desc: addr, len, id, flags
            write = flags & VRING_DESC_F_WRITE              # the only valid flag there
            if write:
                seen_write = True
            elif seen_write:
                self.svq._fail("guest", self.last_avail,
                               "device-readable indirect entry after a writable one at %d" % pos)
            bufs.append((a, ln, write))
        return bufs

    # -- used side --
    def push(self, bid, length, ndescs):
        pos = self.used_pos
        self.ring.desc32[4 * pos + 2] = length
        self.ring.desc16[8 * pos + 6] = bid
        w = self.used_wrap
        self.pending.append((pos, (w << VRING_PACKED_DESC_F_AVAIL) | (w << VRING_PACKED_DESC_F_USED)
                             | (VRING_DESC_F_WRITE if length else 0)))
        self.ids[bid] = 0
        pos += ndescs
        if pos >= self.num:
            pos -= self.num
            self.used_wrap ^= 1
        self.used_pos = pos
        self.advanced += ndescs

    def push_many(self, entries):
        """As SplitGuest.push_many: the flat sequence id, length, ndescs, ..."""
        it = iter(entries)
        for bid, length, ndescs in zip(it, it, it):
            self.push(bid, length, ndescs)

    def publish(self):
        p = self.pending
        if not p:
            return False
        packed_store_flags(self.ring.desc16, p)      # ids and lengths before the flags
        if self.log_ring:
            for pos, _ in p:
                self.svq.log.mark(self.desc_gpa + 16 * pos, 16)
        self.pending = []
        return True

    def wants_call(self):
        """After publish() and a full barrier: does the guest want a call for
        the descriptors used since the last decision (its driver event
        suppression)?"""
        count, self.advanced = self.advanced, 0
        drv = self.ring.driver16
        flags = drv[1] & 3
        if flags == VRING_PACKED_EVENT_FLAG_DESC and self.event_idx:
            return packed_need_event(drv[0], self.used_pos, self.used_wrap, count, self.num)
        return flags != VRING_PACKED_EVENT_FLAG_DISABLE

    # -- kick suppression towards the guest --
    def _store_device16(self, word, value):
        self.ring.device16[word] = value
        if self.log_ring:
            self.svq.log.mark(self.device_gpa + 2 * word, 2)

    def disable_kicks(self):
        self._store_device16(1, VRING_PACKED_EVENT_FLAG_DISABLE)

    def arm_kicks(self):
        if self.event_idx:
            self._store_device16(0, self.last_avail | self.avail_wrap << VRING_PACKED_EVENT_F_WRAP_CTR)
            self._store_device16(1, VRING_PACKED_EVENT_FLAG_DESC)
        else:
            self._store_device16(1, VRING_PACKED_EVENT_FLAG_ENABLE)

    def start(self):
        self.arm_kicks()


# ============================================================================
# Shadow virtqueue
# ============================================================================

class BouncePool:
    """Buffers of svq.py's own, mapped into the device's IOVA space (read and
    write), that stand in for the buffers of a guest chain too long to be
    shadowed descriptor by descriptor.  Carved first-fit in 512-byte units;
    the caller (ShadowVirtqueue) owns nothing of it but its offsets."""

    UNIT = 512
    SIZE = 8 << 20          # a Linux guest's largest request is ~1.25 MiB

    def __init__(self, mem, iova):
        self.mem, self.mv, self.iova, self.size = mem, mem.mv, iova, mem.size
        self.free = [(0, mem.size)]         # sorted (offset, size)

    def alloc(self, n):
        """Offset of n free bytes, or -1 while the pool is too busy."""
        n = max(self.UNIT, -(-n // self.UNIT) * self.UNIT)
        for i, (off, size) in enumerate(self.free):
            if size >= n:
                if size == n:
                    del self.free[i]
                else:
                    self.free[i] = (off + n, size - n)
                return off
        return -1

    def release(self, off, n):
        n = max(self.UNIT, -(-n // self.UNIT) * self.UNIT)
        free = self.free
        i = bisect.bisect_left(free, (off, 0))
        if i < len(free) and free[i][0] == off + n:     # merge with the next
            n += free[i][1]
            del free[i]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:   # and the previous
            i -= 1
            off, n = free[i][0], free[i][1] + n
            del free[i]
        free.insert(i, (off, n))


VIRTQUEUE_MAX_SIZE = 1024       # longest chain accepted, flattened (QEMU's limit)
INTERNAL = -2                   # desc_state of a request svq.py made itself


class ShadowVirtqueue:
    """QEMU's VhostShadowVirtqueue, in Python.

    Guest side: the guest's ring, split or packed (SplitGuest, PackedGuest):
    svq.py plays the device for it (pops chains, pushes used entries,
    notifies through guest_call_fd).  Device side: a shadow split ring in
    svq.py's own shared memory, mapped into the device's IOVA space, driven
    by a SplitDriver, the same code that drives the built-in driver's rings.
    The shadow ring may be larger than the guest's.  A packed guest ring is
    bridged to the split shadow ring: the device needs no packed ring.

    Two layouts for the shadow descriptor table:

    - mirrored (the default, split guests): shadow slot i holds guest
      descriptor i, translated, with the guest's own `next`, so a shadow
      head is the guest head and a used entry goes back to the guest as the
      device wrote it.  The shadow slots are built from a private copy of the
      guest table (`_snap`).  While the guest table still equals that copy, a
      chain posted again is already validated and translated: forwarding it
      only claims its descriptors and copies its head.  Drivers that keep
      their buffers at fixed descriptors (DPDK, svq.py's own driver) pay one
      comparison of the table per batch; a driver that rewrites its table
      pays a walk per chain.
    - copied (QEMU's layout; packed guests always): each guest chain is
      popped, translated and added to the shadow ring from its free list.
      Needed when a chain cannot be mirrored: an indirect table (flattened),
      a buffer split across memory regions, a chain too long for the shadow
      ring (its buffers bounced), or a request svq.py injects itself.  The
      queue moves to it for good, once no request is in flight.

    A chain of more than `max_chain` descriptors (half the shadow ring) is
    bounced: its readable bytes are copied into one buffer of a BouncePool and
    its writable part gets another, so that it takes two shadow descriptors;
    on completion the writable buffer is copied back.  A Linux guest posts
    such chains (indirect tables of seg_max + 2 entries, more than its queue
    size), and a guest may.

    Everything needed to complete a chain is kept privately (the shadow
    ring's token per request, or the mirrored chain): nothing read back from
    shared memory (the device's or the guest's) is trusted as an index or a
    length.

    Dirty log: every page of every writable buffer of a completed chain is
    logged, whatever the used length says.  The virtio spec lets a device
    write more than `len` bytes (2.7.8.2: "the device MAY write more than len
    bytes"), virtio-blk drivers (Linux's among them) ignore `len` and read the
    status byte at the end of the chain, and the vhost-user spec asks that
    all modifications to the memory the descriptors point to be marked.  The
    cost is nothing for blk (a read writes its buffers whole) and a page at
    most for net (an RX buffer is one page or less)."""

    def __init__(self, index, guest_mem, guest_ring, shadow_ring, shadow_iova,
                 guest_features, device_features, guest_kick_fd, guest_call_fd,
                 device_kick_fd, device_call_fd, log=None, log_used_gpa=None,
                 guest_used_idx=0, last_avail_idx=0, shadow_base=0, stats=None,
                 mirror=True, bounce=None, max_chain=None, guest_state=None, guest_gpas=None):
        self.index = index
        self.mem = guest_mem
        self.packed = isinstance(guest_ring, PackedRing)
        if self.packed:
            self.g = PackedGuest(self, guest_ring, guest_features, guest_state,
                                 guest_gpas or (None, None))
        else:
            self.g = SplitGuest(self, guest_ring, guest_features, last_avail_idx, guest_used_idx)
        self.num = guest_ring.num
        if shadow_ring.num < self.num:
            raise SvqError("shadow ring smaller than the guest ring")
        self.shadow_iova = shadow_iova          # (desc, avail, used) IOVAs
        self.device_event_idx = bool(device_features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.shadow = SplitDriver(index, shadow_ring, self.device_event_idx, device_kick_fd,
                                  device_call_fd, base=shadow_base, side="device")
        self.snum = snum = shadow_ring.num
        self.smask = snum - 1
        self.max_chain = max(2, snum // 2) if max_chain is None else max_chain
        self.guest_indirect = bool(guest_features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        self.guest_kick_fd, self.guest_call_fd = guest_kick_fd, guest_call_fd
        self.device_kick_fd, self.device_call_fd = device_kick_fd, device_call_fd
        self.bounce_factory = bounce            # () -> BouncePool, on first need
        self.bounce = None
        self.parked = None                      # a popped chain waiting for room
        self.seq = 0                            # guest requests taken, for stop accounting
        self._hint = (1, 0, 0)                  # (gpa, end, iova - gpa): empty
        # Mirrored layout.  A chain is a tuple (mask, count, wlen, last_w,
        # words, inner, bufs): the bit mask of its slots, its descriptor
        # count, writable bytes, the GPA of its last writable byte (-1:
        # none), its log words (log_words(), found once per walk), and its
        # buffers while a pcap capture runs (else None).  _busy is the
        # mask of the slots in flight; desc_chain and chain_seq, per head in
        # flight, its chain and its request number; _chains, per head, the
        # chain walked from _snap (None: not walked since the table changed).
        self.mirror = mirror and not self.packed
        self._switch_pending = False
        self._snap = b""
        self._snap64 = None
        self._chains = [None] * self.num
        self._no_chains = [None] * self.num
        self.desc_chain = [None] * self.num
        self.chain_seq = [0] * self.num
        self._busy = 0
        self.broken = None
        self.stopping = False                   # quiesced: take no new guest requests
        self.injections = []                    # svq.py's own requests, waiting
        self.pcap = None                        # (PcapWriter, "tx" or "rx") on a net queue
        self.stats = stats if stats is not None else SvqStats()
        self.log = self.wlog = None
        self.set_log(log, log_used_gpa)
        self.g.start()                          # guest kicks on (and logged)
        self._commit_log()

    # -- compatibility views of the two sides --
    @property
    def guest_ring(self):
        return self.g.ring

    @property
    def in_flight(self):
        return self.shadow.in_flight

    @property
    def num_free(self):
        return self.shadow.num_free

    @property
    def last_avail_idx(self):
        return self.g.avail_state()

    @property
    def guest_used_idx(self):
        return self.g.used_idx if not self.packed else self.g.used_pos

    def release(self):
        """Let go of both rings' memory (before it is unmapped)."""
        self.g.ring.release()
        self.shadow.release()

    def set_log(self, log, used_gpa=None):
        """Log into `log` from now on (None: stop logging); `used_gpa` is where
        the guest used ring's writes are logged (None: they are not; for a
        packed ring any value turns on the logging of the ring's own writes,
        at their GPAs)."""
        self.log = log
        self.wlog = log if LOG_DEVICE_WRITES else None      # device-written data
        ring_logged = log is not None and used_gpa is not None
        if self.packed:
            self.g.log_ring = ring_logged and self.g.desc_gpa is not None
        else:
            self.g.log_gpa = used_gpa if ring_logged else None

    def _commit_log(self):
        if self.log is not None:
            self.log.commit()

    def set_pcap(self, writer, direction):
        """Capture the frames of this net queue ("tx": the device-readable
        bytes of each chain the device completed; "rx": the bytes it wrote)
        into a PcapWriter, or stop (None).  Mirrored chains walked before
        keep no buffers: they are walked again."""
        self.pcap = (writer, direction) if writer is not None else None
        self._snap = b""
        self._chains[:] = self._no_chains

    def _capture(self, bufs, length):
        """The frame of a completed chain, its virtio-net header stripped."""
        writer, direction = self.pcap
        read = self.mem.read
        if direction == "tx":
            data = b"".join(read(a, n) for a, n, w in bufs if not w)
        else:
            parts = []
            for a, n, w in bufs:
                if w and length > 0:
                    parts.append(read(a, min(n, length)))
                    length -= n
            data = b"".join(parts)
        if len(data) > VIRTIO_NET_HDR_SIZE:
            writer.frame(data[VIRTIO_NET_HDR_SIZE:])

    def _fail(self, side, idx, what):
        self.broken = "%s ring vq %d index %d: %s" % (side, self.index, idx, what)
        # Raised without a local name for it: a frame that held the exception
        # while its traceback held the frame would be a cycle, and the views
        # of guest memory in the frames would outlive the connection.
        raise RingError(side, self.index, idx, what)

    def indirect_table(self, addr, length, where):
        """A guest's indirect table: a view of it and its entry count."""
        idx = self.g.avail_state()
        if length == 0 or length % 16:
            self._fail("guest", idx, "bad indirect table length %d (at %d)" % (length, where))
        if length > VIRTQUEUE_MAX_SIZE * 16:
            self._fail("guest", idx, "indirect table of %d descriptors (at %d); at most %d"
                       % (length // 16, where, VIRTQUEUE_MAX_SIZE))
        view = self.mem.view(addr, length)
        if view is None:
            self._fail("guest", idx, "indirect table [%#x, +%#x) outside guest memory"
                       % (addr, length))
        return view, length // 16

    # -- guest -> device, copied layout --
    def _region_of(self, addr, end, where):
        """The region holding `addr` (the buffer [addr, end) may leave it)."""
        r = self.mem.region(addr)
        if r is None or r.iova is None or end > 0xffffffffffffffff:
            self._fail("guest", self.g.avail_state(), "buffer [%#x, +%#x) outside guest memory "
                       "(at %d)" % (addr, end - addr, where))
        return r

    def add(self, gid, bufs, ndescs, state):
        """Add the guest chain `bufs` (popped at avail state `state`) to the
        shadow ring, translated.  False (nothing consumed) when the shadow
        ring or the bounce pool has too little room for it now.  The
        request's token (what completing it needs) keeps `bufs` itself: its
        writable buffers are the ones to log."""
        if len(bufs) > self.max_chain:
            return self._add_bounced(gid, bufs, ndescs, state)
        lo, hi, delta = self._hint
        wlen = 0
        if delta:
            out = []
            append = out.append
            for addr, length, write in bufs:
                if write:
                    wlen += length
                if not (lo <= addr and addr + length <= hi):
                    out = None
                    break
                append((addr + delta, length, write))
        else:
            out = bufs                  # IOVA = GPA: the guest's buffers as they are
            for addr, length, write in bufs:
                if write:
                    wlen += length
                if not (lo <= addr and addr + length <= hi):
                    out = None
                    break
        if out is None:
            # Not all in the region of the last buffer: region by region.
            out, wlen = self._translate(bufs, gid)
            if len(out) > self.snum:
                return self._add_bounced(gid, bufs, ndescs, state)     # split past the ring
        if not self.shadow.add(out, (gid, wlen, bufs, self.seq, None, ndescs, state)):
            return False
        self.seq += 1
        self.stats.requests += 1
        return True

    def _translate(self, bufs, where):
        """GPA -> IOVA, region by region: one shadow descriptor per region a
        buffer crosses.  Returns (buffers, writable bytes)."""
        hint_gpa, hint_end, hint_delta = self._hint
        out = []
        wlen = 0
        for addr, length, write in bufs:
            end = addr + length
            if write:
                wlen += length
            while True:
                if not (hint_gpa <= addr < hint_end):
                    r = self._region_of(addr, end, where)
                    hint_gpa, hint_end, hint_delta = r.gpa, r.end, r.iova - r.gpa
                piece = min(end, hint_end) - addr
                out.append((addr + hint_delta, piece, write))
                addr += piece
                if addr >= end:
                    break
        self._hint = (hint_gpa, hint_end, hint_delta)
        return out, wlen

    def _bounce_pool(self):
        if self.bounce is None:
            if self.bounce_factory is None:
                self._fail("guest", self.g.avail_state(),
                           "chain needs more descriptors than the shadow ring has")
            self.bounce = self.bounce_factory()
        return self.bounce

    def _add_bounced(self, gid, bufs, ndescs, state, internal=None):
        """A chain too long to shadow descriptor by descriptor (or svq.py's own
        request, `internal` bytes): its readable bytes copied into one bounce
        buffer, one more for its writable part."""
        pool = self._bounce_pool()
        if internal is None:
            for addr, length, write in bufs:      # bounds, before anything is copied
                end = addr + length
                while addr < end:
                    addr = min(end, self._region_of(addr, end, gid).end)
            rlen = sum(length for _, length, write in bufs if not write)
            wlen = sum(length for _, length, write in bufs if write)
        else:
            rlen, wlen = len(internal), 0
        if rlen + wlen > pool.size:
            self._fail("guest", self.g.avail_state(), "chain of %d bytes is larger than the "
                       "%d-byte bounce pool (at %d)" % (rlen + wlen, pool.size, gid))
        if max(1, (rlen > 0) + (wlen > 0)) > self.shadow.num_free:
            return False
        off = pool.alloc(rlen + wlen)
        if off < 0:
            return False
        mv, mem = pool.mv, self.mem
        pos = off
        if internal is not None:
            mv[off:off + rlen] = internal
            bufs = ()
        else:
            for addr, length, write in bufs:
                if length:
                    # The writable part gets the guest's bytes too, so that
                    # the copy back leaves what the device did not write as
                    # it was.
                    mv[pos:pos + length] = mem.read(addr, length)
                    pos += length
        out = [(pool.iova + off, rlen, 0), (pool.iova + off + rlen, wlen, VRING_DESC_F_WRITE)]
        out = [p for p in out if p[1]] or out[:1]        # all empty: one empty buffer
        token = (INTERNAL if internal is not None else gid, wlen, bufs, self.seq,
                 (off, rlen + wlen, off + rlen), ndescs, state)
        if not self.shadow.add(out, token):             # cannot happen: room checked
            pool.release(off, rlen + wlen)
            return False
        if internal is None:
            self.seq += 1
            self.stats.requests += 1
        self.stats.bounced += 1
        return True

    def _unbounce(self, bounce, bufs):
        """Copy a bounced chain's writable buffer back to the guest's writable
        buffers, and give the pool its space back."""
        off, size, pos = bounce
        mv, mem = self.bounce.mv, self.mem
        for gpa, n, write in bufs:
            if write:
                mem.write(gpa, mv[pos:pos + n])
                pos += n
        self.bounce.release(off, size)

    def inject(self, data):
        """Send a device-readable buffer of svq.py's own (a RARP announce on
        a net TX queue); its completion goes nowhere.  In the mirrored layout
        the queue first moves to the copied one, once nothing is in flight."""
        self.injections.append(bytes(data))
        if self.mirror:
            self._switch_pending = True
            if not self.in_flight:
                self._enter_copy_mode()
        self._send_injections()

    def _send_injections(self):
        if self.mirror or not self.injections or self.broken is not None:
            return
        added = False
        while self.injections and self._add_bounced(INTERNAL, None, 0, None, self.injections[0]):
            data = self.injections.pop(0)
            if self.pcap is not None:
                self.pcap[0].frame(data[VIRTIO_NET_HDR_SIZE:])
            added = True
        if added:
            self.kick()

    # -- guest -> device, mirrored layout --
    def _walk(self, head, idx, busy):
        """Validate and translate the chain at `head` of the private table copy
        into the same shadow slots; cache and return its chain tuple.  None
        when the chain cannot be mirrored (indirect, or split by a region
        boundary).  `idx` is its avail index, for errors; `busy` the slots
        in flight, which are never rewritten."""
        snap, num, sdesc = self._snap64, self.num, self.shadow.ring.desc64
        hint_gpa, hint_end, hint_delta = self._hint
        mask = count = wlen = 0
        words, inner = [], []
        last_w = -1
        capture = [] if self.pcap is not None else None     # the buffers, to capture
        seen_write = False
        i = head
        while True:
            if i >= num:
                self._fail("guest", idx, "descriptor index %d out of range (head %d)" % (i, head))
            bit = 1 << i
            if mask & bit:
                self._fail("guest", idx, "descriptor chain from head %d loops" % head)
            mask |= bit
            j = 2 * i
            addr = snap[j]
            word = snap[j + 1]              # len | flags << 32 | next << 48
            length = word & 0xffffffff
            if word & _DESC_INDIRECT:
                if not self.guest_indirect:
                    self._fail("guest", idx, "indirect descriptor not negotiated (head %d)" % head)
                return None
            end = addr + length
            if not (hint_gpa <= addr and end <= hint_end):
                r = self.mem.region(addr)
                if r is not None and r.iova is not None and end > r.end:
                    if end > 0xffffffffffffffff:
                        self._fail("guest", idx, "descriptor length overflows")
                    if self.mem.region(end - 1) is not None:
                        return None         # two shadow descriptors: copy it
                    r = None
                if r is None or r.iova is None:
                    self._fail("guest", idx, "buffer [%#x, +%#x) outside guest memory (head %d)"
                               % (addr, length, head))
                hint_gpa, hint_end, hint_delta = r.gpa, r.end, r.iova - r.gpa
                self._hint = (hint_gpa, hint_end, hint_delta)
            if busy & bit:
                self._fail("guest", idx, "descriptor %d of head %d is already in flight" % (i, head))
            if word & _DESC_WRITE:
                seen_write = True
                wlen += length
                if length:
                    # Its log bits, found once per walk (one page: one word).
                    page = addr >> PAGE_SHIFT
                    if (end - 1) >> PAGE_SHIFT == page:
                        words.append((page >> 3) << 8 | 1 << (page & 7))
                    else:
                        w, r = log_words(addr, length)
                        words.extend(w)
                        if r is not None:
                            inner.append(r)
                    last_w = end - 1
            elif seen_write:
                self._fail("guest", idx, "device-readable descriptor after a writable one (head %d)"
                           % head)
            count += 1
            # The same descriptor, translated: the guest's length and next,
            # its NEXT and WRITE flags (a last one's next is never read).
            sdesc[j] = addr + hint_delta
            sdesc[j + 1] = word & _DESC_KEEP
            if capture is not None:
                capture.append((addr, length, word >> 32 & VRING_DESC_F_WRITE))
            if not word & _DESC_NEXT:
                break
            i = word >> 48
        self.stats.walks += 1
        chain = self._chains[head] = (mask, count, wlen, last_w, words, inner, capture)
        return chain

    def _add_mirrored(self, avail_idx):
        """Forward the guest heads up to `avail_idx` in the mirrored layout;
        returns how many.  Stops before a chain that cannot be mirrored, and
        moves the queue to the copied layout (now if nothing is in flight,
        else once the device has returned everything)."""
        g = self.g
        start = g.last_avail_idx
        count = (avail_idx - start) & 0xffff
        num = self.num
        raw = ring_read(g.ring.avail, num, 2, start, count)
        table = bytes(g.ring.desc)
        if table != self._snap:
            # The guest changed its table: walk chains again from a new copy.
            self._snap = table
            self._snap64 = memoryview(table).cast("Q")
            self._chains[:] = self._no_chains
        chains, desc_chain, chain_seq, busy = self._chains, self.desc_chain, self.chain_seq, self._busy
        taken = nfree = 0
        seq = self.seq
        for head in memoryview(raw).cast("H"):
            pos = (start + taken) & 0xffff
            if head >= num:
                self._fail("guest", pos, "avail head %d out of range" % head)
            chain = chains[head]
            if chain is None:
                chain = self._walk(head, pos, busy)
                if chain is None:
                    self._switch_pending = True
                    if not (self.in_flight + taken):
                        self._enter_copy_mode()
                    break
            m = chain[0]
            if busy & m:
                self._fail("guest", pos, "head %d reuses descriptors already in flight" % head)
            busy |= m
            desc_chain[head] = chain
            chain_seq[head] = seq + taken
            nfree += chain[1]
            taken += 1
        self._busy = busy
        if taken:
            self.shadow.add_heads(raw if taken == count else raw[:2 * taken])
            self.shadow.num_free -= nfree
            self.seq += taken
            self.stats.requests += taken
            g.set_avail_state(start + taken)
        return taken

    def _enter_copy_mode(self):
        """Leave the mirrored layout (nothing is in flight): a fresh free list."""
        self.mirror = self._switch_pending = False
        self.shadow.reset_free_list()
        self._snap, self._snap64 = b"", None
        self._chains[:] = self._no_chains

    def _get_mirrored(self, count):
        """Move `count` used entries to the guest (mirrored layout: each goes
        back as the device wrote it, once checked) and queue the log of what
        was written."""
        sh = self.shadow
        start = sh.last_used_idx
        raw = sh.take_used(count)
        desc_chain, num, log = self.desc_chain, self.num, self.wlog
        if log is not None:
            words, inner = log.pending, log.pending_runs
        busy = self._busy
        k = nfree = 0
        ents = memoryview(raw).cast("I")
        try:
            for sid, length in zip(ents[0::2], ents[1::2]):
                chain = desc_chain[sid] if sid < num else None
                if chain is None:
                    self._fail("device", (start + k) & 0xffff,
                               "used id %d was never made available" % sid)
                if length > chain[2]:
                    self._fail("device", (start + k) & 0xffff,
                               "used length %d beyond the %d writable bytes" % (length, chain[2]))
                if log is not None:
                    words.extend(chain[4])
                    if chain[5]:
                        inner.extend(chain[5])
                if chain[6] is not None:
                    self._capture(chain[6], length)
                busy ^= chain[0]
                desc_chain[sid] = None
                nfree += chain[1]
                k += 1
        finally:
            self._busy = busy
            sh.num_free += nfree
        self.g.push_raw(raw)
        return count

    def forward_avail(self):
        """Drain the guest avail ring into the shadow ring (again while the
        guest adds entries meanwhile), then kick the device once, unless it
        suppressed that.  True if anything was added.  Stops early (parks)
        when the shadow ring is full, or while the queue waits to leave the
        mirrored layout."""
        if self._switch_pending or self.stopping:
            return False
        g, sh = self.g, self.shadow
        start = sh.avail_idx
        try:
            while True:
                g.disable_kicks()
                parked = False
                if self.mirror:
                    avail_idx = (g.last_avail_idx + g.read_avail()) & 0xffff
                    while g.last_avail_idx != avail_idx:
                        self._add_mirrored(avail_idx)
                        if self._switch_pending:
                            parked = True
                            break
                        if not self.mirror:
                            break           # moved to the copied layout: go on there
                if not self.mirror and not parked:
                    while True:
                        chain = self.parked
                        if chain is None:
                            chain = g.pop()
                            if chain is None:
                                break
                        if not self.add(*chain):
                            self.parked = chain
                            parked = True
                            break
                        self.parked = None
                if sh.avail_idx != sh.kicked_idx:
                    sh.publish()
                if parked:
                    # Guest kicks stay off: the device's used entries resume us.
                    self.stats.parked += 1
                    smp_mb()            # as kick(): avail index before NO_NOTIFY
                    break
                g.arm_kicks()
                # Full barrier, for two store-load pairs at once: the shadow
                # avail index before the device's NO_NOTIFY/avail_event (read
                # below, to decide on the kick), and the re-armed guest kicks
                # before the guest's ring (a guest that read the old flag and
                # skipped its kick would strand a buffer).
                smp_mb()
                if not g.has_avail():
                    break
        finally:
            # Our used-ring flag/event writes, now that they are stored.
            self._commit_log()
        if sh.avail_idx == start:
            return False
        self.kick(start)
        return True

    def kick(self, old_idx=None):
        """Notify the device of the avail entries from `old_idx` (published,
        with a full barrier after) unless it asked not to be."""
        sh = self.shadow
        if old_idx is None:             # publish first (svq.py's own requests)
            old_idx = sh.publish()
            smp_mb()
        if sh.notify(old_idx):
            self.stats.device_kicks += 1

    def handle_guest_kick(self):
        eventfd_drain(self.guest_kick_fd)
        self.stats.guest_kicks += 1
        if self.broken is None:
            self.forward_avail()

    # -- device -> guest --
    def flush(self):
        """Move every used entry the device produced into the guest's ring
        (again while the device adds entries meanwhile), log what the device
        wrote, then call the guest once, unless it suppressed that.  Returns
        how many entries went to the guest."""
        sh, g = self.shadow, self.g
        moved = 0
        sh.disable_cb()
        try:
            while True:
                count = sh.used_pending()
                if count > sh.in_flight:
                    self._fail("device", sh.ring.used16[1], "used index moved by %d with %d "
                               "requests in flight" % (count, sh.in_flight))
                if count:
                    # (get_used/take_used issue the read barrier: the used
                    # index before the entries it publishes.)
                    moved += self._get_mirrored(count) if self.mirror else self._get_copied()
                # Re-arm device calls, with a full barrier (in enable_cb) for
                # two store-load pairs at once: the guest's used index (stored
                # by publish(), below on the last pass) before the guest's
                # suppression (read to decide on the call), and the re-armed
                # device calls before the device's used index.
                g.publish()
                if sh.enable_cb():
                    break
                sh.disable_cb()
        finally:
            # The log, now that the used index it covers is stored (and after
            # the barrier above): see DirtyLog.
            self._commit_log()
        if self._switch_pending and not self.in_flight:
            self._enter_copy_mode()
            self._send_injections()
        if moved:
            self._call_guest()
            if self.pcap is not None:
                self.pcap[0].flush()
        return moved

    def _get_copied(self):
        """Copied layout: move the used entries the shadow ring has to the
        guest's ring; returns how many went to the guest.  QEMU's
        vhost_svq_get_buf."""
        log = self.wlog
        mark = log.mark if log is not None else None
        out = []                        # id, length, ndescs of each, flat
        try:
            for (gid, wlen, bufs, _seq, bounce, ndescs, _state), length in self.shadow.used_batch():
                if length > wlen:
                    self._fail("device", self.shadow.last_used_idx,
                               "used length %d beyond the %d writable bytes" % (length, wlen))
                if bounce is not None:
                    self._unbounce(bounce, bufs)
                if mark is not None:
                    for gpa, n, write in bufs:
                        if write:
                            mark(gpa, n)
                if gid != INTERNAL:
                    if self.pcap is not None:
                        self._capture(bufs, length)
                    out += (gid, length, ndescs)
        finally:
            # What was checked goes to the guest even when a later entry
            # breaks the ring (its chains are off the shadow ring).
            self.g.push_many(out)
        return len(out) // 3

    def _call_guest(self):
        """Call the guest for the entries published since the last call
        unless it asked not to be; the caller issued a full barrier after
        publishing."""
        if self.g.wants_call():
            os.write(self.guest_call_fd, _EVENTFD_ONE)
            self.stats.guest_calls += 1

    def handle_device_call(self):
        eventfd_drain(self.device_call_fd)
        self.stats.device_calls += 1
        if self.broken is not None:
            return
        self.flush()
        # Used entries freed shadow descriptors: resume a parked guest chain.
        if self.avail_pending():
            self.forward_avail()

    def avail_pending(self):
        """Guest entries not forwarded yet, with room to forward them (not
        waiting to leave the mirrored layout)."""
        return (not self._switch_pending and not self.stopping and self.num_free > 0
                and (self.parked is not None or self.g.has_avail()))

    def device_pending(self):
        """Used entries the device produced that flush() has not moved yet."""
        return self.shadow.used_pending() != 0

    # -- stopping --
    def in_flight_requests(self):
        """Guest requests in flight: [(seq, shadow head, avail state)], oldest
        first (the avail state is where their pop began)."""
        if self.mirror:
            out = [(self.chain_seq[h], h, None) for h in range(self.num)
                   if self.desc_chain[h] is not None]
        else:
            out = [(t[3], h, t[6]) for h, t in enumerate(self.shadow.tokens)
                   if t is not None and t[0] != INTERNAL]
        out.sort()
        return out

    def restart_index(self):
        """Where a restarted queue takes the next guest request from, once the
        device is stopped: requests in flight that are the last ones taken
        (in avail order) are handed back (rewound: the device never
        completed them); any other one is completed with an error
        (complete_with_error), since one index cannot express a gap.
        Returns (base, rewound, failed) where base is the ring's restart
        state (VHOST_USER_GET_VRING_BASE's value)."""
        reqs = self.in_flight_requests()
        k = 0
        for seq, _, _ in reversed(reqs):
            if seq != self.seq - k - 1:
                break
            k += 1
        if self.parked is not None:
            self.g.set_avail_state(self.parked[3])          # popped, never added
            self.parked = None
        if k:
            first = reqs[len(reqs) - k]
            state = first[2]
            if state is None:                               # mirrored: avail index
                state = (self.g.last_avail_idx - k) & 0xffff
            self.g.set_avail_state(state)
        return self.g.restart_base(), k, reqs[:len(reqs) - k]

    def complete_with_error(self, heads, blk):
        """Give requests back to the guest as failed, with nothing written but
        (blk) an I/O error status in the chain's last writable byte; their
        shadow descriptors are not reused (the queue is being torn down)."""
        g = self.g
        for h in heads:
            if self.mirror:
                chain = self.desc_chain[h]
                gid, ndescs = h, 1
                runs = [(chain[3], 1)] if chain[3] >= 0 else []
                self.desc_chain[h] = None
                self.shadow.in_flight -= 1
            else:
                token = self.shadow.tokens[h]
                gid, ndescs = token[0], token[5]
                runs = [(a, n) for a, n, w in token[2] if w]
                self.shadow.tokens[h] = None
                self.shadow.in_flight -= 1
            length = 0
            if blk and runs:
                gpa, n = runs[-1]
                self.mem.write(gpa + n - 1, bytes([VIRTIO_BLK_S_IOERR]))
                if self.wlog is not None:
                    self.wlog.mark(gpa + n - 1, 1)
                length = 1
            g.push(gid, length, ndescs)
        if g.publish():
            self._commit_log()
            smp_mb()
            self._call_guest()


class SvqStats:
    __slots__ = ("guest_kicks", "device_kicks", "device_calls", "guest_calls", "parked", "walks",
                 "bounced", "requests")

    def __init__(self):
        self.guest_kicks = self.device_kicks = self.device_calls = 0
        self.guest_calls = self.parked = self.walks = self.bounced = self.requests = 0


# ============================================================================
# pcap: the frames through net shadow queues, for tcpdump
# ============================================================================

LINKTYPE_ETHERNET = 1
PCAP_SNAPLEN = 65535
_PCAP_HDR = struct.Struct("<IHHiIII")      # magic, major, minor, thiszone, sigfigs, snaplen, network
_PCAP_REC = struct.Struct("<IIII")         # ts_sec, ts_usec, incl_len, orig_len


class PcapWriter:
    """A pcap file (microsecond timestamps, LINKTYPE_ETHERNET) of every frame
    the net shadow queues carry, both directions, the virtio-net header
    stripped: what tcpdump -r reads.  "-" is standard output.  A write that
    fails (the reader went away) ends the capture with one log line; the
    queues go on."""

    def __init__(self, path):
        if path == "-":
            if sys.stdout.isatty():
                raise UsageError("--pcap -: standard output is a terminal; pipe it (| tcpdump -r -)")
            self.f = sys.stdout.buffer
        else:
            try:
                self.f = open(path, "wb")
            except OSError as e:
                raise UsageError("--pcap %s: %s" % (path, e.strerror)) from None
        self.path = path
        self.frames = 0
        self._write(_PCAP_HDR.pack(0xa1b2c3d4, 2, 4, 0, 0, PCAP_SNAPLEN, LINKTYPE_ETHERNET))
        self.flush()

    def _write(self, data):
        if self.f is None:
            return
        try:
            self.f.write(data)
        except (OSError, ValueError) as e:
            self._stop(e)

    def _stop(self, e):
        _vlog("pcap %s: %s; capture stopped after %d frames"
              % (self.path, getattr(e, "strerror", None) or e, self.frames))
        self.f = None

    def frame(self, data):
        """One Ethernet frame (bytes), timestamped now."""
        t = time.time()
        sec = int(t)
        n = len(data)
        self._write(_PCAP_REC.pack(sec, int((t - sec) * 1e6), min(n, PCAP_SNAPLEN), n)
                    + data[:PCAP_SNAPLEN])
        self.frames += 1

    def flush(self):
        if self.f is not None:
            try:
                self.f.flush()
            except OSError as e:
                self._stop(e)

    def close(self):
        self.flush()
        if self.f is not None and self.path != "-":
            self.f.close()
        self.f = None


# ============================================================================
# Shadow queues on a device: written once for `run` and `serve`
# ============================================================================

def map_guest_memory(dev, mem):
    """Map every region of guest memory for the device, at IOVA = GPA where
    the device's IOVA range allows (first-fit elsewhere): translation is then
    the identity, and a switch to passthrough needs no remapping."""
    first, last = dev.iova_map.first, dev.iova_map.last
    for r in mem.regions:
        if first <= r.gpa and r.end - 1 <= last:
            r.iova = dev.map(r.hva, r.size, VHOST_ACCESS_RW, iova=r.gpa).iova
        else:
            r.iova = dev.map(r.hva, r.size, VHOST_ACCESS_RW).iova


def shadow_ring_size(num, dev):
    """A shadow ring as large as the device allows (up to VU_SHADOW_MAX), at
    least the guest's queue size, a power of two (the device's ring is split)."""
    size = 1
    while size < num:
        size <<= 1
    return max(size, min(dev.max_queue_size, VU_SHADOW_MAX))


class ShadowDevice:
    """The device side of shadow virtqueues: guest memory mapped for the
    device, per queue a shadow split ring in svq.py's memory (descriptors
    and avail device-readable, used device-writable), its kick and call
    eventfds, the ShadowVirtqueue that bridges it to a guest ring, bounce
    pools on demand; and all of it undone by teardown()."""

    def __init__(self, dev, mem, mapped=False):
        self.dev, self.mem = dev, mem
        self.svqs = []
        self.shadow_mems = []
        self.maps = []              # the IOTLB entries of ours (not guest memory)
        self.fds = []
        if not mapped:
            map_guest_memory(dev, mem)

    def add_queue(self, vq, guest_ring, guest_features, device_features, guest_kick, guest_call,
                  snum=None, log=None, log_used_gpa=None, last_avail_idx=0, guest_used_idx=0,
                  shadow_base=0, stats=None, guest_state=None, guest_gpas=None):
        dev = self.dev
        snum = snum or shadow_ring_size(guest_ring.num, dev)
        total, doff, aoff, uoff = SplitRing.layout(snum)
        smem = SharedMemory(total)
        self.shadow_mems.append(smem)
        sring = SplitRing(snum, smem.mv[doff:aoff], smem.mv[aoff:uoff], smem.mv[uoff:total])
        ro = dev.map(smem.hva, uoff, VHOST_ACCESS_RO)
        rw = dev.map(smem.hva + uoff, total - uoff, VHOST_ACCESS_RW)
        self.maps += [ro, rw]
        dkick, dcall = eventfd(), eventfd()
        self.fds += [dkick, dcall]
        svq = ShadowVirtqueue(vq, self.mem, guest_ring, sring, (ro.iova + doff, ro.iova + aoff, rw.iova),
                              guest_features, device_features, guest_kick, guest_call, dkick, dcall,
                              log=log, log_used_gpa=log_used_gpa, guest_used_idx=guest_used_idx,
                              last_avail_idx=last_avail_idx, shadow_base=shadow_base, stats=stats,
                              bounce=self.bounce_pool, guest_state=guest_state,
                              guest_gpas=guest_gpas)
        self.svqs.append(svq)
        dev.setup_vq(vq, snum, ro.iova + doff, ro.iova + aoff, rw.iova, dkick, dcall, shadow_base)
        return svq

    def bounce_pool(self):
        smem = SharedMemory(BouncePool.SIZE)
        self.shadow_mems.append(smem)
        m = self.dev.map(smem.hva, smem.size, VHOST_ACCESS_RW)
        self.maps.append(m)
        return BouncePool(smem, m.iova)

    def teardown(self, keep_guest=False):
        """Let go of every shadow ring view, eventfd and mapping; the IOTLB
        keeps guest memory with keep_guest (a switch to passthrough on a
        suspended device, which then uses the guest's rings), else it is
        emptied.  The device is reset or suspended already; with keep_guest
        its queues are set up anew by the caller (so no eventfd is unbound)."""
        dev = self.dev
        for svq in self.svqs:
            svq.set_log(None)
            svq.release()
            if dev.dev.fd >= 0 and not keep_guest:
                for setter in (dev.dev.set_vring_kick, dev.dev.set_vring_call):
                    try:
                        setter(svq.index, VHOST_FILE_UNBIND)
                    except DeviceError:
                        pass
        self.svqs = []
        if dev.dev.fd >= 0:
            if keep_guest:
                for m in self.maps:
                    try:
                        dev.unmap(m)
                    except (DeviceError, IOVAError):
                        pass
            else:
                dev.unmap_all()
                for r in self.mem.regions:
                    r.iova = None
        self.maps = []
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        for m in self.shadow_mems:
            m.close()
        self.shadow_mems = []


# ============================================================================
# Event loop
# ============================================================================

class EventLoop:
    """One selectors loop over eventfds, a periodic timer, and SIGINT/SIGTERM
    turned into an orderly stop (signal.set_wakeup_fd wakes the select)."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.stop_signal = None
        self.stopped = False
        self.child_exited = False
        self.on_child = None
        self._wake = None
        self._old = {}

    def add_reader(self, fd, callback):
        self.sel.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd):
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def install_signals(self, on_child=None):
        """SIGINT/SIGTERM stop the loop; with `on_child`, SIGCHLD calls it
        (from the loop, not from the signal handler)."""
        if threading.current_thread() is not threading.main_thread():
            return
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake = (r, w)
        self._old["wakeup"] = signal.set_wakeup_fd(w.fileno())
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)
        if on_child is not None:
            self.on_child = on_child
            self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child)
        self.add_reader(r.fileno(), self._drain_wake)

    def _on_signal(self, signum, frame):
        self.stop_signal = signum
        self.stopped = True

    def _on_child(self, signum, frame):
        self.child_exited = True

    def abandon(self):
        """In a forked child: drop this loop without touching what it shares
        with the parent (the epoll instance, the signal handlers)."""
        self.sel.close()            # closes our copy of the epoll fd only
        if self._wake:
            for s in self._wake:
                s.close()
        self._wake, self._old = None, {}

    def _drain_wake(self):
        try:
            self._wake[0].recv(64)
        except OSError:
            pass

    def stop(self):
        self.stopped = True

    def run(self, deadline=None, tick=None, tick_interval=0.25):
        next_tick = time.monotonic() + tick_interval
        select = self.sel.select
        while not self.stopped:
            now = time.monotonic()
            timeout = next_tick - now if tick else None
            if deadline is not None:
                if now >= deadline:
                    break
                timeout = min(timeout, deadline - now) if timeout is not None else deadline - now
            for key, _ in select(max(timeout, 0) if timeout is not None else None):
                key.data()
                if self.stopped:
                    break
            if self.child_exited:
                self.child_exited = False
                self.on_child()
            if tick and time.monotonic() >= next_tick:
                tick()
                next_tick = time.monotonic() + tick_interval

    def close(self):
        if self._wake:
            signal.set_wakeup_fd(self._old.pop("wakeup", -1))
            for sig, handler in self._old.items():
                signal.signal(sig, handler)
            self._old = {}
            for s in self._wake:
                s.close()
            self._wake = None
        self.sel.close()


# ============================================================================
# Built-in driver: svq.py plays the guest
# ============================================================================

class LatencyHistogram:
    """Log-linear histogram of nanoseconds, 8 sub-buckets per power of two."""

    def __init__(self):
        self.counts = [0] * 520
        self.n = 0

    def record(self, ns):
        b = ns.bit_length()
        self.counts[(b << 3) | ((ns >> (b - 4)) & 7) if b > 3 else ns] += 1
        self.n += 1

    def percentile(self, p):
        if not self.n:
            return 0
        want = max(1, int(self.n * p / 100.0 + 0.5))
        seen = 0
        for idx, c in enumerate(self.counts):
            seen += c
            if seen >= want:
                if idx < 32:
                    return idx
                b, sub = idx >> 3, idx & 7
                return (8 | sub) << (b - 4)
        return 0


class RunStats:
    def __init__(self):
        self.requests = 0
        self.bytes = 0
        self.errors = 0
        self.error_lines = []
        self.latency = LatencyHistogram()

    def error(self, msg):
        self.errors += 1
        if len(self.error_lines) < 10:
            self.error_lines.append(msg)


_PATTERN = bytes((i * 7 + 3) & 0xff for i in range(8192))


class Driver:
    """Common part of the built-in net and blk drivers."""
    queue_count = 1
    RESULT_FIELDS = ()                  # what the guest process reports back
    budget = 1 << 31                    # completions per call: no limit (see handle_call)

    def __init__(self, dev_type, config, features, num, count, size, write, run_id):
        self.dev_type, self.config, self.features = dev_type, config, features
        self.num, self.count, self.size, self.write = num, count, size, write
        self.run_id = run_id
        self.stats = RunStats()
        self.queues = []
        self.stopping = False
        self.on_done = None             # called once count requests completed

    def attach(self, queues):
        self.queues = queues

    def done(self):
        return self.count is not None and self.stats.requests >= self.count

    def in_flight(self):
        raise NotImplementedError

    def idle(self):
        return self.in_flight() == 0

    def memory_needed(self):
        raise NotImplementedError

    def region_split(self, base):
        """A page-aligned GPA between two of the buffers laid out from `base`."""
        raise NotImplementedError

    def first_buffer(self, base):
        """GPA of a buffer that every run uses, for buffers laid out from `base`."""
        raise NotImplementedError

    def handle_call(self, q):
        """A NAPI-style poll: complete at most `budget` used entries, then
        refill.  With the budget spent, callbacks stay off and the driver
        signals its own call eventfd, to be polled again after the loop's
        other events (napi_schedule): the device gets new work while the
        rest of a long batch waits, instead of the whole queue going round
        in lock-step.  Under the budget, callbacks are re-enabled, with the
        recheck that closes the race against a new entry."""
        eventfd_drain(q.call_fd)
        budget = self.budget
        while True:
            elem = q.get_used()
            if elem is None:
                if q.enable_cb():
                    break
                continue
            self.complete(q, elem[0], elem[1])
            budget -= 1
            if not budget:
                os.write(q.call_fd, _EVENTFD_ONE)
                break
        self.refill()
        if self.on_done is not None and self.done():
            self.on_done()


class NetDriver(Driver):
    """Sends frames to the device's MAC (TX, vq 1) and checks that every one
    comes back intact and in order on RX (vq 0): vdpa_sim_net loops TX to RX."""
    queue_count = 2
    # No budget (Driver's default): net drains every completion before it
    # refills.  A budget of 64 frames made its direct mode 6-9% slower.
    ETHERTYPE = 0x88B5                      # IEEE local experimental
    HDR = struct.Struct(">6s6sHQIIH")       # dst, src, type, seq, run, crc, plen (network order)
    SRC_MAC = b"\x02\x53\x56\x51\x00\x01"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        mac = self.config.get("mac")
        self.dst = bytes(int(x, 16) for x in mac.split(":")) if mac else b"\xff" * 6
        self.mtu = self.config.get("mtu", 1500)
        maxframe = min(self.mtu + 14, PAGE_SIZE - VIRTIO_NET_HDR_SIZE)
        minframe = self.HDR.size
        if self.size:
            if not minframe <= self.size <= maxframe:
                raise UsageError("--size for net is a frame size in [%d, %d]" % (minframe, maxframe))
            self.sizes = [self.size]
        else:
            self.sizes = sorted({s for s in (64, 128, 256, 512, 1024, 1514, maxframe) if s <= maxframe})
        self.buf_size = VIRTIO_NET_HDR_SIZE + maxframe
        self.next_seq = 0
        self.expect_seq = 0
        self.sent_at = {}
        self.rx_posted = 0

    def memory_needed(self):
        slot = page_align_up(self.buf_size) if self.buf_size > 2048 else 2048
        return 2 * self.num * slot + 2 * PAGE_SIZE

    def region_split(self, base):
        slot = page_align_up(self.buf_size) if self.buf_size > 2048 else 2048
        return base + self.num * slot          # between the RX and the TX buffers

    def first_buffer(self, base):
        return base                             # RX buffer 0

    def setup_buffers(self, mem, base):
        slot = page_align_up(self.buf_size) if self.buf_size > 2048 else 2048
        self.rx_gpa = [base + i * slot for i in range(self.num)]
        tx_base = base + self.num * slot
        self.tx_gpa = [tx_base + i * slot for i in range(self.num)]
        self.mem = mem
        self.scratch = bytearray(self.buf_size)

    def frame_size(self, seq):
        return self.sizes[seq % len(self.sizes)]

    def start(self):
        rx = self.queues[0]
        for i in range(self.num):
            rx.add([(self.rx_gpa[i], self.buf_size, True)], i, at=i)
        self.rx_posted = self.num
        rx.kick()
        self.refill()

    def refill(self):
        # RX buffers reposted by this batch of completions go first, so that
        # every frame in flight has one.
        self.queues[0].kick()
        if self.stopping:
            return
        tx = self.queues[1]
        # Keep half the RX ring spare: a reposted RX buffer may reach the device
        # after later TX frames (the shadow forwards each queue on its own kick),
        # and vdpa_sim drops a frame that finds no RX buffer.
        inflight_limit = self.num // 2
        added = False
        while (self.next_seq - self.expect_seq < inflight_limit and tx.num_free >= 2
               and (self.count is None or self.next_seq < self.count)):
            seq = self.next_seq
            unit = seq % (self.num // 2)        # descriptors 2*unit, 2*unit+1
            gpa = self.tx_gpa[unit]
            size = self.frame_size(seq)
            plen = size - self.HDR.size
            poff = seq % 251
            payload = _PATTERN[poff:poff + plen]
            frame = self.scratch
            self.HDR.pack_into(frame, VIRTIO_NET_HDR_SIZE, self.dst, self.SRC_MAC,
                               self.ETHERTYPE, seq, self.run_id, zlib.crc32(payload), plen)
            h = VIRTIO_NET_HDR_SIZE + self.HDR.size
            frame[h:h + plen] = payload
            self.mem.write(gpa, memoryview(frame)[:VIRTIO_NET_HDR_SIZE + size])
            if not tx.add([(gpa, VIRTIO_NET_HDR_SIZE, False),
                           (gpa + VIRTIO_NET_HDR_SIZE, size, False)], seq, at=2 * unit):
                break
            self.sent_at[seq] = time.perf_counter_ns()
            self.next_seq += 1
            added = True
        if added:
            tx.kick()

    def complete(self, q, token, length):
        if q.index == 1:                    # TX done: nothing to check
            return
        now = time.perf_counter_ns()
        st = self.stats
        gpa = self.rx_gpa[token]
        view = self.mem.read(gpa, min(length, self.buf_size))
        seq = self.expect_seq
        size = self.frame_size(seq)
        h = VIRTIO_NET_HDR_SIZE
        if length < h + self.HDR.size:
            st.error("rx frame %d: short frame of %d bytes" % (seq, length))
        else:
            dst, src, etype, rseq, run, crc, plen = self.HDR.unpack_from(view, h)
            payload = view[h + self.HDR.size:]
            if (dst, src, etype, run) != (self.dst, self.SRC_MAC, self.ETHERTYPE, self.run_id):
                st.error("rx frame: foreign frame (type %#x run %#x)" % (etype, run))
            else:
                if rseq != seq:
                    if seq < rseq < self.next_seq:
                        st.error("rx frames %d..%d lost" % (seq, rseq - 1))
                        for lost in range(seq, rseq):
                            self.sent_at.pop(lost, None)
                        seq = rseq          # resynchronise on the frame we got
                        size = self.frame_size(seq)
                    else:
                        st.error("rx frame: sequence %d where %d was expected" % (rseq, seq))
                if length != h + size or plen != size - self.HDR.size:
                    st.error("rx frame %d: %d bytes, expected %d" % (seq, length, h + size))
                elif zlib.crc32(payload) != crc or payload != _PATTERN[seq % 251:seq % 251 + plen]:
                    st.error("rx frame %d: payload corrupted" % seq)
        t0 = self.sent_at.pop(seq, None)
        if t0 is not None:
            st.latency.record(now - t0)
        st.requests += 1
        st.bytes += size
        self.expect_seq = seq + 1
        # Repost the buffer; refill() publishes the batch with one kick, as
        # Linux's virtio-net refills once per poll.
        q.add([(gpa, self.buf_size, True)], token, at=token)

    def in_flight(self):
        return self.next_seq - self.expect_seq  # frames sent, not yet back


class BlkDriver(Driver):
    """Reads (and with --write, writes then reads back) blocks stamped with
    their LBA and the run id; GET_ID first, FLUSH at the end."""
    HDR = struct.Struct("<IIQ")             # virtio_blk_outhdr: type, ioprio, sector
    RESULT_FIELDS = ("device_id_str", "flushed")
    STAMP = struct.Struct("<8sQQ")          # magic, run id, lba
    MAGIC = b"SVQBLK01"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        cfg = self.config
        self.capacity = cfg.get("capacity", 0)
        self.size = self.size or 4096
        if self.size % SECTOR_SIZE:
            raise UsageError("--size for blk must be a multiple of %d" % SECTOR_SIZE)
        size_max = cfg.get("size_max") or (1 << 32) - 1
        seg_max = cfg.get("seg_max") or 1 << 16
        self.seg_size = min(size_max, PAGE_SIZE * 16)
        self.nsegs = -(-self.size // self.seg_size)
        if self.nsegs > seg_max:
            raise UsageError("--size %d needs %d segments; the device takes %d of %d bytes"
                             % (self.size, self.nsegs, seg_max, size_max))
        self.sectors = self.size // SECTOR_SIZE
        if self.capacity < self.sectors:
            raise UsageError("device capacity %d sectors is smaller than one request" % self.capacity)
        indirect = self.features >> VIRTIO_RING_F_INDIRECT_DESC & 1
        self.stride = 1 if indirect else self.nsegs + 2     # descriptors per slot
        if self.stride > self.num:
            raise UsageError("--queue-size %d is too small for one %d-byte request (%d "
                             "descriptors; use a larger queue, or --indirect)"
                             % (self.num, self.size, self.stride))
        self.depth = min(max(1, self.num // self.stride), 64)
        # Refill when half the queue has come back, not all of it: blk-mq
        # reissues a tag as soon as it completes.
        self.budget = max(1, self.depth // 2)
        self.span = self.capacity - self.capacity % self.sectors
        self.next_lba = 0
        self.issued = 0
        self.flushed = None
        self.device_id_str = None
        if self.write and self.features >> VIRTIO_BLK_F_RO & 1:
            raise UsageError("--write on a read-only device")

    def memory_needed(self):
        return self.depth * (page_align_up(self.size) * 2 + 64) + 3 * PAGE_SIZE

    def region_split(self, base):
        data_sz = page_align_up(self.size)
        return base + (2 * data_sz * (self.depth // 2) if self.depth > 1 else data_sz)

    def first_buffer(self, base):
        return base + page_align_up(self.size)  # slot 0's read buffer

    def setup_buffers(self, mem, base):
        self.mem = mem
        self.scratch = bytearray(self.size)
        data_sz = page_align_up(self.size)
        self.data_gpa = [base + i * 2 * data_sz for i in range(self.depth)]
        self.check_gpa = [g + data_sz for g in self.data_gpa]
        meta = base + self.depth * 2 * data_sz
        self.hdr_gpa = [meta + i * 32 for i in range(self.depth + 1)]
        self.status_gpa = [g + 16 for g in self.hdr_gpa]
        self.id_gpa = meta + (self.depth + 1) * 32
        self.slot_state = [None] * self.depth   # (kind, lba, t0)
        self.free_slots = list(range(self.depth - 1, -1, -1))

    @classmethod
    def fill_sector_pattern(cls, buf, off, run_id, lba):
        cls.STAMP.pack_into(buf, off, cls.MAGIC, run_id, lba)
        p = (lba * 13) % 251
        buf[off + 24:off + SECTOR_SIZE] = _PATTERN[p:p + SECTOR_SIZE - 24]

    @classmethod
    def sector_pattern(cls, run_id, lba):
        """The 512 bytes svq.py writes at `lba` in run `run_id` (for checking images)."""
        buf = bytearray(SECTOR_SIZE)
        cls.fill_sector_pattern(buf, 0, run_id, lba)
        return bytes(buf)

    def _segments(self, gpa, length, write):
        return [(gpa + o, min(self.seg_size, length - o), write)
                for o in range(0, length, self.seg_size)]

    def _submit(self, slot, kind, lba, data_gpa=None, length=0, verify=False):
        q = self.queues[0]
        self.mem.write(self.hdr_gpa[slot], self.HDR.pack(kind, 0, lba) + b"\xff")
        bufs = [(self.hdr_gpa[slot], 16, False)]
        if length:
            bufs += self._segments(data_gpa, length, kind != VIRTIO_BLK_T_OUT)
        bufs.append((self.status_gpa[slot], 1, True))
        if not q.add(bufs, slot, at=slot * self.stride):
            return False
        self.slot_state[slot] = (kind, lba, length, verify, time.perf_counter_ns())
        return True

    def start(self):
        # GET_ID first; the load starts when it completes.
        self.get_id_pending = True
        slot = self.free_slots.pop()
        self._submit(slot, VIRTIO_BLK_T_GET_ID, 0, self.id_gpa, VIRTIO_BLK_ID_BYTES)
        self.queues[0].kick()

    def refill(self):
        q = self.queues[0]
        added = False
        while self.free_slots and not self.stopping and not self.get_id_pending:
            if self.count is not None and self.issued >= self.count:
                break
            slot = self.free_slots.pop()
            lba = self.next_lba
            self.next_lba = (lba + self.sectors) % self.span
            if self.write:
                data = self.scratch
                for s in range(self.sectors):
                    self.fill_sector_pattern(data, s * SECTOR_SIZE, self.run_id, lba + s)
                self.mem.write(self.data_gpa[slot], data)
                ok = self._submit(slot, VIRTIO_BLK_T_OUT, lba, self.data_gpa[slot], self.size)
            else:
                ok = self._submit(slot, VIRTIO_BLK_T_IN, lba, self.check_gpa[slot], self.size)
            if not ok:
                self.free_slots.append(slot)
                break
            self.issued += 1
            added = True
        if added:
            q.kick()

    def complete(self, q, slot, length):
        now = time.perf_counter_ns()
        st = self.stats
        kind, lba, size, verify, t0 = self.slot_state[slot]
        self.slot_state[slot] = None
        status = self.mem.read(self.status_gpa[slot], 1)[0]
        what = {VIRTIO_BLK_T_IN: "read", VIRTIO_BLK_T_OUT: "write",
                VIRTIO_BLK_T_FLUSH: "flush", VIRTIO_BLK_T_GET_ID: "get-id"}[kind]
        if kind == VIRTIO_BLK_T_GET_ID:
            self.get_id_pending = False
            if status == VIRTIO_BLK_S_OK:
                raw = self.mem.read(self.id_gpa, VIRTIO_BLK_ID_BYTES)
                self.device_id_str = raw.split(b"\0")[0].decode("ascii", "replace")
            self.free_slots.append(slot)
            return
        if status != VIRTIO_BLK_S_OK:
            st.error("%s at lba %d: status %d" % (what, lba, status))
            self.free_slots.append(slot)
            return
        if kind == VIRTIO_BLK_T_FLUSH:
            self.flushed = True
            self.free_slots.append(slot)
            return
        # Used length: bytes the device wrote, data (reads) plus the status byte.
        expect_len = 1 + (size if kind == VIRTIO_BLK_T_IN else 0)
        if length != expect_len:
            st.error("%s at lba %d: used length %d, expected %d" % (what, lba, length, expect_len))
        st.latency.record(now - t0)
        st.requests += 1
        st.bytes += size
        if kind == VIRTIO_BLK_T_OUT and not self.stopping:
            # Read the block back into the check buffer; compare on completion.
            if self._submit(slot, VIRTIO_BLK_T_IN, lba, self.check_gpa[slot], size, True):
                q.kick()
                return
        if verify:
            got = self.mem.read(self.check_gpa[slot], size)
            want = self.mem.read(self.data_gpa[slot], size)
            if got != want:
                bad = next(i for i in range(0, size, SECTOR_SIZE)
                           if got[i:i + SECTOR_SIZE] != want[i:i + SECTOR_SIZE])
                st.error("lba %d: read back differs from what was written"
                         % (lba + bad // SECTOR_SIZE))
        self.free_slots.append(slot)

    def finish(self):
        """FLUSH after writing, if the device has a write cache to flush."""
        if self.write and self.features >> VIRTIO_BLK_F_FLUSH & 1 and self.free_slots:
            slot = self.free_slots.pop()
            self._submit(slot, VIRTIO_BLK_T_FLUSH, 0)
            self.queues[0].kick()
            return True
        return False

    def in_flight(self):
        return self.depth - len(self.free_slots)


class BuiltinRun:
    """Device + guest memory + (shadow) queues + built-in driver + loop."""

    GUEST_BASE = 0x100000       # first guest-physical address (1 MiB)
    STALL_SECONDS = 5.0

    def __init__(self, path, direct=False, queue_size=None, count=None, seconds=5.0,
                 size=None, write=False, indirect=False, event_idx=True, progress=None,
                 ring_base=0, straddle=False, cpus=None, packed=False, pcap=None,
                 device_type=None, log_toggle=None, opener=VhostVdpa):
        self.path, self.direct = path, direct
        self.device_type, self.log_toggle = device_type, log_toggle
        self.vhost_user = _is_socket(path)
        self.log_switch_ms = {"on": [], "off": []}  # --log-toggle: SET_FEATURES to its ack
        self.cpus = _check_cpus(cpus)           # (driver CPU, svq CPU) or None
        self.straddle = straddle
        self.ring_base = ring_base
        self.count, self.seconds = count, seconds
        self.progress = progress
        self.fds = []
        self.svqs = []
        self.sdev = None
        self.packed = packed
        self.pcap_path = pcap
        self.pcap = None
        self.mem = None
        self.dev = None
        self.loop = None
        self.log = None
        self.ring_errors = []
        self.guest_pid = None
        self.driver_kicks = 0
        self.elapsed = 0.0
        self.driver_cpu = self.svq_cpu = None   # CPU seconds of each process
        self.affinity = {}                      # CPUs each process ran on
        self.svq_stats = SvqStats()
        self.run_id = int.from_bytes(os.urandom(4), "little")
        try:
            self._setup(queue_size, size, write, indirect, event_idx, opener)
        except BaseException:
            self.close()
            raise

    def _eventfd(self):
        fd = eventfd()
        self.fds.append(fd)
        return fd

    def _setup(self, queue_size, size, write, indirect, event_idx, opener):
        check_barriers()
        if self.vhost_user:
            if self.device_type is None:
                raise UsageError("%s is a vhost-user socket: say --type net or --type blk "
                                 "(vhost-user does not tell a device's type)" % self.path)
            if self.direct:
                raise UsageError("--direct is for vDPA devices (a vhost-user backend always "
                                 "uses the driver's own rings)")
            self.direct = True          # the backend gets the driver's rings
            self.dev = dev = VhostUserDevice(self.path, self.device_type)
            if self.log_toggle:
                dev.check_logging()
        else:
            if self.device_type is not None:
                raise UsageError("--type is for vhost-user sockets (a vDPA device says its type)")
            if self.log_toggle:
                raise UsageError("--log-toggle is for vhost-user sockets")
            self.dev = dev = VdpaDevice(self.path, opener)
        if dev.device_id not in (VIRTIO_ID_NET, VIRTIO_ID_BLOCK):
            raise SvqError("%s: device type %d is not supported by the built-in driver "
                           "(net and blk are)" % (self.path, dev.device_id))
        num = queue_size or min(256, dev.max_queue_size)
        if num < 2 or num & (num - 1):
            raise UsageError("--queue-size %d is not a power of two >= 2" % num)
        if num > dev.max_queue_size:
            raise UsageError("--queue-size %d is above the device maximum %d"
                             % (num, dev.max_queue_size))
        wanted = svq_device_features(dev.device_id)
        driver_can = wanted | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        if not event_idx:
            driver_can &= ~(1 << VIRTIO_RING_F_EVENT_IDX)
        if not indirect:
            driver_can &= ~(1 << VIRTIO_RING_F_INDIRECT_DESC)
        if self.packed:
            if self.ring_base:
                raise UsageError("--ring-base is for split rings (a packed ring wraps every "
                                 "queue size descriptors anyway)")
            if self.direct and not dev.device_features >> VIRTIO_F_RING_PACKED & 1:
                if self.vhost_user:
                    raise UsageError("--packed: the backend at %s offers no packed ring "
                                     "(VIRTIO_F_RING_PACKED)" % self.path)
                raise UsageError("--packed --direct: %s has no packed ring (VIRTIO_F_RING_PACKED); "
                                 "without --direct the shadow ring carries the driver's packed "
                                 "ring to the device's split one" % self.path)
            driver_can |= 1 << VIRTIO_F_RING_PACKED
        if self.direct:
            device_features = dev.negotiate(driver_can)
            guest_features = device_features
        else:
            device_features = dev.negotiate(wanted)
            guest_features = (device_features | SVQ_GUEST_EXTRA_FEATURES) & driver_can
        self.device_features, self.guest_features = device_features, guest_features
        self.config = dev.config()
        cls = NetDriver if dev.device_id == VIRTIO_ID_NET else BlkDriver
        if write and cls is NetDriver:
            raise UsageError("--write is for block devices")
        self.driver = drv = cls(dev.type, self.config, guest_features, num, self.count,
                                size, write, self.run_id)
        nq = cls.queue_count
        # Guest memory, in two regions: rings and indirect tables, then the
        # buffers.  The regions meet between two buffers; with `straddle` the
        # buffers start 256 bytes before a page and the regions meet inside a
        # buffer every run uses (the shadow must split it: copied layout).
        ring_layout = PackedRing.layout if self.packed else SplitRing.layout
        ring_bytes = page_align_up(ring_layout(num)[0])
        ind_max = 8 + drv.queue_count + getattr(drv, "nsegs", 0)
        ind_bytes = page_align_up(num * ind_max * 16)
        rings_end = self.GUEST_BASE + nq * (ring_bytes + ind_bytes)
        if self.straddle:
            buf_base = rings_end + PAGE_SIZE - 256
            split = page_align_up(drv.first_buffer(buf_base) + 1)
        else:
            buf_base = rings_end
            split = drv.region_split(buf_base)
        total = page_align_up(buf_base + drv.memory_needed() - self.GUEST_BASE)
        first = min(split - self.GUEST_BASE, total - PAGE_SIZE)
        layout = [(self.GUEST_BASE, first), (self.GUEST_BASE + first, total - first)]
        # A vhost-user backend maps the driver's memory from its files.
        self.mem = mem = (GuestMemory.memfd if self.vhost_user else GuestMemory.anonymous)(layout)
        if self.vhost_user:
            dev.set_mem_table(mem)
        elif self.direct:
            map_guest_memory(dev, mem)
        else:
            self.sdev = ShadowDevice(dev, mem)
            self.log = DirtyLog(mem.size >> PAGE_SHIFT)
        drv.setup_buffers(mem, buf_base)
        queues = []
        base = self.ring_base
        for vq in range(nq):
            ring_gpa = self.GUEST_BASE + vq * (ring_bytes + ind_bytes)
            kick, call = self._eventfd(), self._eventfd()
            dq = driver_queue(vq, mem, num, ring_gpa, guest_features, kick, call,
                              ring_gpa + ring_bytes, ind_max, base, fixed=True)
            queues.append(dq)
            if self.direct:
                # A packed ring's VHOST_SET_VRING_BASE: both wrap counters at 1.
                dev.setup_vq(vq, num, dq.desc_gpa, dq.avail_gpa, dq.used_gpa, kick, call,
                             dq.state() if self.packed else base)
            else:
                self.svqs.append(self.sdev.add_queue(
                    vq, dq.ring, guest_features, device_features, dq.kick_fd, dq.call_fd, snum=num,
                    log=self.log, log_used_gpa=dq.used_gpa, last_avail_idx=base,
                    guest_used_idx=base, shadow_base=base, stats=self.svq_stats,
                    guest_gpas=(dq.desc_gpa, dq.used_gpa) if self.packed else None))
        drv.attach(queues)
        if self.pcap_path is not None:
            if cls is not NetDriver:
                raise UsageError("--pcap is for net devices")
            if self.vhost_user:
                raise UsageError("--pcap is for vDPA devices (the frames of a vhost-user "
                                 "backend never pass through this process)")
            if self.direct:
                raise UsageError("--pcap needs the shadow queues (the frames of --direct never "
                                 "pass through svq.py)")
            self.pcap = PcapWriter(self.pcap_path)
            for svq, direction in zip(self.svqs, ("rx", "tx")):
                svq.set_pcap(self.pcap, direction)
        self.nq = nq                    # run() starts them (DRIVER_OK), after the fork

    # -- running --
    #
    # The guest runs in a child process, as a VM's vCPU runs beside the
    # hypervisor thread that serves its shadow queues.  Guest memory and rings
    # are MAP_SHARED and the eventfds are inherited, so the two sides share
    # exactly what a guest and a hypervisor share.  With `cpus`, each process
    # is pinned to a CPU of its own, as a vCPU thread and the SVQ thread
    # would be: nothing else's work then lands on the driver's CPU.

    #
    # The fork comes before DRIVER_OK, while this process has one thread: a
    # device may start threads of its own as it goes live (mockvdpa does, in
    # this process), and a child forked beside running threads can inherit a
    # lock one of them held, and hang on it (Python 3.12+ warns of that fork).
    # The guest then waits for the go pipe before it posts anything, as a
    # guest driver waits for DRIVER_OK.

    def run(self):
        self.loop = loop = EventLoop()
        loop.install_signals()
        self.stop_fd = self._eventfd()          # host -> guest: stop submitting
        rfd, wfd = os.pipe()                    # guest -> host: its results
        go_r, go_w = os.pipe()                  # host -> guest: the device is live
        sys.stdout.flush()
        sys.stderr.flush()
        self.host_pid = os.getpid()
        pid = os.fork()
        if pid == 0:                            # the guest
            code = 1
            try:
                os.close(rfd)
                os.close(go_w)
                self._go_fd = go_r
                self._guest_process(wfd)
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        os.close(go_r)
        self.guest_pid = pid
        saved = os.sched_getaffinity(0)
        try:
            try:
                self.dev.start(range(self.nq))
                os.write(go_w, b"g")
            finally:
                os.close(go_w)                  # EOF without "g": the guest just exits
            cpu0 = time.process_time()
            if self.cpus:
                _pin(self.cpus[1])
            self.affinity["svq"] = sorted(os.sched_getaffinity(0))
            self._host_process(rfd, pid)
            self.svq_cpu = time.process_time() - cpu0
        finally:
            if self.cpus:
                os.sched_setaffinity(0, saved)
            os.close(rfd)
            if self.guest_pid:
                os.kill(self.guest_pid, signal.SIGKILL)
                os.waitpid(self.guest_pid, 0)

    def _host_process(self, rfd, pid):
        """Serve the shadow queues until the guest reports its results."""
        loop = self.loop
        chunks = []

        def on_result():
            data = os.read(rfd, 1 << 16)
            if data:
                chunks.append(data)
            else:
                loop.remove_reader(rfd)
                loop.stop()

        def guarded(fn):
            def cb():
                try:
                    fn()
                except RingError as e:
                    self.ring_errors.append(str(e))
                    os.write(self.stop_fd, _EVENTFD_ONE)
            return cb
        loop.add_reader(rfd, on_result)
        for svq in self.svqs:
            loop.add_reader(svq.guest_kick_fd, guarded(svq.handle_guest_kick))
            loop.add_reader(svq.device_call_fd, guarded(svq.handle_device_call))
        # Run until the guest is done; a signal asks it to stop and drain,
        # while the shadow queues keep serving what it has in flight.
        loop.run(tick=self._toggle_log if self.log_toggle else None,
                 tick_interval=self.log_toggle or 0.25)
        if loop.stop_signal is not None:
            os.write(self.stop_fd, _EVENTFD_ONE)
            loop.stopped = False
            loop.run(deadline=time.monotonic() + 10)
        os.waitpid(pid, 0)
        self.guest_pid = None
        for svq in self.svqs:                   # pending used entries
            if svq.broken is None:
                try:
                    svq.flush()
                except RingError as e:
                    self.ring_errors.append(str(e))
        self._load_guest_results(b"".join(chunks))

    def _toggle_log(self):
        """--log-toggle: dirty logging on, or off, as a migration starts and
        fails; a backend that refuses stops the run."""
        on = not self.dev.logging
        try:
            took = self.dev.set_logging(on)
        except SvqError as e:
            self.ring_errors.append("dirty logging %s: %s" % ("on" if on else "off", e))
            os.write(self.stop_fd, _EVENTFD_ONE)
            self.log_toggle = None
            return
        self.log_switch_ms["on" if on else "off"].append(round(took * 1e3, 2))

    def _load_guest_results(self, raw):
        st = self.driver.stats
        try:
            res = json.loads(raw.decode())
        except ValueError:
            st.error("the guest process died without results")
            self.elapsed = 0.0
            return
        self.elapsed = res.pop("elapsed")
        self.driver_cpu = res.pop("cpu")
        self.driver_kicks = res.pop("driver_kicks")
        self.affinity["driver"] = res.pop("affinity")
        st.latency.counts = res.pop("latency")
        st.latency.n = sum(st.latency.counts)
        for k, v in res.pop("driver").items():
            setattr(self.driver, k, v)
        for k, v in res.items():
            setattr(st, k, v)
        for e in self.ring_errors:
            st.error(e)

    def _guest_process(self, wfd):
        """The child: the built-in driver on its own event loop.  It holds no
        device fd (vhost-vdpa opens once: a child that outlived a killed
        parent would keep the device busy) and dies with its parent."""
        global _fence_lock
        _fence_lock = threading.Lock()          # never inherit a held lock
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # the host coordinates the stop
        signal.set_wakeup_fd(-1)
        _set_pdeathsig(signal.SIGKILL)
        if os.getppid() != self.host_pid:
            return                              # the parent is gone already
        if self.vhost_user:
            self.dev.sock.close()               # the connection is the parent's
        elif isinstance(self.dev.dev, VhostVdpa) and self.dev.dev.fd >= 0:
            os.close(self.dev.dev.fd)
        if self.cpus:
            _pin(self.cpus[0])
        if os.read(self._go_fd, 1) != b"g":
            return                              # the device did not start
        os.close(self._go_fd)
        drv = self.driver
        loop = EventLoop()
        def guarded(fn):
            def cb():
                try:
                    fn()
                except RingError as e:      # the device side broke the driver's ring
                    drv.stats.error(str(e))
                    loop.stop()
            return cb
        for dq in drv.queues:
            loop.add_reader(dq.call_fd, guarded(lambda dq=dq: drv.handle_call(dq)))
        def on_stop():
            eventfd_drain(self.stop_fd)
            loop.remove_reader(self.stop_fd)    # once: the drain must not spin on it
            loop.stop()
        loop.add_reader(self.stop_fd, on_stop)
        self.t0 = time.monotonic()
        deadline = self.t0 + self.seconds if self.seconds else None
        drv.on_done = loop.stop
        watch = {"requests": -1, "since": self.t0}

        def tick():
            # A device that stops completing requests must not hang the run.
            now = time.monotonic()
            if drv.stats.requests != watch["requests"] or drv.idle():
                watch.update(requests=drv.stats.requests, since=now)
            elif now - watch["since"] > self.STALL_SECONDS:
                drv.stats.error("device stalled: no completion for %.0f s" % self.STALL_SECONDS)
                loop.stop()
            if self.progress:
                self.progress(self)
        try:
            drv.start()
            loop.run(deadline=deadline, tick=tick)
        except RingError as e:
            drv.stats.error(str(e))
        drv.on_done = None
        elapsed = time.monotonic() - self.t0
        self._guest_drain(loop)
        st = drv.stats
        res = {"elapsed": elapsed, "requests": st.requests, "bytes": st.bytes,
               "errors": st.errors, "error_lines": st.error_lines,
               "latency": st.latency.counts,
               "driver_kicks": sum(q.kicks for q in drv.queues),
               "cpu": time.process_time(),
               "affinity": sorted(os.sched_getaffinity(0)),
               "driver": {k: getattr(drv, k) for k in drv.RESULT_FIELDS}}
        data = json.dumps(res).encode()
        while data:
            data = data[os.write(wfd, data):]
        loop.close()

    def _guest_drain(self, loop, grace=2.0):
        """Stop submitting, let in-flight requests complete, FLUSH (blk)."""
        drv = self.driver
        drv.stopping = True
        loop.stopped = False
        end = time.monotonic() + grace
        flushing = False
        while time.monotonic() < end:
            if drv.idle():
                if not flushing and isinstance(drv, BlkDriver) and drv.finish():
                    flushing = True
                else:
                    break
            try:
                loop.run(deadline=min(end, time.monotonic() + 0.05))
            except RingError as e:
                drv.stats.error(str(e))
                break
            loop.stopped = False
        if not drv.idle():
            drv.stats.error("%d requests still in flight after stopping" % drv.in_flight())

    def summary(self):
        st = self.driver.stats
        secs = max(getattr(self, "elapsed", 0.0), 1e-9)
        s = self.svq_stats
        if self.direct:
            kicks = {"guest": self.driver_kicks, "device": None}
            calls = {"device": None, "guest": None}
        else:
            kicks = {"guest": s.guest_kicks, "device": s.device_kicks}
            calls = {"device": s.device_calls, "guest": s.guest_calls}
        log = self.dev.log if self.vhost_user else self.log
        out = {
            "device": self.path, "type": self.dev.type,
            "mode": "vhost-user" if self.vhost_user else "direct" if self.direct else "shadow",
            "requests": st.requests, "bytes": st.bytes, "seconds": round(secs, 3),
            "requests_per_second": round(st.requests / secs, 1),
            "mbit_per_second": round(st.bytes * 8 / secs / 1e6, 2),
            "latency_us": {"p50": round(st.latency.percentile(50) / 1000, 1),
                           "p99": round(st.latency.percentile(99) / 1000, 1)},
            "errors": st.errors, "error_messages": st.error_lines,
            "dirty_pages": log.count() if log is not None else None,
            "kicks": kicks, "calls": calls, "parked": s.parked,
            "layout": None if self.direct else ["mirrored" if q.mirror else "copied" for q in self.svqs],
            "chain_walks": None if self.direct else s.walks,
            "cpu_seconds": {"driver": _round(self.driver_cpu, 3),
                            "svq": None if self.direct else _round(self.svq_cpu, 3)},
            "cpus": {"pinned": self.cpus is not None,
                     "driver": self.affinity.get("driver"), "svq": self.affinity.get("svq")},
            "queue_size": self.driver.num, "ring": "packed" if self.packed else "split",
            "device_features": feature_names(self.device_features, _type_names(self.dev.device_id)),
            "guest_features": feature_names(self.guest_features, _type_names(self.dev.device_id)),
            "config": self.config, "run_id": self.run_id,
            "pcap_frames": self.pcap.frames if self.pcap is not None else None,
        }
        if self.vhost_user:
            out["log_toggle_ms"] = self.log_switch_ms
        if isinstance(self.driver, BlkDriver):
            out.update(write=self.driver.write, request_size=self.driver.size,
                       blk_id=self.driver.device_id_str, flushed=self.driver.flushed,
                       lba_span=self.driver.span)
        else:
            out.update(frame_sizes=self.driver.sizes)
        return out

    def close(self):
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        if self.dev is not None:
            self.dev.close()        # reset, unmap every IOTLB entry, close
        if self.sdev is not None:
            self.sdev.teardown()    # the shadow rings' views, eventfds, memory
            self.sdev = None
        if self.pcap is not None:
            self.pcap.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        for q in getattr(getattr(self, "driver", None), "queues", []):
            q.release()
        self.svqs = []
        if self.mem is not None:
            self.mem.close()
            self.mem = None


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _type_names(device_id):
    return {VIRTIO_ID_NET: NET_FEATURE_NAMES, VIRTIO_ID_BLOCK: BLK_FEATURE_NAMES}.get(device_id)


def cpu_list(cpus):
    """CPU numbers as the kernel writes a cpulist: '0-3,6'."""
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else "%d-%d" % (cpus[i], cpus[j]))
        i = j + 1
    return ",".join(out)


def _check_cpus(cpus):
    """(driver CPU, svq CPU), each one this process may run on, or None."""
    if cpus is None:
        return None
    allowed = os.sched_getaffinity(0)
    for cpu in cpus:
        if cpu not in allowed:
            raise UsageError("--cpus: CPU %d is not available to this process (allowed: %s)"
                             % (cpu, cpu_list(allowed)))
    return tuple(cpus)


def _pin(cpu):
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as e:
        raise SvqError("sched_setaffinity(CPU %d): %s" % (cpu, e.strerror))


# ============================================================================
# info
# ============================================================================

def device_info(path, opener=VhostVdpa):
    dev = opener(path)
    try:
        status = dev.get_status()
        dev.set_owner()
        did = dev.get_device_id()
        names = _type_names(did)
        feats = dev.get_features()
        backend = dev.get_backend_features()
        dev.set_backend_features(backend & SVQ_BACKEND_FEATURES)
        size = dev.get_config_size()
        raw = dev.get_config(0, size) if size else b""
        config = (decode_net_config(raw, feats) if did == VIRTIO_ID_NET else
                  decode_blk_config(raw, feats) if did == VIRTIO_ID_BLOCK else {})
        nvqs = dev.get_vqs_count()
        first, last = dev.get_iova_range()
        info = {
            "device": path, "device_id": did, "type": DEVICE_TYPES.get(did, "unknown"),
            "device_features": "%#018x" % feats,
            "device_feature_names": feature_names(feats, names),
            "backend_features": "%#x" % backend,
            "backend_feature_names": [BACKEND_FEATURE_NAMES.get(b, "bit%d" % b)
                                      for b in range(64) if backend >> b & 1],
            "config_size": size, "config": config,
            "num_queues": nvqs, "max_queue_size": dev.get_vring_num(),
            "iova_range": ["%#x" % first, "%#x" % last],
            "status": status_names(status),
        }
        sizes = []
        for vq in range(nvqs):
            try:
                sizes.append(dev.get_vring_size(vq))
            except DeviceError:
                sizes = None
                break
        if sizes:
            info["queue_sizes"] = sizes
        for key, get in (("groups", dev.get_group_num), ("address_spaces", dev.get_as_num),
                         ("queue_groups", lambda: [dev.get_vring_group(vq) for vq in range(nvqs)])):
            try:
                info[key] = get()
            except DeviceError:
                pass
        return info
    finally:
        dev.close()


def format_info(info):
    lines = ["%s: virtio-%s (device id %d)" % (info["device"], info["type"], info["device_id"]),
             "  device features  %s %s" % (info["device_features"],
                                           " ".join(info["device_feature_names"])),
             "  backend features %s %s" % (info["backend_features"],
                                           " ".join(info["backend_feature_names"]))]
    for k, v in info["config"].items():
        lines.append("  config %-10s %s" % (k, " ".join(v) if isinstance(v, list) else v))
    lines.append("  queues           %d, max size %d%s" % (
        info["num_queues"], info["max_queue_size"],
        " (sizes %s)" % info["queue_sizes"] if "queue_sizes" in info else ""))
    if "groups" in info:
        lines.append("  groups           %s, address spaces %s, queue groups %s" % (
            info["groups"], info.get("address_spaces", "?"), info.get("queue_groups", "?")))
    lines.append("  iova range       [%s, %s]" % tuple(info["iova_range"]))
    lines.append("  status           %s" % " ".join(info["status"]))
    return "\n".join(lines)


# ============================================================================
# vdpa devices over generic netlink: `svq.py dev ...`, `svq.py mgmtdev ...`
# ============================================================================
#
# What iproute2's `vdpa` tool does, for a host that lacks it (an initramfs, a
# rescue image): the kernel's "vdpa" generic netlink family (drivers/vdpa/
# vdpa.c) lists management devices (vdpasim_net, vduse, a NIC's PF), creates
# and deletes vDPA devices on them, and reports each device, its config space
# and its vendor statistics.  Every constant, command and attribute number
# is the uapi's (linux/netlink.h, linux/genetlink.h, linux/vdpa.h of 6.12);
# the messages are built and parsed with struct, in host byte order, as
# netlink wants.  Output, text and JSON (-j, -p), follows iproute2's vdpa
# (6.1) field for field, so a script can call either tool.

NETLINK_GENERIC = 16
SOL_NETLINK = 270                   # from <sys/socket.h>
NETLINK_CAP_ACK = 10                # errors do not echo our request back
NETLINK_EXT_ACK = 11                # errors carry the kernel's message
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_CAPPED = 0x100                # on NLMSG_ERROR: the request was not copied
NLM_F_ACK_TLVS = 0x200              # on NLMSG_ERROR/DONE: extended ack attributes follow
NLMSG_NOOP = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLMSG_OVERRUN = 0x4
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xffff
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

VDPA_GENL_NAME = "vdpa"
VDPA_GENL_VERSION = 0x1
VDPA_CMD_MGMTDEV_GET = 2
VDPA_CMD_DEV_NEW = 3
VDPA_CMD_DEV_DEL = 4
VDPA_CMD_DEV_GET = 5
VDPA_CMD_DEV_CONFIG_GET = 6
VDPA_CMD_DEV_VSTATS_GET = 7
VDPA_ATTR_MGMTDEV_BUS_NAME = 1
VDPA_ATTR_MGMTDEV_DEV_NAME = 2
VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES = 3
VDPA_ATTR_DEV_NAME = 4
VDPA_ATTR_DEV_ID = 5
VDPA_ATTR_DEV_VENDOR_ID = 6
VDPA_ATTR_DEV_MAX_VQS = 7
VDPA_ATTR_DEV_MAX_VQ_SIZE = 8
VDPA_ATTR_DEV_MIN_VQ_SIZE = 9
VDPA_ATTR_DEV_NET_CFG_MACADDR = 10
VDPA_ATTR_DEV_NET_STATUS = 11       # the uapi says u8; the kernel puts a u16
VDPA_ATTR_DEV_NET_CFG_MAX_VQP = 12
VDPA_ATTR_DEV_NET_CFG_MTU = 13
VDPA_ATTR_DEV_NEGOTIATED_FEATURES = 14
VDPA_ATTR_DEV_MGMTDEV_MAX_VQS = 15
VDPA_ATTR_DEV_SUPPORTED_FEATURES = 16
VDPA_ATTR_DEV_QUEUE_INDEX = 17
VDPA_ATTR_DEV_VENDOR_ATTR_NAME = 18
VDPA_ATTR_DEV_VENDOR_ATTR_VALUE = 19
VDPA_ATTR_DEV_FEATURES = 20
VDPA_ATTR_DEV_BLK_CFG_CAPACITY = 21
VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX = 22
VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE = 23
VDPA_ATTR_DEV_BLK_CFG_SEG_MAX = 24
VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES = 25
VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP = 26
VDPA_ATTR_DEV_BLK_CFG_ALIGN_OFFSET = 27
VDPA_ATTR_DEV_BLK_CFG_MIN_IO_SIZE = 28
VDPA_ATTR_DEV_BLK_CFG_OPT_IO_SIZE = 29
VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEC = 30
VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEG = 31
VDPA_ATTR_DEV_BLK_CFG_DISCARD_SEC_ALIGN = 32
VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC = 33
VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG = 34
VDPA_ATTR_DEV_BLK_READ_ONLY = 35
VDPA_ATTR_DEV_BLK_FLUSH = 36
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2
VIRTIO_TRANSPORT_F_START = 28
VIRTIO_TRANSPORT_F_END = 42

_NLMSGHDR = struct.Struct("=IHHII")     # struct nlmsghdr {len, type, flags, seq, pid}
_GENLMSGHDR = struct.Struct("=BBH")     # struct genlmsghdr {cmd, version, reserved}
_NLATTR = struct.Struct("=HH")          # struct nlattr {nla_len, nla_type}
_NLMSGERR = struct.Struct("=i")         # struct nlmsgerr's error, before the echoed header
_NL_U8, _NL_U16 = struct.Struct("=B"), struct.Struct("=H")
_NL_U32, _NL_U64 = struct.Struct("=I"), struct.Struct("=Q")
_NL_UINTS = {1: _NL_U8, 2: _NL_U16, 4: _NL_U32, 8: _NL_U64}
NL_RECV_SIZE = 1 << 16              # a dump's skb is at most 32 KiB
NL_TIMEOUT = 10.0

# Names as iproute2's vdpa prints them.  Feature bits below 28 and above 42
# are named for net devices only (iproute2 has no table for blk: it prints
# bit_N, or N in JSON); the transport bits have names for every class.
VDPA_NET_FEATURE_NAMES = {
    0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC",
    7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4",
    12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS",
    17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA",
    21: "GUEST_ANNOUNCE", 22: "MQ", 23: "CTRL_MAC_ADDR", 24: "NOTIFY_ON_EMPTY",
    27: "ANY_LAYOUT", 57: "HASH_REPORT", 60: "RSS", 61: "RSC_EXT", 62: "STANDBY",
    63: "SPEED_DUPLEX"}
VDPA_TRANSPORT_FEATURE_NAMES = {
    28: "RING_INDIRECT_DESC", 29: "RING_EVENT_IDX", 32: "VERSION_1", 33: "ACCESS_PLATFORM",
    34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM", 37: "SR_IOV",
    38: "NOTIFICATION_DATA"}
VDPA_CLASS_NAMES = {VIRTIO_ID_NET: "net", VIRTIO_ID_BLOCK: "block"}
VDPA_DEVICE_TYPE_NAMES = {VIRTIO_ID_NET: "network", VIRTIO_ID_BLOCK: "block"}
# Block config attributes, in the kernel's order (iproute2 6.1 prints none).
VDPA_BLK_CONFIG_NAMES = (
    (VDPA_ATTR_DEV_BLK_CFG_CAPACITY, "capacity"),
    (VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX, "size_max"),
    (VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE, "blk_size"),
    (VDPA_ATTR_DEV_BLK_CFG_SEG_MAX, "seg_max"),
    (VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES, "num_queues"),
    (VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP, "physical_block_exp"),
    (VDPA_ATTR_DEV_BLK_CFG_ALIGN_OFFSET, "alignment_offset"),
    (VDPA_ATTR_DEV_BLK_CFG_MIN_IO_SIZE, "min_io_size"),
    (VDPA_ATTR_DEV_BLK_CFG_OPT_IO_SIZE, "opt_io_size"),
    (VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEC, "max_discard_sectors"),
    (VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEG, "max_discard_seg"),
    (VDPA_ATTR_DEV_BLK_CFG_DISCARD_SEC_ALIGN, "discard_sector_alignment"),
    (VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC, "max_write_zeroes_sectors"),
    (VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG, "max_write_zeroes_seg"),
    (VDPA_ATTR_DEV_BLK_READ_ONLY, "read_only"),
    (VDPA_ATTR_DEV_BLK_FLUSH, "flush"))
_VDPA_MODULE_HINT = ("the vdpa module is not loaded (modprobe vdpa, and a management "
                     "device's module: vdpa_sim_net, vdpa_sim_blk, vduse, a NIC's driver)")


class NetlinkError(SvqError):
    """A netlink request the kernel refused: errno, and its own message."""

    def __init__(self, what, err, extack=None, hint=None):
        self.what, self.errno, self.extack = what, err, extack
        msg = "%s: %s" % (what, hint or os.strerror(err))
        if extack:
            msg += " (kernel: %s)" % extack
        super().__init__(msg)


def nla(type_, payload):
    """One netlink attribute: header, payload, padding to 4 bytes."""
    n = _NLATTR.size + len(payload)
    return _NLATTR.pack(n, type_) + payload + bytes(-n & 3)


def nla_strz(type_, s):
    return nla(type_, os.fsencode(s) + b"\0")


def nla_parse(buf, off=0):
    """[(type, payload)] in order, as the kernel put them; a truncated or
    malformed tail is dropped, as libmnl's parser does."""
    out = []
    end = len(buf)
    while off + _NLATTR.size <= end:
        n, t = _NLATTR.unpack_from(buf, off)
        if n < _NLATTR.size or off + n > end:
            break
        out.append((t & NLA_TYPE_MASK, bytes(buf[off + _NLATTR.size:off + n])))
        off += (n + 3) & ~3
    return out


def nla_uint(payload):
    s = _NL_UINTS.get(len(payload))
    if s is None:
        raise SvqError("netlink: an integer attribute of %d bytes" % len(payload))
    return s.unpack(payload)[0]


def nla_str(payload):
    return payload.split(b"\0", 1)[0].decode("utf-8", "replace")


def nlmsg(type_, flags, seq, payload, pid=0):
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), type_, flags, seq, pid) + payload


def genlmsg(family, cmd, flags, seq, attrs=b"", version=VDPA_GENL_VERSION):
    return nlmsg(family, flags, seq, _GENLMSGHDR.pack(cmd, version, 0) + attrs)


def nlmsg_split(data):
    """[(type, flags, seq, payload)] of one datagram from the kernel."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        n, t, flags, seq, _ = _NLMSGHDR.unpack_from(data, off)
        if n < _NLMSGHDR.size or off + n > len(data):
            raise SvqError("netlink: a malformed message from the kernel")
        out.append((t, flags, seq, bytes(data[off + _NLMSGHDR.size:off + n])))
        off += (n + 3) & ~3
    return out


def nlmsg_error(type_, flags, payload):
    """(errno, kernel message) of an NLMSG_ERROR or NLMSG_DONE; errno 0 is
    an acknowledgement (or the end of a dump)."""
    if len(payload) < _NLMSGERR.size:
        return 0, None
    err = -_NLMSGERR.unpack_from(payload)[0]
    off = _NLMSGERR.size
    if type_ == NLMSG_ERROR:
        if flags & NLM_F_CAPPED or len(payload) < off + _NLMSGHDR.size:
            off += _NLMSGHDR.size
        else:                           # the whole request, echoed back
            off += (_NLMSGHDR.unpack_from(payload, off)[0] + 3) & ~3
    msg = None
    if flags & NLM_F_ACK_TLVS:
        for t, v in nla_parse(payload, off):
            if t == NLMSGERR_ATTR_MSG:
                msg = nla_str(v)
    return err, msg


class GenlSocket:
    """A generic netlink socket bound to one family; `missing` says what to
    do when the kernel has no such family.  `sock` replaces the kernel
    (tests): anything with sendto(data, addr) and recvmsg(size)."""

    def __init__(self, family, sock=None, missing=None):
        self.sock = sock
        self.seq = int(time.monotonic() * 1000) & 0x7fffffff
        if sock is None:
            try:
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                          NETLINK_GENERIC)
            except OSError as e:
                raise NetlinkError("netlink socket", e.errno,
                                   hint="no generic netlink here: %s" % os.strerror(e.errno)) from None
        try:
            if sock is None:
                try:
                    self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
                    self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
                except OSError:
                    pass                # older kernels: errors without a message
                self.sock.settimeout(NL_TIMEOUT)
                try:
                    self.sock.bind((0, 0))
                except OSError as e:
                    raise NetlinkError("netlink bind", e.errno) from None
            reply = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, nla_strz(CTRL_ATTR_FAMILY_NAME, family),
                                 what="netlink family %s" % family, version=1,
                                 errors={errno.ENOENT: missing or "no such family"})
            ids = [nla_uint(v) for t, v in reply[0] if t == CTRL_ATTR_FAMILY_ID] if reply else []
            if not ids:
                raise SvqError("netlink family %s: the kernel gave no id" % family)
            self.family = ids[0]
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, family, cmd, attrs=b"", dump=False, what="netlink", errors=None,
                version=VDPA_GENL_VERSION):
        """Send one request; returns the attribute lists of the replies (a
        dump's many, a get's one, an action's none).  A refusal raises a
        NetlinkError: `errors` maps an errno to what it means here."""
        self.seq = (self.seq + 1) & 0x7fffffff
        seq = self.seq
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_DUMP if dump else 0)
        try:
            self.sock.sendto(genlmsg(family, cmd, flags, seq, attrs, version), (0, 0))
        except OSError as e:
            raise NetlinkError(what, e.errno) from None
        replies = []
        while True:
            try:
                data, _, mflags, _ = self.sock.recvmsg(NL_RECV_SIZE)
            except socket.timeout:
                raise NetlinkError(what, errno.ETIMEDOUT) from None
            except OSError as e:
                raise NetlinkError(what, e.errno) from None
            if mflags & socket.MSG_TRUNC:
                raise SvqError("%s: a netlink reply longer than %d bytes" % (what, NL_RECV_SIZE))
            if not data:
                raise SvqError("%s: netlink socket closed" % what)
            for t, mf, s, payload in nlmsg_split(data):
                if s != seq:
                    continue            # not ours (a stale reply)
                if t in (NLMSG_ERROR, NLMSG_DONE):
                    err, msg = nlmsg_error(t, mf, payload)
                    if err:
                        hint = (errors or {}).get(err)
                        raise NetlinkError(what, err, msg, hint)
                    return replies
                if t in (NLMSG_NOOP, NLMSG_OVERRUN):
                    continue
                replies.append(nla_parse(payload, _GENLMSGHDR.size))


# -- what the vdpa family answers, in iproute2's shape --

def _attr_dict(attrs):
    d = {}
    for t, v in attrs:
        d.setdefault(t, v)
    return d


def vdpa_features(bits, device_id):
    """Feature names as iproute2 prints them: a name, or the bit number
    (text: bit_N) where it has none."""
    out = []
    for b in range(64):
        if bits >> b & 1:
            if VIRTIO_TRANSPORT_F_START <= b <= VIRTIO_TRANSPORT_F_END:
                name = VDPA_TRANSPORT_FEATURE_NAMES.get(b)
            else:
                name = VDPA_NET_FEATURE_NAMES.get(b) if device_id == VIRTIO_ID_NET else None
            out.append(b if name is None else name)
    return out


def _mgmtdev_handle(a):
    name = nla_str(a.get(VDPA_ATTR_MGMTDEV_DEV_NAME, b""))
    if VDPA_ATTR_MGMTDEV_BUS_NAME in a:
        return "%s/%s" % (nla_str(a[VDPA_ATTR_MGMTDEV_BUS_NAME]), name)
    return name


def decode_mgmtdev(attrs):
    a = _attr_dict(attrs)
    out = {}
    classes = 0
    if VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES in a:
        classes = nla_uint(a[VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES])
        out["supported_classes"] = [VDPA_CLASS_NAMES.get(i, "< unknown class >")
                                    for i in range(1, 64) if classes >> i & 1]
    if VDPA_ATTR_DEV_MGMTDEV_MAX_VQS in a:
        out["max_supported_vqs"] = nla_uint(a[VDPA_ATTR_DEV_MGMTDEV_MAX_VQS])
    if VDPA_ATTR_DEV_SUPPORTED_FEATURES in a:
        net = VIRTIO_ID_NET if classes >> VIRTIO_ID_NET & 1 else 0
        out["dev_features"] = vdpa_features(nla_uint(a[VDPA_ATTR_DEV_SUPPORTED_FEATURES]), net)
    return _mgmtdev_handle(a), out


def decode_dev(attrs):
    a = _attr_dict(attrs)
    did = nla_uint(a.get(VDPA_ATTR_DEV_ID, b"\0\0\0\0"))
    out = {"type": VDPA_DEVICE_TYPE_NAMES.get(did, "<unknown type>"), "mgmtdev": _mgmtdev_handle(a)}
    for attr, key in ((VDPA_ATTR_DEV_VENDOR_ID, "vendor_id"), (VDPA_ATTR_DEV_MAX_VQS, "max_vqs"),
                      (VDPA_ATTR_DEV_MAX_VQ_SIZE, "max_vq_size")):
        if attr in a:
            out[key] = nla_uint(a[attr])
    return nla_str(a.get(VDPA_ATTR_DEV_NAME, b"")), out


def decode_config(attrs):
    a = _attr_dict(attrs)
    did = nla_uint(a.get(VDPA_ATTR_DEV_ID, b"\0\0\0\0"))
    out = {}
    if did == VIRTIO_ID_NET:
        if VDPA_ATTR_DEV_NET_CFG_MACADDR in a:
            out["mac"] = ":".join("%02x" % b for b in a[VDPA_ATTR_DEV_NET_CFG_MACADDR])
        if VDPA_ATTR_DEV_NET_STATUS in a:
            st = nla_uint(a[VDPA_ATTR_DEV_NET_STATUS])
            # iproute2's JSON keys end in a space ("link ", "link_announce "):
            # kept, so that a script written against its output reads ours.
            out["link "] = "up" if st & VIRTIO_NET_S_LINK_UP else "down"
            out["link_announce "] = bool(st & VIRTIO_NET_S_ANNOUNCE)
        if VDPA_ATTR_DEV_NET_CFG_MAX_VQP in a:
            out["max_vq_pairs"] = nla_uint(a[VDPA_ATTR_DEV_NET_CFG_MAX_VQP])
        if VDPA_ATTR_DEV_NET_CFG_MTU in a:
            out["mtu"] = nla_uint(a[VDPA_ATTR_DEV_NET_CFG_MTU])
    elif did == VIRTIO_ID_BLOCK:        # beyond iproute2 6.1, which prints none of it
        for attr, key in VDPA_BLK_CONFIG_NAMES:
            if attr in a:
                v = nla_uint(a[attr])
                out[key] = bool(v) if attr in (VDPA_ATTR_DEV_BLK_READ_ONLY,
                                               VDPA_ATTR_DEV_BLK_FLUSH) else v
    if did in (VIRTIO_ID_NET, VIRTIO_ID_BLOCK) and VDPA_ATTR_DEV_NEGOTIATED_FEATURES in a:
        out["negotiated_features"] = vdpa_features(nla_uint(a[VDPA_ATTR_DEV_NEGOTIATED_FEATURES]), did)
    return nla_str(a.get(VDPA_ATTR_DEV_NAME, b"")), out


def decode_vstats(attrs):
    """Vendor statistics: name/value pairs in the kernel's order."""
    a = _attr_dict(attrs)
    out = {}
    if nla_uint(a.get(VDPA_ATTR_DEV_ID, b"\0\0\0\0")) == VIRTIO_ID_NET:
        features = nla_uint(a.get(VDPA_ATTR_DEV_NEGOTIATED_FEATURES, bytes(8)))
        # Without MQ there is one pair and the kernel sends no MAX_VQP; iproute2
        # then takes 0 pairs and calls queue 0 the control queue: we take 1.
        pairs = nla_uint(a.get(VDPA_ATTR_DEV_NET_CFG_MAX_VQP, b"\1\0"))
        name = None
        for t, v in attrs:
            if t == VDPA_ATTR_DEV_QUEUE_INDEX:
                q = nla_uint(v)
                if features >> VIRTIO_NET_F_CTRL_VQ & 1 and q == 2 * pairs:
                    out["queue_type"] = "control_vq"
                else:
                    out["queue_type"] = "tx" if q & 1 else "rx"
            elif t == VDPA_ATTR_DEV_VENDOR_ATTR_NAME:
                name = nla_str(v)
            elif t == VDPA_ATTR_DEV_VENDOR_ATTR_VALUE and name is not None:
                out[name] = nla_uint(v)
    return nla_str(a.get(VDPA_ATTR_DEV_NAME, b"")), out


class VdpaNetlink:
    """The kernel's vdpa management interface."""

    def __init__(self, sock=None):
        self.nl = GenlSocket(VDPA_GENL_NAME, sock, _VDPA_MODULE_HINT)

    def close(self):
        self.nl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _req(self, cmd, attrs=b"", dump=False, what="vdpa", errors=None):
        perm = {errno.EPERM: "permission denied: managing vdpa devices needs CAP_NET_ADMIN "
                             "(run as root)"}
        perm.update(errors or {})
        return self.nl.request(self.nl.family, cmd, attrs, dump, what, perm)

    @staticmethod
    def _dev_attrs(name):
        return nla_strz(VDPA_ATTR_DEV_NAME, name)

    @staticmethod
    def _mgmtdev_attrs(handle):
        if handle.count("/") > 1:
            raise UsageError("management device %r: want NAME or BUS/NAME" % handle)
        if "/" in handle:
            bus, name = handle.split("/")
            return nla_strz(VDPA_ATTR_MGMTDEV_BUS_NAME, bus) + nla_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, name)
        return nla_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, handle)

    def _show(self, cmd, what, key, attrs_of, missing, decode):
        """`what` of every object (key None: a dump) or of the one named `key`."""
        if key is None:
            replies = self._req(cmd, dump=True, what=what)
        else:
            replies = self._req(cmd, attrs_of(key), what="%s %s" % (what, key),
                                errors={errno.ENODEV: missing})
        return [decode(r) for r in replies]

    def mgmtdevs(self, handle=None):
        """[(handle, fields)] of every management device, or of one."""
        return self._show(VDPA_CMD_MGMTDEV_GET, "mgmtdev show", handle, self._mgmtdev_attrs,
                          "no such management device", decode_mgmtdev)

    def devs(self, name=None):
        return self._show(VDPA_CMD_DEV_GET, "dev show", name, self._dev_attrs,
                          "no such vdpa device", decode_dev)

    def configs(self, name=None):
        return self._show(VDPA_CMD_DEV_CONFIG_GET, "dev config show", name, self._dev_attrs,
                          "no such vdpa device", decode_config)

    def vstats(self, name, qidx):
        replies = self._req(VDPA_CMD_DEV_VSTATS_GET,
                            nla_strz(VDPA_ATTR_DEV_NAME, name)
                            + nla(VDPA_ATTR_DEV_QUEUE_INDEX, _NL_U32.pack(qidx)),
                            what="dev vstats show %s qidx %d" % (name, qidx),
                            errors={errno.ENODEV: "no such vdpa device",
                                    errno.EOPNOTSUPP: "the device has no vendor statistics",
                                    errno.EAGAIN: "no statistics before a driver has "
                                                  "negotiated features"})
        return [decode_vstats(r) for r in replies]

    def add(self, name, mgmtdev, mac=None, mtu=None, max_vqp=None, device_features=None):
        attrs = self._mgmtdev_attrs(mgmtdev) + nla_strz(VDPA_ATTR_DEV_NAME, name)
        if mac is not None:
            attrs += nla(VDPA_ATTR_DEV_NET_CFG_MACADDR, bytes(mac))
        if mtu is not None:
            attrs += nla(VDPA_ATTR_DEV_NET_CFG_MTU, _NL_U16.pack(mtu))
        if max_vqp is not None:
            attrs += nla(VDPA_ATTR_DEV_NET_CFG_MAX_VQP, _NL_U16.pack(max_vqp))
        if device_features is not None:
            attrs += nla(VDPA_ATTR_DEV_FEATURES, _NL_U64.pack(device_features))
        self._req(VDPA_CMD_DEV_NEW, attrs, what="dev add %s" % name,
                  errors={errno.EEXIST: "the name is taken",
                          errno.ENODEV: "no management device %s (see: svq.py mgmtdev show)" % mgmtdev,
                          errno.EOPNOTSUPP: "management device %s does not take one of these "
                                            "attributes" % mgmtdev})

    def delete(self, name):
        self._req(VDPA_CMD_DEV_DEL, nla_strz(VDPA_ATTR_DEV_NAME, name), what="dev del %s" % name,
                  errors={errno.ENODEV: "no such vdpa device"})


# -- iproute2's text output --

def _text_features(key, feats):
    return "\n  %s%s" % (key, "".join(" bit_%d" % f if isinstance(f, int) else " " + f for f in feats))


def format_vdpa_text(section, records):
    """The text `vdpa SECTION show` prints for these records."""
    out = []
    for name, d in records:
        if section == "mgmtdev":
            s = "%s: " % name
            if "supported_classes" in d:
                s += "\n  supported_classes" + "".join(" " + c for c in d["supported_classes"])
            if "max_supported_vqs" in d:
                s += "\n  max_supported_vqs %d" % d["max_supported_vqs"]
            if "dev_features" in d:
                s += _text_features("dev_features", d["dev_features"])
        elif section == "dev":
            s = "%s: type %s mgmtdev %s" % (name, d["type"], d["mgmtdev"])
            s += "".join(" %s %d" % (k, d[k]) for k in ("vendor_id", "max_vqs", "max_vq_size") if k in d)
        elif section == "config":
            s = "%s: " % name
            for k, v in d.items():
                if k == "negotiated_features":
                    s += _text_features(k, v)
                elif isinstance(v, bool):
                    s += "%s%s " % (k if k.endswith(" ") else k + " ", "true" if v else "false")
                else:
                    s += "%s%s " % (k if k.endswith(" ") else k + " ", v)
        else:                           # vstats
            s = "%s: " % name + "".join("%s %s " % (k, v) for k, v in d.items())
        out.append(s + "\n")
    return "".join(out)


def _jsonw_pretty(v, depth=0):
    """JSON laid out as iproute2's json_writer does with -p: a member per
    line, indented by four spaces; an array on one line, as [ a,b ]."""
    if isinstance(v, dict):
        if not v:
            return "{}"
        pad = "\n" + "    " * (depth + 1)
        return "{" + ",".join(pad + json.dumps(k) + ": " + _jsonw_pretty(x, depth + 1)
                              for k, x in v.items()) + "\n" + "    " * depth + "}"
    if isinstance(v, list):
        return "[ " + ",".join(_jsonw_pretty(x, depth + 1) for x in v) + (" ]" if v else "]")
    return json.dumps(v)


def format_vdpa_json(section, records, pretty=False):
    obj = {section: {name: d for name, d in records}}
    if pretty:
        return _jsonw_pretty(obj) + "\n"
    return json.dumps(obj, separators=(",", ":")) + "\n"


# ============================================================================
# vhost-user backend: `svq.py serve DEV --socket PATH`
# ============================================================================
#
# A vhost-user frontend (QEMU, cloud-hypervisor, crosvm, DPDK virtio-user)
# hands us its memory and its rings; each ring becomes the guest side of a
# ShadowVirtqueue whose device side is a shadow ring of the vDPA device.
# Because svq.py writes the frontend's used rings and sees every buffer the
# device may write, it can offer VHOST_F_LOG_ALL, which vhost-vdpa cannot.
#
# Lifecycle.  The device runs ("started") only while every queue the device
# type needs (net: 0 and 1, blk: 0) is ready (num, addresses, kick fd,
# enabled) and, with PROTOCOL_F_STATUS, the frontend has set DRIVER_OK.  Any
# change to a running queue's set-up, the memory table or the non-logging
# features, GET_VRING_BASE, and SET_STATUS without DRIVER_OK (QEMU stops a
# device with SET_STATUS(0), then asks each ring's base) stop it: take no
# new guest request, let those in flight complete (drain), suspend, move
# what the device finished into the frontend's used rings, reset, unmap.
# The ring state (sizes, addresses, fds and the index to restart from)
# survives a stop: only RESET_DEVICE, RESET_OWNER and SET_VRING_BASE change
# it.  The device restarts from there as soon as the queues are ready
# again.  The IOVA map is empty whenever the device is stopped, so a reset
# never leaves stale IOTLB entries behind.
#
# Guest memory is mapped at IOVA = GPA; the shadow rings and bounce buffers
# get IOVAs outside guest memory.
#
# Isolation.  `svq.py serve` runs each connection in a worker process of its
# own (fork).  A frontend that shrinks a memory file it shared makes the next
# access to it raise SIGBUS, which Python cannot survive (a handler cannot
# return into the faulting copy); the worker dies, the kernel resets the
# device as its fd closes, and the server, which never maps frontend
# memory, logs it and serves the next frontend.  libvhost-user and DPDK
# share the frontend's fate there; a frontend that seals its memory
# (F_SEAL_SHRINK, as QEMU's memory-backend-memfd does) cannot do it at all.

VHOST_USER_GET_FEATURES = 1
VHOST_USER_SET_FEATURES = 2
VHOST_USER_SET_OWNER = 3
VHOST_USER_RESET_OWNER = 4
VHOST_USER_SET_MEM_TABLE = 5
VHOST_USER_SET_LOG_BASE = 6
VHOST_USER_SET_LOG_FD = 7
VHOST_USER_SET_VRING_NUM = 8
VHOST_USER_SET_VRING_ADDR = 9
VHOST_USER_SET_VRING_BASE = 10
VHOST_USER_GET_VRING_BASE = 11
VHOST_USER_SET_VRING_KICK = 12
VHOST_USER_SET_VRING_CALL = 13
VHOST_USER_SET_VRING_ERR = 14
VHOST_USER_GET_PROTOCOL_FEATURES = 15
VHOST_USER_SET_PROTOCOL_FEATURES = 16
VHOST_USER_GET_QUEUE_NUM = 17
VHOST_USER_SET_VRING_ENABLE = 18
VHOST_USER_SEND_RARP = 19
VHOST_USER_GET_CONFIG = 24
VHOST_USER_SET_CONFIG = 25
VHOST_USER_RESET_DEVICE = 34
VHOST_USER_SET_STATUS = 39
VHOST_USER_GET_STATUS = 40
VU_REQUEST_NAMES = {v: k[11:] for k, v in globals().items() if k.startswith("VHOST_USER_")}

VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_CONFIG = 9
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
VHOST_USER_PROTOCOL_F_STATUS = 16
PROTOCOL_FEATURE_NAMES = {0: "MQ", 1: "LOG_SHMFD", 2: "RARP", 3: "REPLY_ACK", 4: "NET_MTU",
                          5: "BACKEND_REQ", 6: "CROSS_ENDIAN", 7: "CRYPTO_SESSION",
                          8: "PAGEFAULT", 9: "CONFIG", 10: "BACKEND_SEND_FD",
                          11: "HOST_NOTIFIER", 12: "INFLIGHT_SHMFD", 13: "RESET_DEVICE",
                          14: "INBAND_NOTIFICATIONS", 15: "CONFIGURE_MEM_SLOTS", 16: "STATUS"}

VU_FLAG_VERSION = 0x1
VU_FLAG_REPLY = 0x4
VU_FLAG_NEED_REPLY = 0x8
VU_VRING_INDEX_MASK = 0xff
VU_VRING_NOFD = 0x100
VU_MAX_FDS = 8                    # VHOST_MEMORY_BASELINE_NREGIONS
VU_MAX_REGIONS = 8
VU_MAX_PAYLOAD = 4096
VU_CONFIG_MAX = 256
VU_LOG_MAX = 1 << 40              # bytes of dirty bitmap: 4 PiB of guest memory
VU_IO_TIMEOUT = 5.0               # a frontend may not leave a message half sent longer
VU_DRAIN_SECONDS = 5.0            # requests in flight get this long to complete at a stop
VU_SHADOW_MAX = 1024              # shadow rings: the device's maximum, up to this
ETH_P_RARP = 0x8035

_VU_HDR = struct.Struct("<III")            # request, flags, size
_VU_STATE = struct.Struct("<II")           # vring state: index, num
_VU_ADDR = struct.Struct("<IIQQQQ")        # index, flags, desc, used, avail, log
_VU_REGION = struct.Struct("<QQQQ")        # gpa, size, userspace addr, mmap offset
_VU_LOG = struct.Struct("<QQ")             # mmap size, mmap offset
_VU_CONFIG = struct.Struct("<III")         # offset, size, flags


class ProtocolError(SvqError):
    """A message the backend refuses: the connection is closed."""


def _vlog(msg):
    sys.stderr.write("svq: %s\n" % msg)
    sys.stderr.flush()


def _map_fd(fd, size, offset, what):
    """MAP_SHARED mapping of [offset, offset+size) of a frontend's fd.  Only
    regular files (memfd, shmem, hugetlbfs) that really are that long: a
    mapping past the end of the file would SIGBUS on first touch."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ProtocolError("%s: fstat: %s" % (what, e.strerror)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("%s: fd is not a memory file (memfd/shm/hugetlbfs)" % what)
    if size <= 0 or offset % mmap.ALLOCATIONGRANULARITY or offset + size > st.st_size:
        raise ProtocolError("%s: [%#x, +%#x) is not a page-aligned range of the %#x-byte file"
                            % (what, offset, size, st.st_size))
    try:
        return SharedMemory(size, fd=fd, offset=offset)
    except (OSError, ValueError, OverflowError) as e:
        raise ProtocolError("%s: mmap: %s" % (what, e)) from None


def _file_id(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _event_fd(fd, what):
    """Check that a frontend's notification fd is an eventfd and make it
    non-blocking: a pipe, a socket or a blocking eventfd could block the
    whole server in read() or write(), and writing a call into a memory
    file would corrupt it.  (The frontends in use, QEMU, DPDK and
    cloud-hypervisor, pass non-blocking eventfds already.)"""
    try:
        st = os.fstat(fd)
        kind = None
        try:
            kind = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            pass                    # no /proc (an initramfs): the inode type must do
        if stat.S_IFMT(st.st_mode) != 0 or kind not in (None, "anon_inode:[eventfd]"):
            raise ProtocolError("%s: fd is not an eventfd (%s)" % (
                what, kind or "mode %#o" % st.st_mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    except OSError as e:
        raise ProtocolError("%s: %s" % (what, e.strerror)) from None
    return fd


def rarp_frame(mac):
    """A RARP announce of `mac` (what DPDK's vhost and QEMU's announce send),
    behind a zeroed virtio_net_hdr_v1, padded to the 60-byte minimum."""
    eth = b"\xff" * 6 + mac + struct.pack(">H", ETH_P_RARP)
    rarp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
    return bytes(VIRTIO_NET_HDR_SIZE) + (eth + rarp).ljust(60, b"\0")


def _mac_str(mac):
    return ":".join("%02x" % b for b in mac)


class VuVring:
    """One frontend ring: what the frontend told us, and the shadow queue
    built from it while the device runs."""

    def __init__(self, index):
        self.index = index
        self.num = 0
        self.addr = None            # (flags, desc, used, avail, log) user addresses
        self.base = 0               # next avail index to process
        self.kick = self.call = self.err = -1
        self.enabled = False
        self.started = False        # kick received since the last GET_VRING_BASE
        self.svq = None
        self.views = []             # memoryviews to release on teardown
        self.polled = 0
        self.pending_seen = None    # progress marks when poll() last saw work pending

    def close_fds(self):
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
            setattr(self, name, -1)


class VhostUserConnection:
    """One frontend: the message handlers, the device and the shadow queues."""

    def __init__(self, server, sock):
        self.server, self.sock, self.loop = server, sock, server.loop
        self.verbose = server.verbose
        self.closed = False
        self.mem = None
        self.log_mem = None
        self.dirty = None           # DirtyLog over the frontend's log
        self.log_fd = -1
        self.features = 0
        self.features_set = False
        self.protocol = 0
        self.status = 0
        self.running = False
        self.nvq = server.nvq
        self.vrings = [VuVring(i) for i in range(self.nvq)]
        self.rarp = None            # MAC to announce once the device runs
        self.sdev = None            # the shadow queues while the device runs
        self.phase = None           # "shadow" or "passthrough" while running
        self.announcing = False     # shadow for a RARP announce of ours (auto mode)
        self.switches = 0
        self.device_features = 0
        self.inbuf = bytearray()    # the message being received
        self.infds = []             # and the fds that came with it
        self.partial_since = None
        self.sink = -1
        self.dev = VdpaDevice(server.device, server.opener)
        try:
            self.sink = eventfd()   # the call fd while the frontend has none
            sock.setblocking(False)
            self.loop.add_reader(sock.fileno(), self.on_readable)
        except BaseException:
            self.dev.close()
            if self.sink >= 0:
                os.close(self.sink)
            raise

    # -- message I/O: never blocks; a message is handled once it is whole --
    def on_readable(self):
        if self.closed:
            return
        reason = self._receive()
        if reason is not None:
            # Outside any except block: a traceback pins the frames' views
            # of the frontend's memory, which could then not be unmapped.
            self.close(reason)

    def _receive(self):
        """Read what the socket has; handle every whole message.  Returns a
        reason to close the connection, or None."""
        while True:
            buf = self.inbuf
            need = _VU_HDR.size
            if len(buf) >= need:
                req, flags, size = _VU_HDR.unpack_from(buf)
                if flags & 0x3 != VU_FLAG_VERSION or flags & VU_FLAG_REPLY:
                    return "%s: bad header flags %#x" % (VU_REQUEST_NAMES.get(req, req), flags)
                if size > VU_MAX_PAYLOAD:
                    return "%s: payload of %d bytes" % (VU_REQUEST_NAMES.get(req, req), size)
                need += size
            if len(buf) >= need:
                fds, self.infds = self.infds, []
                payload = bytes(buf[_VU_HDR.size:need])
                del buf[:need]
                self.partial_since = None
                reason = self._handle(req, flags, payload, fds)
                if reason is not None or self.closed:
                    return reason
                continue
            try:
                data, anc, mflags, _ = self.sock.recvmsg(
                    need - len(buf), socket.CMSG_SPACE(VU_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                return "frontend connection: %s" % e.strerror
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.infds.extend(struct.unpack("%di" % (len(raw) // 4), raw[:len(raw) & ~3]))
            if mflags & socket.MSG_CTRUNC:
                return "more than %d fds with one message" % VU_MAX_FDS
            if not data:
                return "frontend disconnected" + (" mid-message" if buf else "")
            if not buf:
                self.partial_since = time.monotonic()   # a message begins
            buf += data

    def _handle(self, req, flags, payload, fds):
        need_ack = bool(flags & VU_FLAG_NEED_REPLY and
                        self.protocol >> VHOST_USER_PROTOCOL_F_REPLY_ACK & 1)
        name = VU_REQUEST_NAMES.get(req, str(req))
        try:
            handler = self.HANDLERS.get(req)
            if handler is None:
                raise ProtocolError("unsupported request %d" % req)
            if self.verbose:
                _vlog("<- %s size %d fds %d %s" % (name, len(payload), len(fds), payload[:48].hex()))
            replied = handler(self, payload, fds)
            if need_ack and not replied:
                self._send(req, _U64.pack(0))
        except Exception as e:      # a bad message costs its connection only
            if need_ack and not isinstance(e, OSError):
                try:
                    self._send(req, _U64.pack(1))
                except (OSError, SvqError):
                    pass
            what = e if isinstance(e, (SvqError, OSError)) else "%s: %s" % (type(e).__name__, e)
            return "%s: %s" % (name, what)
        finally:
            for fd in fds:          # every fd no handler took ownership of
                os.close(fd)
        return None

    def _send(self, req, payload):
        data = _VU_HDR.pack(req, VU_FLAG_VERSION | VU_FLAG_REPLY, len(payload)) + payload
        deadline = time.monotonic() + 1.0
        while data:
            try:
                data = data[self.sock.send(data, socket.MSG_DONTWAIT):]
            except (BlockingIOError, InterruptedError):
                # A frontend that does not read its replies: wait a moment
                # for room, never for long.
                left = deadline - time.monotonic()
                if left <= 0 or not select_writable(self.sock, left):
                    raise ProtocolError("the frontend does not read its replies")

    def poll_stalled(self):
        """Every tick: a message left half sent too long closes the connection."""
        if self.partial_since is not None and time.monotonic() - self.partial_since > VU_IO_TIMEOUT:
            self.close("frontend stalled mid-message for %.0f s" % VU_IO_TIMEOUT)

    # -- payload checks --
    @staticmethod
    def _size(payload, *sizes):
        if len(payload) not in sizes:
            raise ProtocolError("payload of %d bytes, expected %s"
                                % (len(payload), " or ".join(map(str, sizes))))

    @staticmethod
    def _nfds(fds, n):
        if len(fds) != n:
            raise ProtocolError("%d fds, expected %d" % (len(fds), n))

    def _u64(self, payload, fds, nfds=0):
        self._size(payload, 8)
        self._nfds(fds, nfds)
        return _U64.unpack(payload)[0]

    def _vring(self, index):
        if index >= self.nvq:
            raise ProtocolError("queue index %d (the device has %d)" % (index, self.nvq))
        return self.vrings[index]

    def _state(self, payload, fds):
        self._size(payload, 8)
        self._nfds(fds, 0)
        index, num = _VU_STATE.unpack(payload)
        return self._vring(index), num

    def _need_protocol(self, bit):
        if not self.protocol >> bit & 1:
            raise ProtocolError("protocol feature %s not negotiated" % PROTOCOL_FEATURE_NAMES[bit])

    # -- handlers: return True when they sent their own reply --
    def h_get_features(self, payload, fds):
        self._size(payload, 0, 8)
        self._nfds(fds, 0)
        self._send(VHOST_USER_GET_FEATURES, _U64.pack(self.server.offered))
        return True

    def h_set_features(self, payload, fds):
        f = self._u64(payload, fds)
        if f & ~self.server.offered:
            raise ProtocolError("features %s were not offered"
                                % ",".join(feature_names(f & ~self.server.offered)))
        changed = f ^ self.features
        if self.running and changed & ~(1 << VHOST_F_LOG_ALL):
            self._stop_device("features changed")
        self.features, self.features_set = f, True
        if changed & (1 << VHOST_F_LOG_ALL):
            _vlog("dirty logging %s" % ("on" if f >> VHOST_F_LOG_ALL & 1 else "off"))
        if changed & ~(1 << VHOST_F_LOG_ALL) or self.verbose:
            _vlog("features: %s" % " ".join(feature_names(f, self.server.type_names)))
        self._apply_log()
        if self.running and self.phase != self._phase_wanted():
            self._switch("dirty logging %s" % ("on" if self._logging() else "off"))
        self._maybe_start()

    def h_get_protocol_features(self, payload, fds):
        self._size(payload, 0, 8)
        self._nfds(fds, 0)
        self._send(VHOST_USER_GET_PROTOCOL_FEATURES, _U64.pack(self.server.protocol_offered))
        return True

    def h_set_protocol_features(self, payload, fds):
        p = self._u64(payload, fds)
        if p & ~self.server.protocol_offered:
            raise ProtocolError("protocol features %#x were not offered"
                                % (p & ~self.server.protocol_offered))
        self.protocol = p
        _vlog("protocol features: %s" % " ".join(PROTOCOL_FEATURE_NAMES[b] for b in range(17)
                                                 if p >> b & 1))

    def h_set_owner(self, payload, fds):
        self._size(payload, 0, 8)
        self._nfds(fds, 0)

    def h_reset_owner(self, payload, fds):
        self._size(payload, 0, 8)
        self._nfds(fds, 0)
        self._reset_rings("RESET_OWNER")

    def h_reset_device(self, payload, fds):
        self._need_protocol(VHOST_USER_PROTOCOL_F_RESET_DEVICE)
        self._size(payload, 0, 8)
        self._nfds(fds, 0)
        self._reset_rings("RESET_DEVICE")

    def _reset_rings(self, why):
        self._stop_device(why)
        for v in self.vrings:
            v.close_fds()
        self.vrings = [VuVring(i) for i in range(self.nvq)]
        self.features, self.features_set, self.status = 0, False, 0
        self._apply_log()

    def h_set_mem_table(self, payload, fds):
        if len(payload) < 8:
            raise ProtocolError("payload of %d bytes" % len(payload))
        n = struct.unpack_from("<I", payload)[0]
        if not 1 <= n <= VU_MAX_REGIONS or not 8 + n * 32 <= len(payload) <= 8 + VU_MAX_REGIONS * 32:
            raise ProtocolError("%d regions in %d bytes" % (n, len(payload)))
        self._nfds(fds, n)
        table = [_VU_REGION.unpack_from(payload, 8 + i * 32) for i in range(n)]
        try:
            ids = [_file_id(fd) for fd in fds]
        except OSError as e:
            raise ProtocolError("fstat: %s" % e.strerror) from None
        if self.mem is not None and self._same_table(table, ids):
            return                  # QEMU sends the same table again after a start
        regions = []
        try:
            for i, (gpa, size, uaddr, off) in enumerate(table):
                if size == 0 or gpa + size > 1 << 64 or uaddr + size > 1 << 64:
                    raise ProtocolError("region %d: bad range gpa %#x size %#x uaddr %#x"
                                        % (i, gpa, size, uaddr))
                m = _map_fd(fds[i], size, off, "region %d" % i)
                regions.append(GuestRegion(gpa, size, m, uaddr=uaddr, ident=ids[i] + (off,)))
            uas = sorted((r.uaddr, r.uaddr + r.size) for r in regions)
            if any(a[1] > b[0] for a, b in zip(uas, uas[1:])):
                raise ProtocolError("regions overlap in the frontend's address space")
            mem = GuestMemory(regions)
        except BaseException:
            for r in regions:
                r.mem.close()
            raise
        self._stop_device("memory table changed")
        if self.mem is not None:
            self.mem.close()
        self.mem = mem
        _vlog("memory: %s" % ", ".join("gpa %#x+%#x" % (r.gpa, r.size) for r in mem.regions))
        self._maybe_start()

    def _same_table(self, table, ids):
        old = self.mem.regions
        new = sorted((gpa, size, uaddr, ids[i] + (off,)) for i, (gpa, size, uaddr, off)
                     in enumerate(table))
        return new == [(r.gpa, r.size, r.uaddr, r.ident) for r in old]

    def h_set_log_base(self, payload, fds):
        self._need_protocol(VHOST_USER_PROTOCOL_F_LOG_SHMFD)
        self._size(payload, _VU_LOG.size)
        self._nfds(fds, 1)
        size, off = _VU_LOG.unpack(payload)
        if size > VU_LOG_MAX:
            raise ProtocolError("log of %d bytes" % size)
        m = _map_fd(fds[0], size, off, "log")
        try:
            dirty = DirtyLog(buf=m.mv, shared=True)
        except BaseException:
            m.close()
            raise
        old, old_dirty = self.log_mem, self.dirty
        self.log_mem, self.dirty = m, dirty
        self._apply_log()
        if self.running and self.phase != self._phase_wanted():
            self._switch("dirty log set")
        if old is not None:
            old_dirty.close()
            old.close()
        if self.verbose:
            _vlog("dirty log: %d bytes (%d MiB of guest memory)" % (size, size * 8 * 4096 >> 20))
        self._send(VHOST_USER_SET_LOG_BASE, _U64.pack(0))
        return True

    def h_set_log_fd(self, payload, fds):
        self._size(payload, 0, 8)
        self._nfds(fds, 1)
        fd = _event_fd(fds[0], "log fd")
        fds.pop()
        if self.log_fd >= 0:
            os.close(self.log_fd)
        self.log_fd = fd

    def h_set_vring_num(self, payload, fds):
        v, num = self._state(payload, fds)
        limit = min(32768, self.dev.max_queue_size)
        packed = self.features >> VIRTIO_F_RING_PACKED & 1
        if not 1 <= num <= limit or (num & (num - 1) and not packed):
            raise ProtocolError("vq %d: size %d is not %s in [1, %d]"
                                % (v.index, num, "a size" if packed else "a power of two", limit))
        self._stop_if_running(v, num != v.num)
        v.num = num

    def h_set_vring_addr(self, payload, fds):
        self._size(payload, _VU_ADDR.size)
        self._nfds(fds, 0)
        index, flags, desc, used, avail, log = _VU_ADDR.unpack(payload)
        v = self._vring(index)
        if flags & ~(1 << VHOST_VRING_F_LOG):
            raise ProtocolError("vq %d: address flags %#x" % (index, flags))
        if desc % 16 or avail % 2 or used % 4:
            raise ProtocolError("vq %d: misaligned ring (desc %#x avail %#x used %#x)"
                                % (index, desc, avail, used))
        new = (flags, desc, used, avail, log)
        if v.addr is not None and v.addr[1:4] == new[1:4]:
            v.addr = new
            self._apply_log()       # only logging changed (migration start/end)
            return
        self._stop_if_running(v, True)
        v.addr = new

    def h_set_vring_base(self, payload, fds):
        """The next avail index (split); for a packed ring the avail position
        and wrap counter in bits 0-15 and the used ones in bits 16-31."""
        v, base = self._state(payload, fds)
        if base > 0xffff and not self.features >> VIRTIO_F_RING_PACKED & 1:
            raise ProtocolError("vq %d: base %d" % (v.index, base))
        self._stop_if_running(v, True)
        v.base = base

    def h_get_vring_base(self, payload, fds):
        v, _ = self._state(payload, fds)
        self._stop_device("vq %d stopped by the frontend" % v.index)
        v.started = False
        v.close_fds()               # the frontend sends kick and call again to restart
        self._send(VHOST_USER_GET_VRING_BASE, _VU_STATE.pack(v.index, v.base))
        return True

    def _vring_fd(self, payload, fds, what):
        """(vring, fd or -1) of a SET_VRING_KICK/CALL/ERR, the fd checked and
        taken out of `fds` only once it is known to be good."""
        self._size(payload, 8)
        val = _U64.unpack(payload)[0]
        if val & ~(VU_VRING_INDEX_MASK | VU_VRING_NOFD):
            raise ProtocolError("vring fd payload %#x" % val)
        self._nfds(fds, 0 if val & VU_VRING_NOFD else 1)
        v = self._vring(val & VU_VRING_INDEX_MASK)
        if not fds:
            return v, -1
        _event_fd(fds[0], "vq %d: %s fd" % (v.index, what))
        return v, fds.pop()

    def h_set_vring_kick(self, payload, fds):
        v, fd = self._vring_fd(payload, fds, "kick")
        if fd < 0:
            raise ProtocolError("vq %d: polling mode (no kick fd) is not supported" % v.index)
        if v.svq is not None:
            old = v.svq.guest_kick_fd
            try:
                self.loop.add_reader(fd, self._guard(v, v.svq.handle_guest_kick))
            except BaseException:
                os.close(fd)
                raise
            self.loop.remove_reader(old)
            v.svq.guest_kick_fd = fd
        elif self.running and self.phase == "passthrough":
            self._device_fd(v, self.dev.dev.set_vring_kick, fd)
        if v.kick >= 0:
            os.close(v.kick)
        v.kick = fd
        v.started = True
        if v.svq is not None:
            self._guard(v, v.svq.handle_guest_kick)()
        self._maybe_start()

    def _device_fd(self, v, setter, fd):
        """Passthrough: a new kick or call fd of the frontend goes straight to
        the device."""
        try:
            setter(v.index, fd)
        except DeviceError:
            os.close(fd)
            raise

    def h_set_vring_call(self, payload, fds):
        v, fd = self._vring_fd(payload, fds, "call")
        if self.running and self.phase == "passthrough":
            self._device_fd(v, self.dev.dev.set_vring_call, fd if fd >= 0 else self.sink)
        old, v.call = v.call, fd
        if v.svq is not None:
            v.svq.guest_call_fd = fd if fd >= 0 else self.sink
        if old >= 0:
            os.close(old)

    def h_set_vring_err(self, payload, fds):
        v, fd = self._vring_fd(payload, fds, "err")
        if v.err >= 0:
            os.close(v.err)
        v.err = fd

    def h_get_queue_num(self, payload, fds):
        self._size(payload, 0, 8)
        self._nfds(fds, 0)
        self._send(VHOST_USER_GET_QUEUE_NUM, _U64.pack(1))     # one queue (pair)
        return True

    def h_set_vring_enable(self, payload, fds):
        v, enable = self._state(payload, fds)
        if enable > 1:
            raise ProtocolError("vq %d: enable %d" % (v.index, enable))
        self._stop_if_running(v, not enable, "disabled")
        v.enabled = bool(enable)
        self._maybe_start()

    def h_send_rarp(self, payload, fds):
        self._need_protocol(VHOST_USER_PROTOCOL_F_RARP)
        self._size(payload, 8)
        self._nfds(fds, 0)
        mac = payload[:6]
        dev_mac = self.server.mac
        if dev_mac is not None and mac != dev_mac:
            _vlog("warning: the guest announces %s but the device's MAC is %s: a device that "
                  "filters by its MAC (vdpa_sim_net does) drops frames to the guest"
                  % (_mac_str(mac), _mac_str(dev_mac)))
        self.rarp = mac
        self._send_rarp()

    def _send_rarp(self):
        """After a migration the destination announces the guest's MAC on the
        device's TX queue (for guests without GUEST_ANNOUNCE), as DPDK's
        vhost does: the network learns where the guest now is."""
        tx = self.vrings[1].svq if self.running and self.nvq > 1 else None
        if self.rarp is not None and self.running and tx is None:
            # Passthrough: the guest's TX ring is the device's, with no room
            # for a frame of ours.  In auto mode the queues go shadow for the
            # announce, and back once it is out (poll()).
            if self.server.mode == "auto":
                self.announcing = True
                self._switch("RARP announce")
            else:
                _vlog("RARP announce of %s not sent: passthrough (no ring of svq.py's own to "
                      "send it from)" % _mac_str(self.rarp))
                self.rarp = None
            return
        if self.rarp is None or tx is None or tx.broken is not None:
            return
        _vlog("announcing %s (RARP) on vq 1" % _mac_str(self.rarp))
        for v in self.vrings:       # RX buffers the guest posted first: the device may loop it back
            if v.svq is not None and v.svq.broken is None:
                self._guard(v, v.svq.forward_avail)()
        self._guard(self.vrings[1], lambda: tx.inject(rarp_frame(self.rarp)))()
        self.rarp = None

    def _config(self, payload, fds):
        self._need_protocol(VHOST_USER_PROTOCOL_F_CONFIG)
        self._nfds(fds, 0)
        if len(payload) < _VU_CONFIG.size:
            raise ProtocolError("payload of %d bytes" % len(payload))
        off, size, flags = _VU_CONFIG.unpack_from(payload)
        if size > VU_CONFIG_MAX or len(payload) != _VU_CONFIG.size + size \
                or off + size > self.server.config_size:
            raise ProtocolError("config [%d, +%d) of a %d-byte config space in %d bytes"
                                % (off, size, self.server.config_size, len(payload)))
        return off, size, flags

    def h_get_config(self, payload, fds):
        off, size, flags = self._config(payload, fds)
        data = self.dev.dev.get_config(off, size) if size else b""
        self._send(VHOST_USER_GET_CONFIG, _VU_CONFIG.pack(off, size, flags) + data)
        return True

    def h_set_config(self, payload, fds):
        off, size, _ = self._config(payload, fds)
        self.dev.dev.set_config(off, payload[_VU_CONFIG.size:])

    def h_set_status(self, payload, fds):
        self._need_protocol(VHOST_USER_PROTOCOL_F_STATUS)
        status = self._u64(payload, fds)
        if status > 0xff:
            raise ProtocolError("status %#x" % status)
        self.status = status
        if not status & VIRTIO_CONFIG_S_DRIVER_OK:
            # QEMU stops a device so, before it asks for each ring's base:
            # a stop that keeps the rings, not a reset.
            self._stop_device("status %s" % "|".join(status_names(status)))
        self._maybe_start()

    def h_get_status(self, payload, fds):
        self._need_protocol(VHOST_USER_PROTOCOL_F_STATUS)
        self._size(payload, 0, 8)
        self._nfds(fds, 0)
        self._send(VHOST_USER_GET_STATUS, _U64.pack(self.status))
        return True

    HANDLERS = {
        VHOST_USER_GET_FEATURES: h_get_features, VHOST_USER_SET_FEATURES: h_set_features,
        VHOST_USER_SET_OWNER: h_set_owner, VHOST_USER_RESET_OWNER: h_reset_owner,
        VHOST_USER_SET_MEM_TABLE: h_set_mem_table, VHOST_USER_SET_LOG_BASE: h_set_log_base,
        VHOST_USER_SET_LOG_FD: h_set_log_fd, VHOST_USER_SET_VRING_NUM: h_set_vring_num,
        VHOST_USER_SET_VRING_ADDR: h_set_vring_addr, VHOST_USER_SET_VRING_BASE: h_set_vring_base,
        VHOST_USER_GET_VRING_BASE: h_get_vring_base, VHOST_USER_SET_VRING_KICK: h_set_vring_kick,
        VHOST_USER_SET_VRING_CALL: h_set_vring_call, VHOST_USER_SET_VRING_ERR: h_set_vring_err,
        VHOST_USER_GET_PROTOCOL_FEATURES: h_get_protocol_features,
        VHOST_USER_SET_PROTOCOL_FEATURES: h_set_protocol_features,
        VHOST_USER_GET_QUEUE_NUM: h_get_queue_num, VHOST_USER_SET_VRING_ENABLE: h_set_vring_enable,
        VHOST_USER_SEND_RARP: h_send_rarp,
        VHOST_USER_GET_CONFIG: h_get_config, VHOST_USER_SET_CONFIG: h_set_config,
        VHOST_USER_RESET_DEVICE: h_reset_device, VHOST_USER_SET_STATUS: h_set_status,
        VHOST_USER_GET_STATUS: h_get_status,
    }

    # -- dirty logging --
    def _logging(self):
        return self.dirty is not None and self.features >> VHOST_F_LOG_ALL & 1

    def _apply_log(self):
        log = self.dirty if self._logging() else None
        for v in self.vrings:
            if v.svq is not None:
                v.svq.set_log(log, v.addr[4] if v.addr[0] & (1 << VHOST_VRING_F_LOG) else None)

    # -- device lifecycle --
    def _stop_if_running(self, v, changed, what="reconfigured"):
        if changed and self.running and v.svq is not None:
            self._stop_device("vq %d %s" % (v.index, what))

    def _ready(self, v):
        enabled = v.enabled or not self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1
        return v.num and v.addr is not None and v.kick >= 0 and v.started and enabled

    def _maybe_start(self):
        if (self.running or self.closed or self.mem is None or not self.features_set
                or not all(self._ready(v) for v in self.vrings)):
            return
        if (self.protocol >> VHOST_USER_PROTOCOL_F_STATUS & 1
                and not self.status & VIRTIO_CONFIG_S_DRIVER_OK):
            return
        self._start_device()

    def _ring_view(self, v, uaddr, size, what):
        r = self.mem.region_by_uaddr(uaddr, size)
        if r is None:
            raise ProtocolError("vq %d: %s ring [%#x, +%#x) is not in the memory table"
                                % (v.index, what, uaddr, size))
        off = uaddr - r.uaddr
        view = r.mv[off:off + size]
        v.views.append(view)
        return view

    # -- modes: passthrough while not logging, shadow while logging --
    #
    # In passthrough the device uses the frontend's rings itself (guest memory
    # is at IOVA = GPA) and the frontend's kick and call eventfds go to the
    # kernel: no Python on the data path.  When the frontend turns dirty
    # logging on (QEMU does at migration start) the queues switch to shadow,
    # and back when it turns it off (a failed or cancelled migration).  Pages
    # the device wrote before the switch need no log: a VMM's first pass over
    # RAM, after logging starts, sends every page (QEMU marks all of RAM
    # dirty first).

    def _phase_wanted(self):
        mode = self.server.mode
        if mode == "auto":
            # Shadow while logging, and while a RARP announce of ours goes out.
            return "shadow" if self._logging() or self.announcing else "passthrough"
        return mode

    def _guest_features(self):
        return self.features & ~((1 << VHOST_F_LOG_ALL) | (1 << VHOST_USER_F_PROTOCOL_FEATURES))

    def _device_wanted(self):
        dev = self.dev
        guest = self._guest_features()
        base = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM)
        if self.server.mode == "shadow":
            # The shadow rings carry what the device lacks (indirect, event
            # index, a packed ring) to the guest.
            return ((guest & svq_device_features(dev.device_id)) | base
                    | (1 << VIRTIO_F_ANY_LAYOUT) | (1 << VIRTIO_RING_F_EVENT_IDX))
        return guest | base             # the device drives the guest's rings itself

    def _start_device(self):
        self.running = True         # from here on, _stop_device undoes it all
        try:
            self.device_features = self.dev.negotiate(self._device_wanted())
            map_guest_memory(self.dev, self.mem)
            self._bring_up(self._phase_wanted())
            self.dev.start(range(self.nvq))
        except BaseException:
            self._stop_device(None)
            raise
        self._started_log()
        self._after_start()

    def _started_log(self):
        if self.phase == "shadow":
            _vlog("device started, shadow: %s" % ", ".join(
                "vq %d size %d%s (shadow %d) at avail %#x used %#x"
                % (v.index, v.num, " packed" if v.svq.packed else "", v.svq.snum,
                   v.svq.last_avail_idx, v.svq.guest_used_idx) for v in self.vrings))
        else:
            # (split: with the used index the device starts from, read from
            # the guest's ring, as a device reads it: after a migration it
            # is what the source left there, if its page came across)
            packed = self._guest_features() >> VIRTIO_F_RING_PACKED & 1
            _vlog("device started, passthrough: %s" % ", ".join(
                "vq %d size %d at avail %#x%s" % (
                    v.index, v.num, v.base,
                    "" if packed else " used %#x" % self._guest_used_idx(v))
                for v in self.vrings))
        if self.verbose:
            _vlog("device features: %s" % " ".join(
                feature_names(self.device_features, self.server.type_names)))

    def _after_start(self):
        for v in self.vrings:       # buffers made available while we were stopped
            if v.svq is not None and v.svq.broken is None:
                self._guard(v, v.svq.forward_avail)()
        self._send_rarp()

    def _bring_up(self, phase):
        """Set every queue up for `phase` (the device is negotiated, guest
        memory mapped; not yet DRIVER_OK, or suspended)."""
        if phase == "shadow":
            self.sdev = ShadowDevice(self.dev, self.mem, mapped=True)
            for v in self.vrings:
                self._setup_queue(v, self._guest_features(), self.device_features)
        else:
            for v in self.vrings:
                self._setup_passthrough(v)
        self.phase = phase

    def _setup_passthrough(self, v):
        num = v.num
        flags, desc, used, avail, log = v.addr
        if self._guest_features() >> VIRTIO_F_RING_PACKED & 1:
            sizes = (VRING_DESC_SIZE * num, 4, 4)
        else:
            sizes = (vring_desc_size(num), vring_avail_size(num), vring_used_size(num))
        for uaddr, size, what in zip((desc, avail, used), sizes, ("descriptor", "avail", "used")):
            self._ring_view(v, uaddr, size, what).release()     # in the memory table
        self.dev.setup_vq(v.index, num, self._gpa(desc), self._gpa(avail), self._gpa(used),
                          v.kick, v.call if v.call >= 0 else self.sink, v.base)

    def _switch(self, why):
        """Move the running queues to the other phase without losing or
        repeating a request (see _quiesce_*), in place on a suspended device
        where it can (VHOST_VDPA_SUSPEND, ring addresses changed, RESUME),
        else by a reset and a new bring-up."""
        dev, to = self.dev, self._phase_wanted()
        t0 = time.monotonic()
        suspended = (self._quiesce_shadow(why) if self.phase == "shadow"
                     else self._quiesce_passthrough(why))
        how = "reset"
        if suspended:
            try:
                for v in self.vrings:
                    dev.dev.set_vring_enable(v.index, False)
                self._teardown_phase(keep_maps=True)
                self._bring_up(to)
                for v in self.vrings:
                    dev.dev.set_vring_enable(v.index, True)
                dev.dev.resume()
                how = "suspend/resume"
            except DeviceError as e:
                _vlog("switching in place: %s; resetting instead" % e)
                suspended = False
        if not suspended:
            from_passthrough = self.phase == "passthrough"
            dev.reset()
            if from_passthrough:
                self._rebase_after_reset()
            self._teardown_phase(keep_maps=False)
            self.device_features = dev.negotiate(self._device_wanted())
            map_guest_memory(dev, self.mem)
            self._bring_up(to)
            dev.start(range(self.nvq))
        _vlog("switched to %s in %.1f ms (%s; %s)" % (to, (time.monotonic() - t0) * 1e3, how, why))
        self.switches += 1
        self._after_start()

    def _quiesce_passthrough(self, why):
        """Stop a passthrough device taking guest requests and record, per
        queue, where the guest's ring stands (v.base).  The device's kicks go
        to an eventfd of ours first, and the device is left to complete what
        it took, in whatever order (the guest's used index catches up with the
        device's avail index); then it is suspended where it can be.  A
        device that takes requests only when kicked (vdpa_sim, qemu-storage-
        daemon's VDUSE export) takes no more meanwhile.  A request still not
        completed when the wait is over is handed back (rewound), with a
        warning: right for a device that completes in order.  Returns
        whether the device is suspended."""
        dev = self.dev
        for v in self.vrings:
            dev.dev.set_vring_kick(v.index, self.sink)
        packed = bool(self._guest_features() >> VIRTIO_F_RING_PACKED & 1)
        deadline = time.monotonic() + (0.3 if self.loop.stopped else VU_DRAIN_SECONDS)

        def behind(v):
            state = dev.dev.get_vring_base(v.index)
            if packed:                      # avail and used position, wrap counters
                return state, (state ^ state >> 16) & 0xffff
            return state, (state - self._guest_used_idx(v)) & 0xffff
        for v in self.vrings:
            while behind(v)[1] and time.monotonic() < deadline:
                time.sleep(0.001)
        suspended = False
        if dev.has_backend(VHOST_BACKEND_F_SUSPEND) and dev.has_backend(VHOST_BACKEND_F_RESUME):
            try:
                suspended = dev.suspend()
            except DeviceError as e:
                _vlog("suspend: %s" % e)
        for v in self.vrings:
            state, missing = behind(v)
            if missing:
                _vlog("vq %d: %d requests the device took did not complete; handed back "
                      "(%s)" % (v.index, missing, why))
                state = ((state >> 16) * 0x10001 if packed else self._guest_used_idx(v))
            v.base = state
        return suspended

    def _rebase_after_reset(self):
        """A passthrough device that could not be suspended has been reset:
        where its rings stood before the reset cannot be trusted.  A device
        that takes requests on a kick it saw before the kicks went to our
        eventfd (a VDUSE daemon runs its kick handler when it gets to it)
        may have taken and completed more after the last GET_VRING_BASE, and
        its reset completes or drops whatever it holds (libvduse drains its
        requests before it acknowledges the reset; vdpa_sim's work is done
        under the reset's lock).  So a split ring restarts at the guest's
        used index, read after the reset: every completed request is there,
        and one the device dropped is taken again, as QEMU does when it
        cannot trust the device's state (vhost_vdpa_get_vring_base).  A
        packed ring keeps the device's state (no rig device offers packed)."""
        if self._guest_features() >> VIRTIO_F_RING_PACKED & 1:
            return
        for v in self.vrings:
            used = self._guest_used_idx(v)
            if used != v.base:
                _vlog("vq %d: at the reset the guest's used index is %#x, not %#x: the "
                      "device took more before it stopped; the shadow starts there"
                      % (v.index, used, v.base))
            v.base = used

    def _guest_used_idx(self, v):
        flags, desc, used, avail, log = v.addr
        view = self._ring_view(v, used, 4, "used")
        idx = view.cast("H")[1]
        view.release()
        return idx

    def _quiesce_shadow(self, why):
        """Take no new guest request, let those in flight complete, suspend,
        move what completed to the guest, and record where each queue
        restarts (v.base).  Returns whether the device is suspended."""
        dev = self.dev
        live = [v for v in self.vrings if v.svq is not None]
        for v in live:
            v.svq.stopping = True               # no new guest requests
        drained = self._drain() if why is not None else 0.0
        suspended = False
        try:
            suspended = dev.suspend()
        except DeviceError:
            pass
        for v in live:                          # what completed until the suspend
            self._flush(v)
        if why is None:
            return suspended
        blk = dev.device_id == VIRTIO_ID_BLOCK
        for v in live:
            s = v.svq
            v.base, rewound, failed = s.restart_index()
            if failed:
                # Requests the device took and never completed, with later
                # ones completed: one index cannot hand them back.
                _vlog("vq %d: %d requests did not complete within %.1f s; "
                      "completed as failed" % (v.index, len(failed), drained))
                try:
                    s.complete_with_error([h for _, h, _ in failed], blk)
                except (OSError, SvqError) as e:
                    _vlog("vq %d: %s" % (v.index, e))
            st = s.stats
            _vlog("vq %d stopped at avail %#x used %#x%s%s%s; %d requests, %s layout, "
                  "%.2f chain walks a request, %d bounced (%s)" % (
                      v.index, v.base, s.guest_used_idx,
                      " after %.0f ms" % (drained * 1e3) if drained >= 0.001 else "",
                      ", %d not taken by the device handed back" % rewound if rewound else "",
                      ", %d stalls recovered by polling" % v.polled if v.polled else "",
                      st.requests, "mirrored" if s.mirror else "copied",
                      st.walks / max(st.requests, 1), st.bounced, why))
            v.polled = 0
        return suspended

    def _teardown_phase(self, keep_maps):
        """Let go of the shadow queues (readers, rings, views); the device's
        IOTLB keeps guest memory with keep_maps."""
        for v in self.vrings:
            v.pending_seen = None
            if v.svq is not None:
                self.loop.remove_reader(v.svq.guest_kick_fd)
                self.loop.remove_reader(v.svq.device_call_fd)
            v.svq = None
            for view in v.views:
                view.release()
            v.views = []
        if self.sdev is not None:
            self.sdev.teardown(keep_guest=keep_maps)
            self.sdev = None
        if not keep_maps:
            self.dev.unmap_all()
            if self.mem is not None:
                for r in self.mem.regions:
                    r.iova = None

    def _setup_queue(self, v, guest_features, device_features):
        num = v.num
        flags, desc, used, avail, log = v.addr
        packed = bool(guest_features >> VIRTIO_F_RING_PACKED & 1)
        if packed:
            # desc: the descriptor ring; avail and used: the driver and device
            # event suppression areas.
            gring = PackedRing(num, self._ring_view(v, desc, VRING_DESC_SIZE * num, "descriptor"),
                               self._ring_view(v, avail, 4, "driver area"),
                               self._ring_view(v, used, 4, "device area"))
            gpas = (self._gpa(desc), self._gpa(used))
            used_idx = 0
        else:
            gring = SplitRing(num, self._ring_view(v, desc, vring_desc_size(num), "descriptor"),
                              self._ring_view(v, avail, vring_avail_size(num), "avail"),
                              self._ring_view(v, used, vring_used_size(num), "used"))
            gpas = None
            used_idx = gring.used16[1]
        logging = self._logging()
        v.svq = svq = self.sdev.add_queue(
            v.index, gring, guest_features, device_features, v.kick,
            v.call if v.call >= 0 else self.sink, log=self.dirty if logging else None,
            log_used_gpa=log if logging and flags & (1 << VHOST_VRING_F_LOG) else None,
            last_avail_idx=v.base, guest_used_idx=used_idx,
            guest_state=v.base if packed else None, guest_gpas=gpas)
        self.loop.add_reader(v.kick, self._guard(v, svq.handle_guest_kick))
        self.loop.add_reader(svq.device_call_fd, self._guard(v, svq.handle_device_call))
        if self.server.pcap is not None:
            svq.set_pcap(self.server.pcap, "tx" if v.index % 2 else "rx")

    def _gpa(self, uaddr):
        r = self.mem.region_by_uaddr(uaddr, 1)
        return r.gpa + uaddr - r.uaddr

    def _guard(self, v, fn):
        svq = v.svq

        def cb():
            if self.closed or v.svq is not svq:
                return              # a stale event from a queue already torn down
            try:
                fn()
            except Exception as e:  # RingError, or a device/fd failure
                reason = "vq %d: %s" % (v.index, e) if not isinstance(e, RingError) else str(e)
            else:
                return
            self.close(reason)      # outside the except block (see on_readable)
        return cb

    def poll(self):
        """Safety net, every tick: a queue whose pending work has sat through
        a whole tick with no progress is processed as if it had been
        notified. Counted and reported when the device stops.

        Work pending at one tick is normal: the device may have written its
        used ring and signalled a call that select() has not returned yet, or
        the guest may be between publishing avail and kicking. Only the same
        work, still pending a tick later, with no handler run in between, is
        a lost notification."""
        self.poll_stalled()
        if self.closed or not self.running or self.phase != "shadow":
            return
        if self.announcing:
            tx = self.vrings[1].svq
            if tx is None or not tx.injections and not any(
                    t is not None and t[0] == INTERNAL for t in tx.shadow.tokens):
                self.announcing = False
                if self._phase_wanted() != self.phase:
                    self._switch("RARP announce sent")
                    return
        for v in self.vrings:
            s = v.svq
            if s is None or s.broken is not None:
                continue
            if not s.device_pending() and not s.avail_pending():
                v.pending_seen = None
                continue
            st = s.stats
            marks = (st.guest_kicks, st.device_calls, s.shadow.last_used_idx, s.last_avail_idx)
            if v.pending_seen != marks:
                v.pending_seen = marks          # first sighting: give it a tick
                continue
            v.pending_seen = None
            v.polled += 1
            self._guard(v, s.handle_device_call)()

    def _drain_vqs(self):
        """Queues whose requests complete without outside input: all of blk's,
        net's TX queues (an RX buffer waits for a frame that may never come)."""
        if self.dev.device_id == VIRTIO_ID_NET:
            return [v for v in self.vrings if v.index % 2]
        return list(self.vrings)

    def _flush(self, v):
        s = v.svq
        if s is not None and s.broken is None:
            try:
                s.flush()
            except (RingError, OSError) as e:
                _vlog("vq %d: %s" % (v.index, e))
                s.broken = s.broken or str(e)

    def _drain(self):
        """Let requests in flight complete (in whatever order the device
        completes them) before the device is stopped, so that the restart
        index needs no guess.  Bounded: VU_DRAIN_SECONDS, or a moment once a
        signal asks the server to stop."""
        vqs = [v for v in self._drain_vqs() if v.svq is not None]
        t0 = time.monotonic()
        sel = selectors.DefaultSelector()
        try:
            for v in vqs:
                sel.register(v.svq.device_call_fd, selectors.EVENT_READ, v)
            while True:
                for v in vqs:
                    self._flush(v)
                busy = [v for v in vqs if v.svq.in_flight and v.svq.broken is None]
                if not busy:
                    break
                limit = 0.3 if self.loop.stopped else VU_DRAIN_SECONDS
                left = t0 + limit - time.monotonic()
                if left <= 0:
                    break
                for key, _ in sel.select(min(left, 0.05)):
                    eventfd_drain(key.fileobj)
        finally:
            sel.close()
        return time.monotonic() - t0

    def _stop_device(self, why):
        """Stop the device and record, per queue, where to restart from."""
        if not self.running:
            return
        self.running = False
        if self.phase == "shadow":
            self._quiesce_shadow(why)
        elif why is not None:
            self._quiesce_passthrough(why)
            _vlog("vq%s stopped at avail %s (passthrough; %s)" % (
                "s" if self.nvq > 1 else "", ", ".join("%#x" % v.base for v in self.vrings), why))
        self.dev.reset()
        if self.phase == "shadow":
            for v in self.vrings:               # completions until the reset
                self._flush(v)
        self._teardown_phase(keep_maps=False)
        self.phase = None

    def close(self, reason):
        """Reset the device, empty its IOTLB, release every mapping and fd."""
        if self.closed:
            return
        self.closed = True
        _vlog("frontend connection closed: %s" % reason)
        self.loop.remove_reader(self.sock.fileno())
        try:
            self._stop_device(None)
        except SvqError as e:
            _vlog("stopping the device: %s" % e)
        finally:
            self.dev.close()
            for v in self.vrings:
                v.close_fds()
            if self.mem is not None:
                self.mem.close()
                self.mem = None
            if self.dirty is not None:
                self.dirty.close()
                self.dirty = None
            if self.log_mem is not None:
                self.log_mem.close()
                self.log_mem = None
            for fd in [self.log_fd, self.sink] + self.infds:
                if fd >= 0:
                    os.close(fd)
            self.log_fd = self.sink = -1
            self.infds = []
            self.sock.close()
            self.server.connection_closed(self)


def select_writable(sock, timeout):
    sel = selectors.DefaultSelector()
    try:
        sel.register(sock, selectors.EVENT_WRITE)
        return bool(sel.select(timeout))
    finally:
        sel.close()


def _set_pdeathsig(sig):
    """Die with the parent (prctl PR_SET_PDEATHSIG)."""
    try:
        libc().prctl(1, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class VhostUserServer:
    """The Unix socket, one frontend at a time, and the event loop.  With
    `isolate` (what `svq.py serve` does), each connection is served by a
    worker process of its own; else in this process (a library, the tests)."""

    def __init__(self, device, socket_path, client=False, verbose=False, opener=VhostVdpa,
                 isolate=False, mac=None, sock_fd=None, sock_from=None, mode="auto", pcap=None):
        self.device, self.path, self.client = device, socket_path, client
        self.verbose, self.opener, self.isolate = verbose, opener, isolate
        if mode not in ("auto", "shadow", "passthrough"):
            raise UsageError("--mode %s: auto, shadow or passthrough" % mode)
        if pcap is not None and mode == "passthrough":
            raise UsageError("--pcap needs the shadow queues: in passthrough no frame passes "
                             "through svq.py")
        if pcap is not None and mode == "auto":
            mode = "shadow"         # frames are seen only through shadow queues
        self.mode = mode
        self.pcap = None
        self.pcap_path = pcap
        self.conn = None
        self.worker = None          # pid of the connection's worker process
        self.listener = None
        self.loop = EventLoop()
        self.connections = 0
        self._next_connect = 0.0
        self.mac = None
        self.worker_mode = False
        self._ino = None
        self.single = False         # the one connection we were handed: serve ends with it
        self._handed = None
        if sock_fd is not None:
            sock_from = sock_from or "fd %d" % sock_fd
            try:
                if not stat.S_ISSOCK(os.fstat(sock_fd).st_mode):
                    raise UsageError("%s: not a socket" % sock_from)
            except OSError as e:
                raise UsageError("%s: %s" % (sock_from, e.strerror)) from None
        elif not client:
            self._check_path(socket_path)
        check_barriers()
        probe = VdpaDevice(device, opener)
        try:
            if probe.device_id not in (VIRTIO_ID_NET, VIRTIO_ID_BLOCK):
                raise SvqError("%s: device type %d: serve handles net and blk"
                               % (device, probe.device_id))
            self.device_id = probe.device_id
            self.type_names = _type_names(probe.device_id)
            self.nvq = 2 if probe.device_id == VIRTIO_ID_NET else 1
            if probe.num_vqs < self.nvq:
                raise SvqError("%s: %d queues, %d needed" % (device, probe.num_vqs, self.nvq))
            shadowable = probe.device_features & svq_device_features(probe.device_id)
            if mode == "shadow":
                # The shadow rings carry indirect tables, the event index and a
                # packed ring to the guest whatever the device has.
                shadowable |= SVQ_GUEST_EXTRA_FEATURES
            else:
                # Passthrough hands the guest's rings to the device: offer
                # only what the device itself does (the same set in both
                # phases of auto mode).
                shadowable |= probe.device_features & SVQ_GUEST_EXTRA_FEATURES
            self.offered = ((shadowable & ~(1 << VIRTIO_F_ACCESS_PLATFORM))
                            | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
            protocol = [VHOST_USER_PROTOCOL_F_MQ, VHOST_USER_PROTOCOL_F_REPLY_ACK,
                        VHOST_USER_PROTOCOL_F_RESET_DEVICE, VHOST_USER_PROTOCOL_F_STATUS]
            if mode == "passthrough":
                pass                    # the device's writes cannot be logged
            elif native() is not None:
                self.offered |= 1 << VHOST_F_LOG_ALL
                protocol.append(VHOST_USER_PROTOCOL_F_LOG_SHMFD)
            else:
                _vlog("warning: no dirty logging (VHOST_F_LOG_ALL not offered): the shared log "
                      "needs an atomic OR: %s" % native_error())
            if mode == "auto" and not (probe.has_backend(VHOST_BACKEND_F_SUSPEND)
                                       and probe.has_backend(VHOST_BACKEND_F_RESUME)):
                _vlog("note: %s has no VHOST_VDPA_SUSPEND/RESUME: a switch between passthrough "
                      "and shadow redirects the guest's kicks, lets the device complete what "
                      "it took, and resets it" % device)
            # CONFIG where the frontend's device type reads it (QEMU's
            # vhost-user-blk needs it; its net frontend warns that it
            # does not support it); RARP for net.
            protocol.append(VHOST_USER_PROTOCOL_F_RARP if self.nvq == 2
                            else VHOST_USER_PROTOCOL_F_CONFIG)
            self.protocol_offered = sum(1 << b for b in protocol)
            self.config_size = probe.dev.get_config_size()
            if self.device_id == VIRTIO_ID_NET:
                self.mac = self._net_mac(probe, mac)
            elif mac is not None:
                raise UsageError("--mac is for net devices")
            elif pcap is not None:
                raise UsageError("--pcap is for net devices")
        finally:
            probe.close()
        if pcap is not None:
            # The header now; each connection's worker appends the frames.
            self.pcap = PcapWriter(pcap)
        if sock_fd is not None or not client:
            try:
                if sock_fd is not None:
                    self._adopt(sock_fd, sock_from)
                else:
                    self._listen()
            except BaseException:
                with signals_deferred():
                    self.close()
                raise

    def _net_mac(self, probe, mac):
        """The device's MAC (set first, with --mac).  A vDPA NIC that filters
        by its MAC, as vdpa_sim_net does, delivers to the guest only frames
        to that MAC (and broadcast): the guest must use it."""
        if not probe.device_features >> VIRTIO_NET_F_MAC & 1 or self.config_size < 6:
            return None
        if mac is not None:
            try:
                probe.dev.set_config(0, mac)
            except DeviceError as e:
                raise SvqError("%s: setting the MAC: %s" % (self.device, e)) from None
            if probe.dev.get_config(0, 6) != mac:
                raise SvqError("%s: the device did not take MAC %s; create it with that MAC "
                               "(vdpa dev add ... mac %s)" % (self.device, _mac_str(mac), _mac_str(mac)))
        got = probe.dev.get_config(0, 6)
        if got == bytes(6):
            _vlog("warning: %s has MAC 00:00:00:00:00:00; a device that filters by its MAC "
                  "(vdpa_sim_net does) then passes only broadcast to the guest: create it with "
                  "the guest's MAC or give --mac" % self.device)
        else:
            _vlog("net: device MAC %s; the guest must use it (QEMU: -device "
                  "virtio-net-pci,mac=%s) or frames to it are dropped" % (_mac_str(got), _mac_str(got)))
        return got

    @staticmethod
    def _check_path(path):
        if not path or "\0" in path:
            raise UsageError("--socket: a file path is needed")
        if len(os.fsencode(path)) > 107:
            raise UsageError("--socket %s: longer than a Unix socket path can be (107 bytes)" % path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError("--socket %s: no directory %s" % (path, parent))

    def _listen(self):
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise SvqError("%s exists and is not a socket" % path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise SvqError("%s: another server is listening there" % path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)     # stale socket left by a dead server
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener = s
        old = os.umask(0o177)
        try:
            s.bind(path)
            self._ino = os.stat(path).st_ino
            os.chmod(path, 0o600)
        except OSError as e:
            raise SvqError("bind %s: %s" % (path, e.strerror)) from None
        finally:
            os.umask(old)
        s.listen(4)
        s.setblocking(False)
        self.loop.add_reader(s.fileno(), self._accept)
        _vlog("serving %s (%s, %s) on %s" % (self.device, DEVICE_TYPES[self.device_id],
                                            " ".join(feature_names(self.offered, self.type_names)),
                                            path))

    def _adopt(self, fd, origin):
        """A socket handed to us: systemd's (LISTEN_FDS) or --fd's.  Listening,
        it is served as our own, but its file is its owner's to remove.
        Connected (one end of a socketpair, as libvirt hands some backends),
        it is the one frontend, and serving ends when it closes."""
        try:
            s = socket.socket(fileno=fd)
        except OSError as e:
            raise UsageError("%s: not a socket (%s)" % (origin, e.strerror)) from None
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
            s.detach()
            raise UsageError("%s: not a Unix stream socket" % origin)
        os.set_inheritable(s.fileno(), False)
        name = s.getsockname()
        self.path = os.fsdecode(name) if name else origin
        where = "%s (%s)" % (self.path, origin) if name else origin
        if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.single = True
            self._handed = s
            _vlog("serving %s (%s) on a connected socket, %s" % (
                self.device, DEVICE_TYPES[self.device_id], origin))
            return
        self.listener = s
        s.setblocking(False)
        self.loop.add_reader(s.fileno(), self._accept)
        _vlog("serving %s (%s, %s) on %s" % (self.device, DEVICE_TYPES[self.device_id],
                                            " ".join(feature_names(self.offered, self.type_names)),
                                            where))

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            _vlog("accept: %s" % e.strerror)    # EMFILE and the like: try again later
            return
        if self.conn is not None or self.worker is not None:
            _vlog("refusing a second frontend (%s) while one is connected" % self._peer(sock))
            sock.close()
            return
        self._open(sock)

    @staticmethod
    def _peer(sock):
        try:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            return "pid %d uid %d" % (pid, uid)
        except OSError:
            return "unknown peer"

    def _open(self, sock):
        self.connections += 1
        _vlog("frontend connected (%s), connection %d" % (self._peer(sock), self.connections))
        if self.isolate:
            self._fork_worker(sock)
            return
        try:
            self.conn = VhostUserConnection(self, sock)
        except SvqError as e:
            _vlog("refusing frontend: %s" % e)
            sock.close()

    def _fork_worker(self, sock):
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            _vlog("refusing frontend: fork: %s" % e.strerror)
            sock.close()
            return
        if pid:
            sock.close()
            self.worker = pid
            return
        # The worker: a fresh loop (the inherited epoll instance is the
        # parent's: only closing our copy of it is safe), nothing of the
        # parent's but the socket.
        code = 1
        try:
            _set_pdeathsig(signal.SIGTERM)
            if os.getppid() == 1:
                os._exit(1)
            self.loop.abandon()
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            self.loop = EventLoop()
            self.loop.install_signals()
            try:
                self.conn = VhostUserConnection(self, sock)
            except SvqError as e:
                _vlog("refusing frontend: %s" % e)
                sock.close()
                os._exit(1)
            self.worker_mode = True
            self.loop.run(tick=self._tick, tick_interval=0.2)
            if self.conn is not None:
                self.conn.close("server stopping")
            code = 0
        except BaseException as e:   # never return into the parent's code
            try:
                _vlog("worker: %s" % (e if isinstance(e, SvqError) else repr(e)))
            except BaseException:
                pass
        finally:
            os._exit(code)

    def _reap(self):
        if self.worker is None:
            return
        try:
            pid, status = os.waitpid(self.worker, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.worker, 0
        if not pid:
            return
        self.worker = None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = "signal %d" % sig
            hint = (" (the frontend shrank a memory file it had shared?)"
                    if sig == signal.SIGBUS else "")
            _vlog("connection %d: the worker died of %s%s; the device was reset as it closed"
                  % (self.connections, name, hint))

    def _tick(self):
        self._reap()
        if self.conn is not None:
            self.conn.poll()
        if self.worker_mode:
            if self.conn is None:
                self.loop.stop()
            return
        if self.single and self.conn is None and self.worker is None and self._handed is None:
            self.loop.stop()            # the handed connection is over: nobody can come back
            return
        if self.client and self.conn is None and self.worker is None \
                and time.monotonic() >= self._next_connect:
            self._next_connect = time.monotonic() + 1.0
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
            except OSError:
                s.close()
                return
            self._open(s)

    def connection_closed(self, conn):
        if self.conn is conn:
            self.conn = None
            if self.worker_mode:
                self.loop.stop()

    def run(self):
        """Serve until stop() or SIGINT/SIGTERM (when in the main thread)."""
        self.loop.install_signals(on_child=self._reap if self.isolate else None)
        try:
            if self._handed is not None:
                sock, self._handed = self._handed, None
                self._open(sock)
            self.loop.run(tick=self._tick, tick_interval=0.2)
        finally:
            self.close()
        return self.loop.stop_signal

    def stop(self):
        self.loop.stop()

    def _stop_worker(self, grace=0.8):
        """SIGTERM the worker (it stops the device and exits), SIGKILL it if it
        takes longer than `grace` seconds (the kernel then resets the device)."""
        if self.worker is None:
            return
        try:
            os.kill(self.worker, signal.SIGTERM)
        except ProcessLookupError:
            pass
        end = time.monotonic() + grace
        while self.worker is not None and time.monotonic() < end:
            self._reap()
            time.sleep(0.01)
        if self.worker is not None:
            try:
                os.kill(self.worker, signal.SIGKILL)
                os.waitpid(self.worker, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            _vlog("connection %d: the worker did not stop within %.1f s: killed"
                  % (self.connections, grace))
            self.worker = None

    def close(self):
        if self._handed is not None:
            self._handed.close()
            self._handed = None
        if self.conn is not None:
            self.conn.close("server stopping")
        self._stop_worker()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                if self._ino is not None and os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass
        if self.pcap is not None and not self.worker_mode:
            self.pcap.close()
        self.loop.close()


# ============================================================================
# vhost-user frontend: the built-in driver on a vhost-user backend
# ============================================================================
#
# `svq.py run SOCKET --type net|blk` drives a vhost-user backend (svq.py
# serve, DPDK's vhost, qemu-storage-daemon's vhost-user-blk export) as a
# VMM does: the driver's memory goes over as memfds (SET_MEM_TABLE), its
# rings by address, its kick and call eventfds with SET_VRING_KICK/CALL.
# The backend uses the driver's rings itself, so BuiltinRun treats it as a
# --direct device.  With --log-toggle the run turns dirty logging on and off
# as a migration that starts and fails does (SET_LOG_BASE, SET_FEATURES with
# VHOST_F_LOG_ALL, every ring's SET_VRING_ADDR with VHOST_VRING_F_LOG), each
# time waiting for the backend's ack: svq.py serve switches between
# passthrough and shadow before it acks.


class VhostUserDevice:
    """A vhost-user backend as BuiltinRun's device: the part of VdpaDevice's
    interface the direct path uses (features, config, setup_vq, start,
    reset, close), with set_mem_table in place of the IOTLB."""

    PROTOCOL = ((1 << VHOST_USER_PROTOCOL_F_REPLY_ACK) | (1 << VHOST_USER_PROTOCOL_F_CONFIG)
                | (1 << VHOST_USER_PROTOCOL_F_STATUS) | (1 << VHOST_USER_PROTOCOL_F_LOG_SHMFD))
    CONFIG_BYTES = {VIRTIO_ID_NET: 12, VIRTIO_ID_BLOCK: 36}   # what decode_*_config reads
    MAX_QUEUE_SIZE = 32768      # vhost-user has no query; the backend refuses what it cannot

    def __init__(self, path, device_type, timeout=10.0):
        self.path = path
        self.device_id = {"net": VIRTIO_ID_NET, "blk": VIRTIO_ID_BLOCK}[device_type]
        self.type = DEVICE_TYPES[self.device_id]
        self.max_queue_size = self.MAX_QUEUE_SIZE
        self.features = self.protocol = 0
        self.mem = None
        self.vqs = []
        self.log_fd, self.log_mm, self.log = -1, None, None
        self.logging = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
            except OSError as e:
                raise DeviceError("%s: connect" % path, e.errno) from None
            offered = self._get_u64(VHOST_USER_GET_FEATURES)
            self.backend_features = offered
            if offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                self.protocol = self._get_u64(VHOST_USER_GET_PROTOCOL_FEATURES) & self.PROTOCOL
                self._send(VHOST_USER_SET_PROTOCOL_FEATURES, _U64.pack(self.protocol))
            self._request(VHOST_USER_SET_OWNER)
            self.device_features = offered & ~((1 << VHOST_USER_F_PROTOCOL_FEATURES)
                                               | (1 << VHOST_F_LOG_ALL))
        except BaseException:
            self.sock.close()
            raise

    # -- messages --
    def _send(self, req, payload=b"", fds=(), flags=VU_FLAG_VERSION):
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]
               if fds else [])
        try:
            self.sock.sendmsg([_VU_HDR.pack(req, flags, len(payload)) + payload], anc)
        except OSError as e:
            raise DeviceError("%s: %s" % (self.path, VU_REQUEST_NAMES[req]),
                              e.errno or errno.EPIPE) from None

    def _reply(self, req):
        name = VU_REQUEST_NAMES[req]
        try:
            hdr = self._exact(_VU_HDR.size)
            r, flags, size = _VU_HDR.unpack(hdr)
            if r != req or not flags & VU_FLAG_REPLY or size > VU_MAX_PAYLOAD:
                raise DeviceError("%s: %s" % (self.path, name), errno.EPROTO,
                                  hint="reply %d flags %#x size %d" % (r, flags, size))
            return self._exact(size)
        except OSError as e:
            raise DeviceError("%s: %s reply" % (self.path, name),
                              e.errno or errno.ETIMEDOUT) from None

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            d = self.sock.recv(n - len(buf))
            if not d:
                raise ConnectionResetError(errno.ECONNRESET, "closed by the backend")
            buf += d
        return buf

    def _get_u64(self, req):
        self._send(req)
        raw = self._reply(req)
        if len(raw) != 8:
            raise DeviceError("%s: %s" % (self.path, VU_REQUEST_NAMES[req]), errno.EPROTO,
                              hint="a reply of %d bytes" % len(raw))
        return _U64.unpack(raw)[0]

    def _request(self, req, payload=b"", fds=(), vq=None):
        """A request, acknowledged where REPLY_ACK is negotiated (so an error
        is reported by the request that caused it, not by a later one)."""
        ack = self.protocol >> VHOST_USER_PROTOCOL_F_REPLY_ACK & 1
        self._send(req, payload, fds, VU_FLAG_VERSION | (VU_FLAG_NEED_REPLY if ack else 0))
        if ack:
            raw = self._reply(req)
            if len(raw) != 8 or _U64.unpack(raw)[0] != 0:
                raise DeviceError("%s: %s" % (self.path, VU_REQUEST_NAMES[req]), errno.EIO, vq,
                                  hint="refused by the backend")

    # -- what BuiltinRun uses --
    def negotiate(self, wanted):
        if not self.device_features >> VIRTIO_F_VERSION_1 & 1:
            raise DeviceError("%s: features" % self.path, errno.ENOTSUP,
                              hint="the backend lacks VERSION_1, which svq.py requires")
        self.features = self.device_features & wanted
        self._set_features()
        return self.features

    def _set_features(self):
        extra = self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        if self.logging:
            extra |= 1 << VHOST_F_LOG_ALL
        self._request(VHOST_USER_SET_FEATURES, _U64.pack(self.features | extra))

    def config(self):
        if not self.protocol >> VHOST_USER_PROTOCOL_F_CONFIG & 1:
            return {}
        size = self.CONFIG_BYTES[self.device_id]
        self._send(VHOST_USER_GET_CONFIG, _VU_CONFIG.pack(0, size, 0) + bytes(size))
        raw = self._reply(VHOST_USER_GET_CONFIG)[_VU_CONFIG.size:]
        decode = decode_net_config if self.device_id == VIRTIO_ID_NET else decode_blk_config
        return decode(raw, self.features or self.device_features)

    def set_mem_table(self, mem):
        """Guest memory for the backend (GuestMemory.memfd): a file per
        region, its userspace address the region's mapping in this process."""
        if len(mem.regions) > VU_MAX_REGIONS:
            raise UsageError("%d memory regions (vhost-user takes %d)"
                             % (len(mem.regions), VU_MAX_REGIONS))
        payload = struct.pack("<II", len(mem.regions), 0) + b"".join(
            _VU_REGION.pack(r.gpa, r.size, r.uaddr, 0) for r in mem.regions)
        self._request(VHOST_USER_SET_MEM_TABLE, payload, mem.fds)
        self.mem = mem

    def _uaddr(self, gpa):
        r = self.mem.region(gpa)
        return r.uaddr + gpa - r.gpa

    def _set_addr(self, vq, desc, avail, used):
        self._request(VHOST_USER_SET_VRING_ADDR, _VU_ADDR.pack(
            vq, (1 << VHOST_VRING_F_LOG) if self.logging else 0, self._uaddr(desc),
            self._uaddr(used), self._uaddr(avail), used), vq=vq)

    def setup_vq(self, vq, num, desc, avail, used, kick_fd, call_fd, base=0):
        """In QEMU's order: num, base, addr, kick, call."""
        self._request(VHOST_USER_SET_VRING_NUM, _VU_STATE.pack(vq, num), vq=vq)
        self._request(VHOST_USER_SET_VRING_BASE, _VU_STATE.pack(vq, base), vq=vq)
        self._set_addr(vq, desc, avail, used)
        self._request(VHOST_USER_SET_VRING_KICK, _U64.pack(vq), [kick_fd], vq=vq)
        self._request(VHOST_USER_SET_VRING_CALL, _U64.pack(vq), [call_fd], vq=vq)
        self.vqs.append((vq, desc, avail, used))

    def start(self, vqs):
        if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            for vq in vqs:      # with PROTOCOL_FEATURES, rings start disabled
                self._request(VHOST_USER_SET_VRING_ENABLE, _VU_STATE.pack(vq, 1), vq=vq)
        self._set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                         | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)

    def _set_status(self, status):
        if self.protocol >> VHOST_USER_PROTOCOL_F_STATUS & 1:
            self._request(VHOST_USER_SET_STATUS, _U64.pack(status))

    def check_logging(self):
        if not self.backend_features >> VHOST_F_LOG_ALL & 1:
            raise UsageError("%s: the backend does not offer VHOST_F_LOG_ALL" % self.path)
        if not self.protocol >> VHOST_USER_PROTOCOL_F_LOG_SHMFD & 1:
            raise UsageError("%s: the backend does not offer PROTOCOL_F_LOG_SHMFD" % self.path)

    def set_logging(self, on):
        """Dirty logging on or off, as QEMU's migration start (and its
        failure) does it; returns the seconds until the backend acked."""
        self.check_logging()
        if on and self.log is None:
            size = page_align_up(((self.mem.size >> PAGE_SHIFT) + 7) // 8)
            self.log_fd = os.memfd_create("svq-log", os.MFD_CLOEXEC)
            os.ftruncate(self.log_fd, size)
            self.log_mm = mmap.mmap(self.log_fd, size, flags=mmap.MAP_SHARED)
            self.log = DirtyLog(buf=memoryview(self.log_mm))
            self._send(VHOST_USER_SET_LOG_BASE, _VU_LOG.pack(size, 0), [self.log_fd])
            self._reply(VHOST_USER_SET_LOG_BASE)    # the backend has mapped it
        t0 = time.monotonic()
        self.logging = on
        self._set_features()
        took = time.monotonic() - t0
        for vq, desc, avail, used in self.vqs:
            self._set_addr(vq, desc, avail, used)
        return took

    def reset(self):
        if self.sock.fileno() >= 0:
            try:
                self._set_status(0)
            except DeviceError:
                pass

    def close(self):
        """Stop the device (SET_STATUS 0) and hang up: the backend resets it."""
        if self.sock.fileno() < 0:
            return
        self.reset()
        self.sock.close()
        if self.log is not None:
            self.log.buf.release()
            self.log_mm.close()
            self.log = None
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1


def _mac(s):
    try:
        mac = bytes(int(x, 16) for x in s.split(":"))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise argparse.ArgumentTypeError("not a MAC address: %r" % s)
    return mac


SD_LISTEN_FDS_START = 3


def systemd_socket():
    """The fd of the socket systemd activated us with (LISTEN_PID, LISTEN_FDS,
    as sd_listen_fds() reads them), or None.  The variables are removed
    either way: they are not meant for our children."""
    pid, n = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or n is None or pid != str(os.getpid()):
        return None
    if n != "1":
        raise UsageError("LISTEN_FDS=%s: serve takes one socket (one .socket unit "
                         "ListenStream= per device)" % n)
    return SD_LISTEN_FDS_START


def cmd_serve(args):
    fd, origin = args.fd, None
    activated = systemd_socket()
    if fd is not None and args.socket is not None:
        raise UsageError("--fd and --socket exclude each other")
    if fd is None and args.socket is None:
        if activated is None:
            raise UsageError("serve: --socket PATH is needed (or --fd N, or a socket "
                             "from systemd's socket activation)")
        fd, origin = activated, "fd %d from systemd" % activated
    if fd is not None and args.client:
        raise UsageError("--client connects to --socket PATH; it takes no --fd")
    if fd is not None and fd < 0:
        raise UsageError("--fd %d: not a file descriptor" % fd)
    server = VhostUserServer(args.device, args.socket, client=args.client, verbose=args.verbose,
                             isolate=True, mac=args.mac, sock_fd=fd, sock_from=origin,
                             mode=args.mode, pcap=args.pcap)
    try:
        sig = server.run()
    except BaseException:           # a signal before the loop took them over
        with signals_deferred():
            server.close()
        raise
    if sig is not None:
        _vlog("stopped by %s" % signal.Signals(sig).name)
    return 0


def add_serve_parser(sub):
    s = sub.add_parser("serve", help="vhost-user backend: shadow a vDPA device for a VMM")
    s.add_argument("device", help="/dev/vhost-vdpa-N")
    s.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH",
                   help="Unix socket path (without it: --fd, or systemd's socket activation)")
    s.add_argument("--fd", type=int, metavar="N",
                   help="serve the Unix socket at fd N: listening, or one connected frontend "
                        "(vhost-user's backend program convention)")
    s.add_argument("--client", action="store_true",
                   help="connect to a frontend listening on --socket instead of listening")
    s.add_argument("--mac", type=_mac, help="net: set the device's MAC first (the guest's)")
    s.add_argument("--pcap", metavar="FILE",
                   help="net: write every frame through the shadow queues to a pcap file "
                        "(- for standard output: | tcpdump -r -); implies --mode shadow")
    s.add_argument("--mode", choices=("auto", "shadow", "passthrough"), default="auto",
                   help="auto (default): the device uses the frontend's rings (passthrough) "
                        "and shadow virtqueues take over while the frontend logs dirty pages "
                        "(migration); shadow: always; passthrough: never (no dirty log)")
    s.add_argument("--verbose", "-v", action="store_true", help="trace every message")
    return s


# ============================================================================
# CLI
# ============================================================================

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError("must be a positive, finite number: %r" % s)
    return v


def _positive_int(s):
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: %r" % s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be positive: %r" % s)
    return v


def _cpu_pair(s):
    try:
        cpus = tuple(int(x) for x in s.split(","))
    except ValueError:
        cpus = ()
    if len(cpus) != 2 or min(cpus) < 0:
        raise argparse.ArgumentTypeError("want two CPU numbers D,S: %r" % s)
    return cpus


def build_parser():
    p = _Parser(prog="svq.py", description="Shadow virtqueues for vhost-vdpa devices.")
    p.add_argument("--version", action="version", version="svq.py " + __version__)
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)
    r = sub.add_parser("run", help="drive a device with the built-in driver (default)")
    r.add_argument("device", help="/dev/vhost-vdpa-N, or a vhost-user backend's socket")
    r.add_argument("--direct", action="store_true",
                   help="no shadow: hand the driver's rings to the device (baseline)")
    r.add_argument("--type", choices=("net", "blk"), dest="device_type",
                   help="a vhost-user backend's device type")
    r.add_argument("--log-toggle", type=_positive_float, metavar="SECONDS",
                   help="vhost-user: turn dirty logging on and off every SECONDS, as a "
                        "migration that starts and fails does")
    r.add_argument("--queue-size", type=_positive_int, help="ring size (power of two)")
    r.add_argument("--count", type=_positive_int, help="stop after this many requests")
    r.add_argument("--seconds", type=_positive_float, default=None,
                   help="run time (default 5, or unlimited with --count)")
    r.add_argument("--size", type=_positive_int,
                   help="frame size (net, default a mix up to the MTU) or request size (blk, default 4096)")
    r.add_argument("--write", action="store_true",
                   help="blk: write blocks and read them back (destroys data on the device)")
    r.add_argument("--indirect", action="store_true",
                   help="driver: use indirect descriptors where negotiated (shadow mode always offers them)")
    r.add_argument("--no-event-idx", action="store_true", help="driver: do not use event index")
    r.add_argument("--ring-base", type=int, default=0, metavar="N",
                   help="start every ring index at N (0-65535), to cross the 16-bit wrap early")
    r.add_argument("--pcap", metavar="FILE",
                   help="net: write every frame through the shadow queues, both ways, to a pcap "
                        "file (- for standard output: | tcpdump -r -)")
    r.add_argument("--packed", action="store_true",
                   help="driver: use a packed ring (shadow mode carries it to the device's "
                        "split ring)")
    r.add_argument("--straddle", action="store_true",
                   help="driver: put one buffer across the two guest memory regions "
                        "(the shadow then copies chains instead of mirroring them)")
    r.add_argument("--cpus", type=_cpu_pair, metavar="D,S",
                   help="pin the driver to CPU D and the shadow queues to CPU S")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    i = sub.add_parser("info", help="identity and capabilities of a device")
    i.add_argument("device")
    i.add_argument("--json", action="store_true")
    add_serve_parser(sub)
    for obj, what in (("dev", "vdpa devices over netlink, as iproute2's vdpa: show, add, del, "
                              "config show, vstats show"),
                      ("mgmtdev", "vdpa management devices over netlink: show")):
        d = sub.add_parser(obj, help=what, add_help=False)
        d.add_argument("words", nargs=argparse.REMAINDER)
    return p


def _progress_line(run):
    st = run.driver.stats
    secs = max(time.monotonic() - run.t0, 1e-9)
    sys.stderr.write("\r\x1b[K%8.0f req/s  %10d requests  %8.1f MB  %d errors"
                     % (st.requests / secs, st.requests, st.bytes / 1e6, st.errors))
    sys.stderr.flush()


def _round(x, digits):
    return None if x is None else round(x, digits)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def format_summary(s):
    lines = ["%s: virtio-%s, %s mode, %s ring, queue size %d" % (
                 s["device"], s["type"], s["mode"], s["ring"], s["queue_size"]),
             "  %d requests, %.1f MB in %.2f s: %.0f req/s, %.1f Mbit/s" % (
                 s["requests"], s["bytes"] / 1e6, s["seconds"], s["requests_per_second"],
                 s["mbit_per_second"]),
             "  latency p50 %.1f us, p99 %.1f us" % (s["latency_us"]["p50"], s["latency_us"]["p99"])]
    k, c = s["kicks"], s["calls"]
    if s["mode"] == "shadow":
        lines.append("  kicks guest->svq %d, svq->device %d; calls device->svq %d, svq->guest %d"
                     % (k["guest"], k["device"], c["device"], c["guest"]))
        lines.append("  dirty pages %d; shadow layout %s, %d chains walked"
                     % (s["dirty_pages"], "/".join(s["layout"]), s["chain_walks"]))
    elif s["mode"] == "vhost-user":
        lines.append("  kicks driver->backend %d" % k["guest"])
        t = s["log_toggle_ms"]
        if t["on"] or t["off"]:
            lines.append("  dirty logging on %d times (median ack %.1f ms), off %d times "
                         "(median %.1f ms); %d dirty pages in the log" % (
                             len(t["on"]), _median(t["on"]), len(t["off"]), _median(t["off"]),
                             s["dirty_pages"] or 0))
    else:
        lines.append("  kicks driver->device %d (device writes are invisible in direct mode)" % k["guest"])
    if "blk_id" in s:
        lines.append("  blk id %r, %s, %d-byte requests" % (
            s["blk_id"], "write+verify" if s["write"] else "read-only", s["request_size"]))
    cpu = s["cpu_seconds"]
    if cpu["driver"] is not None:
        per = 1e6 / max(s["requests"], 1)
        lines.append("  CPU: driver %.2f s (%.1f us/request)%s" % (
            cpu["driver"], cpu["driver"] * per,
            "" if cpu["svq"] is None else ", svq %.2f s (%.1f us/request)" % (cpu["svq"], cpu["svq"] * per)))
    if s["cpus"]["pinned"]:
        lines.append("  pinned: driver on CPU %s, svq on CPU %s"
                     % (cpu_list(s["cpus"]["driver"]), cpu_list(s["cpus"]["svq"])))
    lines.append("  integrity errors %d" % s["errors"])
    lines += ["    " + m for m in s["error_messages"]]
    return "\n".join(lines)


def cmd_run(args):
    if not 0 <= args.ring_base <= 0xffff:
        raise UsageError("--ring-base %d is outside 0..65535" % args.ring_base)
    seconds = args.seconds if args.seconds is not None else (None if args.count else 5.0)
    progress = _progress_line if (sys.stderr.isatty() and not args.json) else None
    run = BuiltinRun(args.device, direct=args.direct, queue_size=args.queue_size,
                     count=args.count, seconds=seconds, size=args.size, write=args.write,
                     indirect=args.indirect, event_idx=not args.no_event_idx,
                     ring_base=args.ring_base, straddle=args.straddle, packed=args.packed,
                     pcap=args.pcap, device_type=args.device_type,
                     log_toggle=args.log_toggle, cpus=args.cpus, progress=progress)
    try:
        run.run()
        sig = run.loop.stop_signal
        summary = run.summary()
    finally:
        with signals_deferred():
            run.close()
    if progress:
        sys.stderr.write("\r\x1b[K")
    if sig is not None:
        summary["interrupted"] = signal.Signals(sig).name
    # With --pcap -, standard output carries the capture: the summary goes to stderr.
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary),
          file=sys.stderr if args.pcap == "-" else sys.stdout)
    if sig is not None:
        return 128 + sig
    return 0 if summary["errors"] == 0 else 1


def cmd_info(args):
    info = device_info(args.device)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


VDPA_USAGE = """\
usage: svq.py [-j [-p]] dev show [DEV]
       svq.py dev add name NAME mgmtdev MGMTDEV [mac MAC] [mtu MTU] [max_vqp N]
                      [device_features HEX]
       svq.py dev del DEV
       svq.py dev config show [DEV]
       svq.py dev vstats show DEV qidx N
       svq.py mgmtdev show [MGMTDEV]
The words, output and JSON (-j, pretty with -p) are those of iproute2's vdpa."""
VDPA_OPTIONS = {"-j": "json", "--json": "json", "-p": "pretty", "--pretty": "pretty"}


def _matches(word, full):
    """iproute2's matches(): `word` abbreviates `full`."""
    return bool(word) and full.startswith(word)


def _vdpa_number(word, value, bits, base=10):
    if value is None:
        raise UsageError("%s: a number is expected" % word)
    try:
        v = int(value, base)
        if base == 10 and not value.isdigit():
            raise ValueError
    except ValueError:
        raise UsageError("%s %s: not a number" % (word, value)) from None
    if not 0 <= v < 1 << bits:
        raise UsageError("%s %s: out of range" % (word, value))
    return v


def _vdpa_add_args(words):
    """`name NAME mgmtdev MGMTDEV [mac MAC] [mtu MTU] [max_vqp N]
    [device_features HEX]`, in any order, as iproute2 takes them."""
    kw = {}
    i = 0
    while i < len(words):
        w = words[i]
        value = words[i + 1] if i + 1 < len(words) else None
        if _matches(w, "name"):
            key = "name"
        elif _matches(w, "mgmtdev"):
            key = "mgmtdev"
        elif w == "mac":
            key = "mac"
        elif w == "mtu":
            key = "mtu"
        elif _matches(w, "max_vqp"):
            key = "max_vqp"
        elif w == "device_features":
            key = "device_features"
        else:
            raise UsageError("dev add: unknown option %r" % w)
        if value is None:
            raise UsageError("dev add: %s needs a value" % w)
        if key == "mac":
            try:
                value = _mac(value)
            except argparse.ArgumentTypeError as e:
                raise UsageError("dev add: %s" % e) from None
        elif key in ("mtu", "max_vqp"):
            value = _vdpa_number(w, value, 16)
        elif key == "device_features":
            value = _vdpa_number(w, value, 64, 16)
        kw[key] = value
        i += 2
    if "mgmtdev" not in kw:
        raise UsageError("dev add: the management device is not set (mgmtdev MGMTDEV)")
    if "name" not in kw:
        raise UsageError("dev add: the device name is not set (name NAME)")
    return kw


def _vdpa_one_name(what, args):
    if len(args) > 1:
        raise UsageError("%s: one name at most, not %s" % (what, " ".join(args)))
    return args[0] if args else None


def cmd_vdpa(obj, words):
    """`svq.py dev ...` and `svq.py mgmtdev ...`: iproute2's vdpa words."""
    opts = {"json": False, "pretty": False}
    rest = []
    for w in words:
        if w in VDPA_OPTIONS:
            opts[VDPA_OPTIONS[w]] = True
        elif w in ("-h", "--help"):
            rest = ["help"]
            break
        else:
            rest.append(w)
    show = None                         # (section, fetch(nl)) for the show commands
    action = None
    cmd, args = (rest[0], rest[1:]) if rest else (None, [])
    if obj == "mgmtdev":
        if cmd is None or _matches(cmd, "help"):
            print(VDPA_USAGE)
            return 0
        if not (_matches(cmd, "show") or _matches(cmd, "list")):
            raise UsageError("mgmtdev: unknown command %r (show)" % cmd)
        handle = _vdpa_one_name("mgmtdev show", args)
        show = ("mgmtdev", lambda nl: nl.mgmtdevs(handle))
    elif cmd is not None and _matches(cmd, "help"):
        print(VDPA_USAGE)
        return 0
    elif cmd is None or _matches(cmd, "show") or _matches(cmd, "list"):
        name = _vdpa_one_name("dev show", args)
        show = ("dev", lambda nl: nl.devs(name))
    elif _matches(cmd, "add"):
        kw = _vdpa_add_args(args)
        action = lambda nl: nl.add(**kw)
    elif _matches(cmd, "del"):
        if len(args) != 1:
            raise UsageError("dev del: one device name is needed")
        action = lambda nl: nl.delete(args[0])
    elif _matches(cmd, "config"):
        if args and _matches(args[0], "help"):
            print(VDPA_USAGE)
            return 0
        if args and not _matches(args[0], "show"):
            raise UsageError("dev config: unknown command %r (show)" % args[0])
        name = _vdpa_one_name("dev config show", args[1:])
        show = ("config", lambda nl: nl.configs(name))
    elif cmd == "vstats":
        if args and args[0] == "help":
            print(VDPA_USAGE)
            return 0
        if not args or args[0] != "show":
            raise UsageError("dev vstats: usage: dev vstats show DEV qidx N")
        if len(args) != 4 or args[2] != "qidx":
            raise UsageError("dev vstats show: usage: dev vstats show DEV qidx N "
                             "(the kernel needs the queue index)")
        name, qidx = args[1], _vdpa_number("qidx", args[3], 32)
        show = ("vstats", lambda nl: nl.vstats(name, qidx))
    else:
        raise UsageError("dev: unknown command %r (show, add, del, config, vstats)" % cmd)
    nl = VdpaNetlink()
    try:
        if action is not None:
            action(nl)
            return 0
        section, fetch = show
        records = fetch(nl)
    finally:
        nl.close()
    if opts["json"]:
        sys.stdout.write(format_vdpa_json(section, records, opts["pretty"]))
    else:
        sys.stdout.write(format_vdpa_text(section, records))
    sys.stdout.flush()
    return 0


COMMANDS = {"run": cmd_run, "info": cmd_info, "serve": cmd_serve,
            "dev": None, "mgmtdev": None}      # dev, mgmtdev: cmd_vdpa


_signals = {"deferred": 0, "pending": None, "raised": False}


def _on_stop_signal(signum, frame):
    """SIGINT/SIGTERM while no event loop runs: unwind (once) with
    Interrupted; while clean-up runs (signals_deferred), only note it."""
    if _signals["deferred"] or _signals["raised"]:
        _signals["pending"] = _signals["pending"] or signum
        return
    _signals["raised"] = True
    raise Interrupted(signum)


class signals_deferred:
    """with signals_deferred(): clean-up that a signal must not cut short."""

    def __enter__(self):
        _signals["deferred"] += 1

    def __exit__(self, *exc):
        _signals["deferred"] -= 1


def main(argv=None, early_signals=()):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")
    in_main = threading.current_thread() is threading.main_thread()
    try:
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _on_stop_signal)
            if early_signals:
                raise Interrupted(early_signals[0])
        # `svq.py [-j] [-p] dev|mgmtdev WORDS`: iproute2's grammar, not argparse's.
        lead = 0
        while lead < len(argv) and argv[lead] in VDPA_OPTIONS:
            lead += 1
        if lead < len(argv) and argv[lead] in ("dev", "mgmtdev"):
            return cmd_vdpa(argv[lead], argv[:lead] + argv[lead + 1:])
        args = build_parser().parse_args(argv)
        if not args.cmd:
            raise UsageError("no device given; usage: svq.py [run|info|serve] /dev/vhost-vdpa-N")
        return COMMANDS[args.cmd](args)
    except SvqError as e:
        sys.stderr.write("svq: %s\n" % e)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        sys.stderr.write("svq: interrupted by %s\n" % signal.Signals(signum).name)
        return 128 + signum
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main(early_signals=_EARLY_SIGNALS))
