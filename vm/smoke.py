#!/usr/bin/env python3
"""Smoke test of the rig's devices: run as `vm/run python3 vm/smoke.py`.

Opens SVQ_NET_DEV, SVQ_BLK_DEV and SVQ_VDUSE_DEV, asks each for its virtio
device id (VHOST_VDPA_GET_DEVICE_ID: 1 net, 2 blk), checks SVQ_VDUSE_IMAGE and
writes a file into SVQ_OUT. Exits non-zero on the first mismatch.
"""
import fcntl
import os
import struct
import sys

VHOST_VDPA_GET_DEVICE_ID = 0x8004AF70  # _IOR(0xAF, 0x70, __u32)
EXPECTED = {"SVQ_NET_DEV": 1, "SVQ_BLK_DEV": 2, "SVQ_VDUSE_DEV": 2}


def device_id(path):
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, VHOST_VDPA_GET_DEVICE_ID, buf)
        return struct.unpack("<I", buf)[0]
    finally:
        os.close(fd)


def main():
    failed = 0
    for var, want in EXPECTED.items():
        path = os.environ.get(var)
        if not path:
            print("%s is not set" % var)
            failed += 1
            continue
        got = device_id(path)
        print("%s=%s device id %d (want %d) %s"
              % (var, path, got, want, "ok" if got == want else "WRONG"))
        failed += got != want
    image = os.environ.get("SVQ_VDUSE_IMAGE", "")
    size = os.path.getsize(image) if image and os.path.exists(image) else -1
    print("SVQ_VDUSE_IMAGE=%s size %d %s" % (image, size, "ok" if size == 64 << 20 else "WRONG"))
    failed += size != 64 << 20
    out = os.environ.get("SVQ_OUT")
    if out:
        with open(os.path.join(out, "smoke.txt"), "w") as f:
            f.write("smoke ok\n" if not failed else "smoke failed\n")
        print("SVQ_OUT=%s writable ok" % out)
    else:
        print("SVQ_OUT is not set")
        failed += 1
    print("python3 is %s" % sys.executable)
    print("smoke: %s" % ("ok" if not failed else "%d FAILED" % failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
