# SPDX-License-Identifier: MIT
"""A vhost-vdpa device in Python, for svq.py's unit tests and copier benchmark.

MockVhostVdpa has the method surface of svq.VhostVdpa (the ioctls and IOTLB
messages) and behaves like the kernel's simulators: a net device that loops TX
frames to RX (vdpa_sim_net) and a RAM disk (vdpa_sim_blk).  It reads the rings
it is given by IOVA through its own IOTLB, exactly as a device would, so the
shadow virtqueue's translation is checked end to end.  `misbehave` makes it a
hostile device.  A thread (start_thread) plays the device's own context;
process(vq) runs it synchronously instead.
"""

import ctypes
import errno
import os
import selectors
import struct
import threading
import time

import svq

_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<II")


class MockVhostVdpa:
    def __init__(self, kind="net", queue_max=256, mac=b"\x52\x54\x00\x12\x34\x56",
                 event_idx=False, no_notify=False, disk_bytes=8 << 20,
                 iova_range=(0, (1 << 64) - 1), features_extra=0, refuse_features_ok=False,
                 suspend=True, kick_lag=0.0):
        self.kind = kind
        self.fd = 99
        self.queue_max = queue_max
        self.mac = mac
        self.iova_range = iova_range
        base = (1 << svq.VIRTIO_F_VERSION_1) | (1 << svq.VIRTIO_F_ACCESS_PLATFORM) | \
            (1 << svq.VIRTIO_F_ANY_LAYOUT) | features_extra
        if event_idx:
            base |= 1 << svq.VIRTIO_RING_F_EVENT_IDX
        if kind == "net":
            self.device_id, self.nvqs = svq.VIRTIO_ID_NET, 3
            base |= (1 << svq.VIRTIO_NET_F_MAC) | (1 << svq.VIRTIO_NET_F_MTU) | \
                (1 << svq.VIRTIO_NET_F_STATUS)
            self.config = mac + struct.pack("<HHH", 1, 1, 1500)
        else:
            self.device_id, self.nvqs = svq.VIRTIO_ID_BLOCK, 1
            base |= (1 << svq.VIRTIO_BLK_F_SEG_MAX) | (1 << svq.VIRTIO_BLK_F_BLK_SIZE) | \
                (1 << svq.VIRTIO_BLK_F_FLUSH)
            self.disk = bytearray(disk_bytes)
            cfg = bytearray(60)
            struct.pack_into("<QII", cfg, 0, disk_bytes // 512, 0, 126)
            struct.pack_into("<I", cfg, 20, 512)
            self.config = bytes(cfg)
        self.device_features = base
        self.features = 0
        self.backend_features = 0
        self.status = 0
        self.owner = False
        self.no_notify = no_notify
        self.refuse_features_ok = refuse_features_ok
        self.maps = []                       # (iova, size, uaddr, perm, view)
        self.vqs = [dict(num=0, base=0, addr=None, kick=-1, call=-1, ready=False,
                         last_avail=0, used_idx=0) for _ in range(self.nvqs)]
        self.misbehave = None
        self.lock = threading.RLock()
        self.thread = None
        self.stop_r = None
        self.frames = 0
        self.overruns = 0
        self.written_iovas = []
        self.closed = False
        self.ioctl_log = []
        # blk: sector -> seconds a request for it takes (others are instant),
        # so that requests complete out of order; held: (due, vq, head, bufs).
        self.delays = {}
        self.held = []
        self.short_len = False              # report 1 byte written, whatever was
        # A device without VHOST_BACKEND_F_SUSPEND/RESUME, and one that runs
        # its kick handler `kick_lag` seconds after the kick, as a VDUSE
        # daemon does when it gets to it; a kick it has seen is served before
        # a reset is acknowledged (libvduse drains its queues first).
        self.can_suspend = suspend
        self.kick_lag = kick_lag
        self.lagged = {}                    # vq -> when its kick handler runs

    # -- ioctl surface of svq.VhostVdpa --
    def _need_owner(self, op):
        if not self.owner:
            raise svq.DeviceError(op, errno.EPERM)

    def close(self):
        self.stop_thread()
        self.maps = []
        self.fd = -1
        self.closed = True

    def set_owner(self):
        if self.owner:
            raise svq.DeviceError("VHOST_SET_OWNER", errno.EBUSY)
        self.owner = True

    def get_device_id(self):
        return self.device_id

    def get_features(self):
        return self.device_features

    def set_features(self, f):
        if f & ~self.device_features:
            raise svq.DeviceError("VHOST_SET_FEATURES", errno.EOPNOTSUPP)
        self.features = f

    def get_backend_features(self):
        f = (1 << svq.VHOST_BACKEND_F_IOTLB_MSG_V2) | (1 << svq.VHOST_BACKEND_F_IOTLB_BATCH)
        if self.can_suspend:
            f |= (1 << svq.VHOST_BACKEND_F_SUSPEND) | (1 << svq.VHOST_BACKEND_F_RESUME)
        return f

    def set_backend_features(self, f):
        self.backend_features = f

    def get_status(self):
        return self.status

    def set_status(self, s):
        if s == 0:
            self.stop_thread(reset=True)
            self.held = []
            for q in self.vqs:
                q.update(ready=False, last_avail=0, used_idx=0)
        if s & svq.VIRTIO_CONFIG_S_FEATURES_OK and self.refuse_features_ok:
            s &= ~svq.VIRTIO_CONFIG_S_FEATURES_OK
        self.status = s
        if s & svq.VIRTIO_CONFIG_S_DRIVER_OK:
            self.start_thread()

    def get_config_size(self):
        return len(self.config)

    def get_config(self, off, length):
        return self.config[off:off + length]

    def set_config(self, off, data):
        if off + len(data) > len(self.config):
            raise svq.DeviceError("VHOST_VDPA_SET_CONFIG", errno.EINVAL)
        cfg = bytearray(self.config)
        cfg[off:off + len(data)] = data
        self.config = bytes(cfg)

    def get_vring_num(self):
        return self.queue_max

    def get_vring_size(self, vq):
        return self.queue_max

    def get_iova_range(self):
        return self.iova_range

    def get_vqs_count(self):
        return self.nvqs

    def get_group_num(self):
        return 1

    def get_as_num(self):
        return 1

    def get_vring_group(self, vq):
        return 0

    def _vq(self, vq, op):
        self._need_owner(op)
        if vq >= self.nvqs:
            raise svq.DeviceError(op, errno.ENOBUFS, vq)
        return self.vqs[vq]

    def set_vring_num(self, vq, num):
        self._vq(vq, "VHOST_SET_VRING_NUM")["num"] = num

    def set_vring_base(self, vq, base):
        q = self._vq(vq, "VHOST_SET_VRING_BASE")
        q.update(base=base, last_avail=base, used_idx=base)

    def get_vring_base(self, vq):
        return self._vq(vq, "VHOST_GET_VRING_BASE")["last_avail"]

    def set_vring_addr(self, vq, desc, avail, used, flags=0, log=0):
        self._vq(vq, "VHOST_SET_VRING_ADDR")["addr"] = (desc, avail, used)

    def set_vring_kick(self, vq, fd):
        self._vq(vq, "VHOST_SET_VRING_KICK")["kick"] = fd
        if self.thread is not None:         # a running device polls the new fd from now on
            self.stop_thread()
            self.start_thread()

    def set_vring_call(self, vq, fd):
        self._vq(vq, "VHOST_SET_VRING_CALL")["call"] = fd

    def set_vring_enable(self, vq, enable=True):
        self._vq(vq, "VHOST_VDPA_SET_VRING_ENABLE")["ready"] = bool(enable)

    def suspend(self):
        if not self.can_suspend:
            raise svq.DeviceError("VHOST_VDPA_SUSPEND", errno.EOPNOTSUPP)
        self.stop_thread()

    def resume(self):
        self.start_thread()

    def iotlb_batch_begin(self):
        pass

    def iotlb_batch_end(self):
        pass

    def iotlb_update(self, iova, size, uaddr, perm, asid=0):
        self._need_owner("VHOST_IOTLB_UPDATE")
        first, last = self.iova_range
        if iova < first or iova + size - 1 > last:
            raise svq.DeviceError("VHOST_IOTLB_UPDATE", errno.EINVAL)
        for m in self.maps:
            if iova < m[0] + m[1] and m[0] < iova + size:
                raise svq.DeviceError("VHOST_IOTLB_UPDATE", errno.EEXIST)
        view = memoryview((ctypes.c_char * size).from_address(uaddr)).cast("B")
        self.maps.append((iova, size, uaddr, perm, view))

    def iotlb_invalidate(self, iova, size, asid=0):
        self.maps = [m for m in self.maps if not (iova <= m[0] and m[0] + m[1] <= iova + size)]

    # -- device side --
    def _view(self, iova, size, perm):
        for m_iova, m_size, _, m_perm, view in self.maps:
            if m_iova <= iova and iova + size <= m_iova + m_size:
                if not m_perm & perm:
                    raise IOError("IOVA %#x: permission" % iova)
                off = iova - m_iova
                return view[off:off + size]
        raise IOError("IOVA %#x+%#x not mapped" % (iova, size))

    def _views(self, iova, size, perm):
        """Views covering [iova, iova+size), which may span several maps."""
        out = []
        while size > 0:
            for m_iova, m_size, _, m_perm, view in self.maps:
                if m_iova <= iova < m_iova + m_size:
                    if not m_perm & perm:
                        raise IOError("IOVA %#x: permission" % iova)
                    n = min(size, m_iova + m_size - iova)
                    out.append(view[iova - m_iova:iova - m_iova + n])
                    iova += n
                    size -= n
                    break
            else:
                raise IOError("IOVA %#x not mapped" % iova)
        return out

    def _u16(self, iova, perm):
        """One 16-bit word of a ring as a 1-item view: a single load or store
        (struct.pack_into zero-fills first: a peer could read a transient 0)."""
        return self._view(iova, 2, perm).cast("H")

    def _pop(self, vq):
        """Next available chain: (head, [(iova, len, write)]) or None."""
        q = self.vqs[vq]
        num = q["num"]
        desc, avail, used = q["addr"]
        avail_idx = self._u16(avail + 2, 1)[0]
        if avail_idx == q["last_avail"]:
            if self.features >> svq.VIRTIO_RING_F_EVENT_IDX & 1:
                # avail_event: kick me for the next entry; then look again.
                self._u16(used + 4 + 8 * num, 2)[0] = q["last_avail"]
                svq.smp_mb()
                avail_idx = self._u16(avail + 2, 1)[0]
            if avail_idx == q["last_avail"]:
                return None
        head = self._u16(avail + 4 + (q["last_avail"] % num) * 2, 1)[0]
        q["last_avail"] = (q["last_avail"] + 1) & 0xffff
        bufs, i = [], head
        for _ in range(num):
            addr, length, flags, nxt = _DESC.unpack(self._view(desc + i * 16, 16, 1))
            if flags & svq.VRING_DESC_F_INDIRECT:
                raise IOError("mock device offered no indirect descriptors")
            bufs.append((addr, length, bool(flags & svq.VRING_DESC_F_WRITE)))
            if not flags & svq.VRING_DESC_F_NEXT:
                break
            i = nxt
        return head, bufs

    def _push(self, vq, head, length):
        q = self.vqs[vq]
        num = q["num"]
        _, avail, used = q["addr"]
        idx = q["used_idx"]
        mb = self.misbehave
        if mb == "bad_id":
            head = num + 5
        elif mb == "long_len":
            length += 4096
        _USED.pack_into(self._view(used + 4 + (idx % num) * 8, 8, 2), 0, head, length)
        idx = (idx + (num + 3 if mb == "jump" else 1)) & 0xffff
        q["used_idx"] = idx
        self._u16(used + 2, 2)[0] = idx

    def _notify(self, vq, old_used):
        q = self.vqs[vq]
        _, avail, used = q["addr"]
        num = q["num"]
        if self.features >> svq.VIRTIO_RING_F_EVENT_IDX & 1:
            event = self._u16(avail + 4 + 2 * num, 1)[0]
            needed = svq.vring_need_event(event, q["used_idx"], old_used)
        else:
            needed = not self._u16(avail, 1)[0] & 1
        if needed and q["call"] >= 0:
            os.write(q["call"], struct.pack("<Q", 1))

    def _read(self, bufs):
        out = bytearray()
        for iova, length, write in bufs:
            if not write:
                for v in self._views(iova, length, 1):
                    out += v
        return out

    def _write(self, bufs, data):
        done = 0
        for iova, length, write in bufs:
            if write and done < len(data):
                n = min(length, len(data) - done)
                self.written_iovas.append((iova, n))
                for v in self._views(iova, n, 2):
                    v[:] = data[done:done + len(v)]
                    done += len(v)
        return done

    def process(self, vq):
        """Serve everything available on vq; returns chains completed."""
        with self.lock:
            if not self.vqs[vq]["ready"] or not self.status & svq.VIRTIO_CONFIG_S_DRIVER_OK:
                return 0
            return self._process_net(vq) if self.kind == "net" else self._process_blk(vq)

    def _process_net(self, vq):
        if vq == 0:
            return 0                        # RX buffers wait for TX frames
        done = 0
        old_tx, old_rx = self.vqs[1]["used_idx"], self.vqs[0]["used_idx"]
        while True:
            tx = self._pop(1)
            if tx is None:
                break
            frame = self._read(tx[1])
            dst = bytes(frame[12:18])
            rx_done = False
            if dst == self.mac or dst[0] & 1:
                rx = self._pop(0)
                if rx is None:
                    self.overruns += 1
                else:
                    self._push(0, rx[0], self._write(rx[1], frame))
                    rx_done = True
            self._push(1, tx[0], 0)
            self.frames += 1
            done += 1
            if rx_done:
                pass
        if done:
            self._notify(1, old_tx)
            self._notify(0, old_rx)
        return done

    def _process_blk(self, vq):
        done = 0
        old = self.vqs[vq]["used_idx"]
        while True:
            req = self._pop(vq)
            if req is None:
                break
            head, bufs = req
            out = self._read(bufs)
            if len(out) < 16 or not any(b[2] for b in bufs):
                self._push(vq, head, 0)         # no header or no status: refused
                done += 1
                continue
            type_, _, sector = struct.unpack_from("<IIQ", out, 0)
            if sector in self.delays:
                self.held.append((time.monotonic() + self.delays[sector], vq, head, bufs))
                continue
            done += self._complete_blk(vq, head, bufs, out)
        if done:
            self._notify(vq, old)
        return done

    def complete_held(self, now=None):
        """Complete the held requests that are due (device context)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            due = [h for h in self.held if h[0] <= now]
            self.held = [h for h in self.held if h[0] > now]
            for _, vq, head, bufs in due:
                old = self.vqs[vq]["used_idx"]
                self._complete_blk(vq, head, bufs, self._read(bufs))
                self._notify(vq, old)

    def _complete_blk(self, vq, head, bufs, out):
        """Carry out one blk request and push its used entry; returns 1."""
        type_, _, sector = struct.unpack_from("<IIQ", out, 0)
        data = out[16:]
        wbufs = [b for b in bufs if b[2]]
        inlen = sum(b[1] for b in wbufs) - 1
        off = sector * 512
        status = 0
        if type_ == svq.VIRTIO_BLK_T_IN:
            if off + inlen > len(self.disk):
                reply, status = b"", 1
            else:
                reply = bytes(self.disk[off:off + inlen])
        elif type_ == svq.VIRTIO_BLK_T_OUT:
            if off + len(data) > len(self.disk):
                status = 1
            else:
                self.disk[off:off + len(data)] = data
            reply = b""
        elif type_ == svq.VIRTIO_BLK_T_GET_ID:
            reply = b"svq-mock-disk".ljust(20, b"\0")[:inlen]
        elif type_ == svq.VIRTIO_BLK_T_FLUSH:
            reply = b""
        else:
            reply, status = b"", 2
        written = self._write(wbufs, reply.ljust(inlen, b"\0")[:inlen] if reply else b"")
        # Status byte lives in the last writable byte of the chain.
        last = wbufs[-1]
        self._views(last[0] + last[1] - 1, 1, 2)[0][:] = bytes([status])
        self._push(vq, head, 1 if self.short_len else (written if reply else 0) + 1)
        return 1

    # -- device context --
    def start_thread(self):
        if self.thread is not None:
            return
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop_thread(self, reset=False):
        if self.thread is None:
            self.lagged.clear()
            return
        os.write(self.stop_w, b"r" if reset else b"x")
        self.thread.join()
        for fd in (self.stop_r, self.stop_w):
            os.close(fd)
        self.thread = None

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.stop_r, selectors.EVENT_READ, None)
        kicks = {}                          # one fd may kick several queues
        for i, q in enumerate(self.vqs):
            if q["ready"] and q["kick"] >= 0:
                kicks.setdefault(q["kick"], []).append(i)
        for fd, vqs in kicks.items():
            sel.register(fd, selectors.EVENT_READ, vqs)
        self.error = None
        lagged = self.lagged                # (kicks seen survive a new kick fd)
        try:
            while True:
                due = min([h[0] for h in self.held] + list(lagged.values()), default=None)
                events = sel.select(None if due is None else max(0, due - time.monotonic()))
                if self.held:
                    self.complete_held()
                now = time.monotonic()
                ready = [vq for vq, t in lagged.items() if t <= now]
                for key, _ in events:
                    if key.data is None:
                        if os.read(self.stop_r, 1) == b"r":
                            ready = list(lagged)    # served before the reset
                    else:
                        try:
                            os.read(key.fd, 8)
                        except BlockingIOError:
                            pass
                        for vq in key.data:
                            if self.kick_lag:
                                lagged.setdefault(vq, now + self.kick_lag)
                            else:
                                ready.append(vq)
                try:
                    for vq in ready:
                        lagged.pop(vq, None)
                        self.process(vq)
                        if self.kind == "net" and vq == 0:
                            self.process(1)
                except IOError as e:            # a device that sees a bad ring stops
                    self.error = str(e)
                    return
                if any(key.data is None for key, _ in events):
                    return
        finally:
            sel.close()


def opener(kind="net", **kw):
    """An `opener` for svq.VdpaDevice/BuiltinRun that returns one mock."""
    made = []

    def open_(path):
        dev = MockVhostVdpa(kind, **kw)
        made.append(dev)
        return dev
    open_.made = made
    return open_
