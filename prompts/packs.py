"""A push's pack read before dulwich unpacks it, with bounded memory: every object's inflated size, and every
delta's target size, checked against what a prompt repository may hold.

dulwich inflates each object of a received pack whole, in memory, and checks its size against the header only
afterwards; a 1.3 MB push of a 300 MB blob of zeros took a gateway from 195 to 809 MB, and the request
limit (4 MiB) allows a gigabyte the same way, or more through a delta that copies its base again and
again. Here each zlib stream is inflated in 64 KiB steps that are counted and dropped, so a push is refused
(and nothing is unpacked) before anything of that size exists.
"""

from __future__ import annotations

import struct
import zlib

from tollway.prompts.paths import MAX_FILE_BYTES

# A prompt file is at most 1 MiB; trees and commits of a repository of 1,000 files are far smaller.
MAX_OBJECT_BYTES = MAX_FILE_BYTES + (64 << 10)
MAX_PACK_BYTES = 64 << 20  # inflated, the whole push: 64 prompt files of the largest size, or many more small
_OFS_DELTA, _REF_DELTA = 6, 7
_STEP = 64 << 10


def _commands(body: bytes) -> tuple[list[bytes], int | None]:
    """A receive-pack request's command pkt-lines (their payloads), and where its pack begins after their
    flush-pkt (None: no flush-pkt, or a line that cannot be read)."""
    lines: list[bytes] = []
    pos = 0
    while pos + 4 <= len(body):
        try:
            length = int(body[pos:pos + 4], 16)
        except ValueError:
            return lines, None
        if length == 0:
            return lines, pos + 4
        if length < 4:
            return lines, None
        lines.append(body[pos + 4:pos + length])
        pos += length
    return lines, None


def pack_start(body: bytes) -> int | None:
    """Where a receive-pack request's pack begins: after its commands' pkt-lines and their flush-pkt (None:
    no pack, as when a push only deletes, or commands that cannot be read, which dulwich then refuses)."""
    _, start = _commands(body)
    return start if start is not None and start < len(body) else None


def pack_refusal(body: bytes, *, max_object: int = MAX_OBJECT_BYTES, max_total: int = MAX_PACK_BYTES) -> str | None:
    """Why the pack of this receive-pack request must not be unpacked, or None."""
    start = pack_start(body)
    if start is None:
        return None
    data = memoryview(body)[start:]
    if bytes(data[:4]) != b"PACK" or len(data) < 12:
        return "the push holds no readable pack"
    count = struct.unpack(">I", data[8:12])[0]
    pos, total = 12, 0
    try:
        for _ in range(count):
            byte = data[pos]
            pos += 1
            kind, size, shift = (byte >> 4) & 7, byte & 15, 4
            while byte & 0x80:
                byte = data[pos]
                pos += 1
                size |= (byte & 0x7F) << shift
                shift += 7
            if kind == _OFS_DELTA:
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
            elif kind == _REF_DELTA:
                pos += 20
            if size > max_object:
                return f"an object of the push is {size} bytes inflated; a prompt repository's are at most {max_object}"
            pos, produced, head = _inflate(data, pos, size)
            if produced != size:
                return "an object of the push does not inflate to the size its header gives"
            if kind in (_OFS_DELTA, _REF_DELTA):
                target = _delta_target(head)
                if target is None or target > max_object:
                    return (f"a delta of the push makes an object of {target} bytes; a prompt repository's are at "
                            f"most {max_object}")
                size = target
            total += size
            if total > max_total:
                return f"the push inflates to over {max_total >> 20} MiB"
    except (IndexError, zlib.error):
        return "the push's pack is truncated or corrupt"
    return None


def _inflate(data: memoryview, pos: int, declared: int) -> tuple[int, int, bytes]:
    """One zlib stream from ``pos``, inflated in steps and counted (never more than the declared size and one
    step); where the next object begins, the bytes it inflated to, and its first 32 bytes."""
    stream = zlib.decompressobj()
    produced, head, pending = 0, b"", b""
    while not stream.eof:
        if not pending:
            if pos >= len(data):
                raise IndexError("truncated")
            pending = bytes(data[pos:pos + _STEP])
            pos += len(pending)
        out = stream.decompress(pending, _STEP)
        pending = stream.unconsumed_tail
        if len(head) < 32:
            head += out[:32 - len(head)]
        produced += len(out)
        if produced > declared:
            return pos, produced, head
    return pos - len(stream.unused_data), produced, head


def _delta_target(head: bytes) -> int | None:
    """A delta's target size: the second of the two varints it starts with (the base's size, then its own)."""
    pos = 0
    for _ in range(2):
        value, shift = 0, 0
        while True:
            if pos >= len(head):
                return None
            byte = head[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return value


def refusal_report(body: bytes, why: str) -> bytes:
    """receive-pack's answer refusing every command of ``body`` with ``why``: git prints it as "remote unpack
    failed: ..." and "! [remote rejected] <ref> (...)" instead of a bare HTTP error."""
    reason = why.replace("\n", " ").encode()[:900]
    refs, caps = [], b""
    for line in _commands(body)[0]:
        command, _, offered = line.rstrip(b"\n").partition(b"\0")
        caps = caps or offered
        parts = command.split(b" ")
        if len(parts) == 3:
            refs.append(parts[2])
    report = _pkt(b"unpack " + reason + b"\n") + b"".join(_pkt(b"ng " + ref + b" " + reason + b"\n") for ref in refs)
    report += b"0000"
    if b"side-band-64k" not in caps.split():
        return report
    return b"".join(_pkt(b"\x01" + report[i:i + 65515]) for i in range(0, len(report), 65515)) + b"0000"


def _pkt(data: bytes) -> bytes:
    return f"{len(data) + 4:04x}".encode() + data
