"""Thousands of malformed messages through the real IgtlSource socket path: no crash, no leak, and
good frames still arrive afterwards.

Two kinds of damage. In-stream damage (bad CRC, oversize, wrong dimensions, unknown types,
non-UTF-8 names, bad extended headers ...) keeps the stream in step, because BODY_SIZE says where
the next header is: every message is counted and the connection stays. Damage that leaves no way
back (truncated headers and bodies, random bytes, absurd sizes, unknown header versions) ends the
connection; the source reconnects and carries on. The counts are printed (pytest -s) for the note.
"""

import os
import socket
import struct
import threading

import numpy as np
import pyigtl
import pytest

from regseg.stream.igtl.codec import HEADER, crc64, pack_image, pack_transform
from regseg.stream.igtl.source import IgtlSource

WAIT_S = 10.0
TS0 = 1_700_000_000.0
MAX_BODY = 64 << 10  # a small limit, so oversize bodies are cheap to send
# The first rounds warm every buffer and allocator arena up: +4.8 MiB of native (glibc arena)
# memory, in round 2 or 3 depending on the message order (tracemalloc: the Python heap grows by a
# few kB), then flat within 0.2 MiB a round over 8 rounds. RSS is compared between the end of
# round 3 and the last.
WARM_ROUNDS = 3
ROUNDS = 5
IN_STREAM_PER_ROUND = 1200
BREAKING_PER_ROUND = 30
GOOD_AFTER = 100
RSS_BOUND_BYTES = 2 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def raw(kind: bytes, name: bytes, body: bytes, *, version: int = 1, timestamp: float = TS0,
        crc: int | None = None, body_size: int | None = None) -> bytes:
    """Any TYPE/DEVICE_NAME bytes; the CRC is right unless ``crc`` is given."""
    seconds = int(timestamp)
    header = HEADER.pack(version, kind, name, seconds, int((timestamp - seconds) * 2**32),
                         len(body) if body_size is None else body_size,
                         crc64(body) if crc is None else crc)
    return header + body


def edit_body(message: bytes, offset: int, new: bytes) -> bytes:
    """``message`` with body bytes replaced at ``offset`` and its CRC made right again."""
    version, kind, name, seconds, frac, _, _ = HEADER.unpack(message[:58])
    body = bytearray(message[58:])
    body[offset:offset + len(new)] = new
    return HEADER.pack(version, kind, name, seconds, frac, len(body), crc64(body)) + bytes(body)


def image(timestamp: float, value: int = 7, device: str = "Image_Reference",
          shape=(16, 24), header_version: int = 1) -> bytes:
    return pack_image(np.full(shape, value, np.uint8), np.diag([0.2, 0.3, 1.0, 1.0]), device,
                      timestamp, header_version=header_version)


def in_stream_damage(rng: np.random.Generator) -> dict[str, list[bytes]]:
    """One message of each in-stream kind, keyed by the counter it must raise."""
    good = image(TS0)
    bad_crc = bytearray(good)
    bad_crc[-5] ^= 0xFF
    v2 = image(TS0, header_version=2)
    unknown = bytes(rng.choice(list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_"), 8).astype(np.uint8))
    return {
        "bad_crc": [bytes(bad_crc)],
        "oversize": [raw(b"IMAGE", b"Image_Reference", rng.bytes(MAX_BODY + 1000))],
        "unknown_type": [raw(unknown, b"Thing", rng.bytes(int(rng.integers(0, 300))))],
        "ignored": [raw(b"STATUS", b"", rng.bytes(30))],  # PLUS's keep-alives
        "malformed": [
            edit_body(good, 6, struct.pack(">3H", 25, 16, 1)),  # SIZE != pixel bytes
            edit_body(good, 3, b"\x63"),  # SCALAR_TYPE 99
            edit_body(good, 60, struct.pack(">3H", 1, 0, 0)),  # a subvolume
            raw(b"IMAGE", b"Image_\xff\xfe", good[58:]),  # non-UTF-8 device name
            raw(b"IM\xc3\x28GE", b"Image_Reference", good[58:]),  # non-UTF-8 type
            raw(b"IMAGE", b"Image_Reference", b""),  # empty body
            raw(b"TRANSFORM", b"ImageToReference", rng.bytes(10)),  # short TRANSFORM
            edit_body(v2, 0, struct.pack(">HHI", 0, 60000, 10**9)),  # impossible ext header
            edit_body(v2, len(v2) - 58 - 2, b"\xff\xff"),  # metadata garbage at the end
        ],
        "bad_frames": [  # well-formed messages that are not a B-mode frame
            pack_image(np.zeros((4, 4), np.uint8), np.diag([0, 0, 1.0, 1]), "Image_Reference",
                       TS0),  # zero spacing
            pyigtl.ImageMessage(np.zeros((2, 4, 4), np.uint8), np.eye(4), "ras", TS0,
                                "Image_Reference").pack(),  # a 2-slice volume
            pyigtl.ImageMessage(np.zeros((1, 4, 4), np.uint16), np.eye(4), "ras", TS0,
                                "Image_Reference").pack(),  # 16-bit pixels
        ],
        "other_devices": [image(TS0, device="Other")],
    }


def breaking_damage(rng: np.random.Generator) -> list[bytes]:
    """Byte strings after which the connection has to go (the sender closes it too)."""
    good = image(TS0)
    return [
        good[: int(rng.integers(1, 58))],  # truncated header
        good[: int(rng.integers(59, len(good)))],  # truncated body
        rng.bytes(int(rng.integers(16, 4096))),  # random bytes
        raw(b"IMAGE", b"Image_Reference", b"", body_size=2**63),  # absurd BODY_SIZE
        raw(b"IMAGE", b"Image_Reference", b"x", version=7),  # unknown header version
        raw(b"IMAGE", b"Image_Reference", b"", body_size=2**40)[:58],  # huge, then nothing
    ]


def take_until(source: IgtlSource, timestamp: float) -> bool:
    """Drain the slot until the frame sent with ``timestamp`` (the newest) comes out."""
    while (frame := source.slot.get(timeout=WAIT_S)) is not None:
        if abs(frame.source_ts - timestamp) < 1e-6:
            return True
    return False


def test_fuzzed_stream_survives_counts_everything_and_keeps_memory_flat():
    rng = np.random.default_rng(1234)
    crashes: list = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: crashes.append(args)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    # The device is named: with the first IMAGE seen, a seed that sends "Other" first would pick it.
    source = IgtlSource("127.0.0.1", listener.getsockname()[1], image_device="Image_Reference",
                        max_image_bytes=MAX_BODY, backoff_s=0.002, backoff_max_s=0.01,
                        stall_timeout_s=None)
    expected = dict.fromkeys(["bad_crc", "oversize", "unknown_type", "ignored", "malformed",
                              "bad_frames", "other_devices"], 0)
    thrown = breaking = 0
    rss = []
    next_ts = TS0 + 1
    try:
        source.start()
        for _ in range(ROUNDS):
            conn, _ = listener.accept()
            kinds = in_stream_damage(rng)
            stream = []
            for _ in range(IN_STREAM_PER_ROUND // sum(len(v) for v in kinds.values())):
                for counter in rng.permutation(list(kinds)):
                    stream += kinds[counter]
                    expected[counter] += len(kinds[counter])
                    thrown += len(kinds[counter])
                stream.append(image(next_ts))  # good frames between the damage
                next_ts += 1
            conn.sendall(b"".join(stream))
            assert take_until(source, next_ts - 1), "the last good frame of the round is missing"
            conn.close()
            for _ in range(BREAKING_PER_ROUND):
                for damage in breaking_damage(rng)[: 1 + int(rng.integers(0, 6))][-1:]:
                    conn, _ = listener.accept()  # the source has reconnected
                    conn.sendall(damage)
                    conn.close()
                    thrown += 1
                    breaking += 1
            rss.append(rss_bytes())
        # Afterwards: a clean connection and a burst of good frames.
        conn, _ = listener.accept()
        before = source.frames
        conn.sendall(b"".join(image(next_ts + i, value=i % 256) for i in range(GOOD_AFTER)))
        assert take_until(source, next_ts + GOOD_AFTER - 1)
        processed_after = source.frames - before
    finally:
        source.stop()  # before the last close, so that close is not counted as a drop
        conn.close()
        listener.close()
        threading.excepthook = previous_hook
    stats = source.stats()
    wire = stats["wire"]
    print(f"\nfuzz: {thrown} malformed messages thrown ({thrown - breaking} in-stream, {breaking} "
          f"connection-breaking), {len(crashes)} crashes, {processed_after}/{GOOD_AFTER} good "
          f"frames processed after; RSS after rounds {[round(r / 2**20, 2) for r in rss]} MiB; "
          f"counters {wire} bad_frames={stats['bad_frames']} "
          f"other_devices={stats['other_devices']} disconnects={stats['disconnects']}")
    assert crashes == [] and not source.connected.is_set()
    assert processed_after == GOOD_AFTER
    # Seeded, so exact: every in-stream message was counted once, under its own name.
    for counter in ("bad_crc", "oversize", "unknown_type", "ignored", "malformed"):
        assert wire[counter] == expected[counter], counter
    assert stats["bad_frames"] == expected["bad_frames"]
    assert stats["other_devices"] == expected["other_devices"]
    # Every connection-breaking message cost exactly its connection, and the rounds' ends too.
    assert stats["disconnects"] == breaking + ROUNDS
    assert rss[-1] - rss[WARM_ROUNDS - 1] < RSS_BOUND_BYTES


@pytest.mark.parametrize("header_version", [1, 2])
def test_a_transform_with_nan_or_invalid_status_never_places_a_frame(header_version):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    source = IgtlSource("127.0.0.1", listener.getsockname()[1])
    try:
        source.start()
        conn, _ = listener.accept()
        nan = np.eye(4)
        nan[0, 0] = np.nan
        conn.sendall(pack_transform(np.eye(4), "ImageToReference", TS0, header_version=2,
                                    metadata={"TransformStatus": "INVALID"})
                     + image(TS0, header_version=header_version)
                     + raw(b"TRANSFORM", b"ImageToReference", struct.pack(">12f", *[np.nan] * 12),
                           timestamp=TS0 + 1)
                     + image(TS0 + 1, header_version=header_version)
                     + image(TS0 + 2, header_version=header_version))
        assert take_until(source, TS0 + 2)
        conn.close()
    finally:
        source.stop()
        listener.close()
    stats = source.stats()
    assert stats["invalid_poses"] == 1  # the INVALID one: that frame went out untracked
    assert stats["bad_frames"] == 1  # the NaN one: refused, named in the log
    assert stats["frames"] == 2
