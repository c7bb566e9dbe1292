"""Registration changes from the network: refused unless allowed, rate-limited, sanity-checked,
logged with the peer (issue 9: an anonymous 10 mm shift once took TRE from 0.64 to 8.8 mm)."""

from __future__ import annotations

import logging
import math
import socket
import threading

import numpy as np
import pytest
from pyigtl.messages import TransformMessage

from regseg.errors import InputError
from regseg.stream.igtl.codec import pack_transform
from regseg.stream.igtl.registration import (
    RegistrationListener,
    parse_hosts,
    peer_host,
    registration_jump,
    registration_problem,
)
from regseg.stream.igtl.server import IgtlServer

WAIT_S = 5.0
TS = 1_700_000_000.0
PIVOT = np.array([10.0, -20.0, 30.0])


def rigid(angle_deg: float = 0.0, axis=(0, 0, 1), shift=(0, 0, 0), about=PIVOT) -> np.ndarray:
    """A rotation by ``angle_deg`` about ``axis`` through ``about``, then ``shift`` mm."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = about - rotation @ about + np.asarray(shift, float)
    return m


def message(matrix: np.ndarray, name: str = "ReferenceToMRI") -> TransformMessage:
    return TransformMessage(matrix, TS, name)


def test_an_unauthorised_registration_is_refused_and_logged_with_its_peer(caplog):
    applied = []
    listener = RegistrationListener(applied.append)  # the default: nobody may register
    arrived = threading.Event()

    def on_message(msg, peer):
        listener(msg, peer)
        arrived.set()

    caplog.set_level(logging.WARNING, logger="regseg.stream.igtl.registration")
    with IgtlServer(on_message=on_message) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as attacker:
            shift = rigid(shift=(10, 0, 0))  # the 10 mm shift
            attacker.sendall(pack_transform(np.linalg.inv(shift), "MRIToReference", TS))
            assert arrived.wait(WAIT_S)
            port = attacker.getsockname()[1]
    stats = listener.stats()
    assert applied == [] and stats["applied"] == 0
    assert stats["refused_by_reason"]["not_allowed"] == 1
    assert stats["peers"] == {"127.0.0.1": {"applied": 0, "refused": 1}}
    assert f"127.0.0.1:{port}" in caplog.text and "--accept-registration-from" in caplog.text


def test_an_authorised_registration_is_applied_logged_and_rate_limited(caplog):
    applied = []
    listener = RegistrationListener(applied.append, allowed_hosts=parse_hosts("localhost"),
                                    reference_to_mri=np.eye(4), pivot_mri=PIVOT,
                                    min_interval_s=3600.0)
    caplog.set_level(logging.WARNING, logger="regseg.stream.igtl.registration")
    listener(message(rigid(shift=(3, 0, 0))), "127.0.0.1:5000")
    listener(message(rigid(shift=(4, 0, 0))), "127.0.0.1:5000")  # within the interval
    assert len(applied) == 1
    np.testing.assert_allclose(applied[0], rigid(shift=(3, 0, 0)), atol=1e-6)
    stats = listener.stats()
    assert stats["applied"] == 1 and stats["refused_by_reason"]["rate_limited"] == 1
    assert stats["last_peer"] == "127.0.0.1:5000" and "3.0 mm" in stats["last_change"]
    assert "registration CHANGED by 127.0.0.1:5000" in caplog.text


@pytest.mark.parametrize(("change", "allowed"), [
    (rigid(shift=(9.5, 0, 0)), True),
    (rigid(shift=(0, 10.5, 0)), False),  # the shift, and a bit
    (rigid(angle_deg=9.0, axis=(1, 1, 0)), True),
    (rigid(angle_deg=11.0, axis=(0, 1, 0)), False),
    (rigid(angle_deg=7.0, about=PIVOT + [100, 0, 0]), False),  # 7 deg 100 mm away: 12.2 mm...
    (rigid(angle_deg=7.0, about=PIVOT + [40, 0, 0]), True),  # ... 40 mm away: 4.9 mm
])
def test_a_jump_above_the_limits_is_refused_unless_allowed(change, allowed):
    current = rigid(angle_deg=30.0, axis=(1, 0, 0), shift=(5, 5, 5))
    for allow_jump in (False, True):
        applied = []
        listener = RegistrationListener(applied.append, allowed_hosts={"10.1.1.1"},
                                        reference_to_mri=current, pivot_mri=PIVOT,
                                        allow_jump=allow_jump)  # 10 mm, 10 deg
        listener(message(change @ current, "ReferenceToMRI"), "10.1.1.1:9")
        taken = allowed or allow_jump
        assert len(applied) == int(taken)
        assert listener.stats()["refused_by_reason"]["jump"] == int(not taken)


def test_the_first_registration_when_none_is_set_is_not_a_jump():
    applied = []
    listener = RegistrationListener(applied.append, allowed_hosts={"10.1.1.1"})
    far = rigid(angle_deg=90, shift=(200, -150, 40))  # tracker and MRI frames differ wildly
    listener(message(np.linalg.inv(far), "MRIToReference"), "10.1.1.1:9")
    np.testing.assert_allclose(applied[0], far, atol=1e-5)
    assert listener.stats()["last_change"].startswith("initial registration")


def test_random_rigid_changes_are_measured_at_the_pivot():
    rng = np.random.default_rng(0)
    for _ in range(200):
        angle = rng.uniform(0, 170)
        shift = rng.normal(size=3) * rng.uniform(0, 30)
        current = rigid(rng.uniform(0, 180), rng.normal(size=3), rng.normal(size=3) * 50)
        change = rigid(angle, rng.normal(size=3), shift)  # rotation about PIVOT, then shift
        mm, deg = registration_jump(current, change @ current, PIVOT)
        assert mm == pytest.approx(np.linalg.norm(shift), abs=1e-6)
        assert deg == pytest.approx(angle, abs=1e-4)


def test_random_degenerate_matrices_are_refused_and_never_applied():
    rng = np.random.default_rng(1)
    applied = []
    listener = RegistrationListener(applied.append, allowed_hosts={"10.1.1.1"},
                                    min_interval_s=0.0, allow_jump=True)
    bad = []
    for _ in range(50):
        m = rigid(rng.uniform(0, 90), rng.normal(size=3), rng.normal(size=3))
        singular = m.copy()
        singular[:3, int(rng.integers(3))] = 0  # a zero column
        parallel = m.copy()
        parallel[:3, 1] = parallel[:3, 0] * rng.uniform(0.5, 2)  # parallel axes
        reflection = m @ np.diag([-1.0, 1, 1, 1])
        scaled = m @ np.diag([*rng.uniform(1.3, 3, 3), 1.0])
        nan = m.copy()
        nan[int(rng.integers(3)), int(rng.integers(4))] = rng.choice([np.nan, np.inf])
        bad += [singular, parallel, reflection, scaled, nan]
    for matrix in bad:
        assert registration_problem(matrix) is not None
        for name in ("ReferenceToMRI", "MRIToReference"):
            # pyigtl keeps the matrix as given; TRANSFORM carries float32, so NaN stays NaN
            listener(TransformMessage(matrix, TS, name), "10.1.1.1:9")
    assert applied == [] and listener.stats()["refused_by_reason"]["bad_matrix"] == 2 * len(bad)
    listener(message(rigid(shift=(1, 2, 3))), "10.1.1.1:9")  # and a good one still passes
    assert len(applied) == 1


def test_hosts_are_resolved_and_bad_ones_named():
    assert parse_hosts("127.0.0.1, localhost") >= {"127.0.0.1"}
    assert parse_hosts(None) == frozenset()
    with pytest.raises(InputError, match="'no-such-host.invalid' does not resolve"):
        parse_hosts("127.0.0.1,no-such-host.invalid")
    with pytest.raises(InputError, match="empty host name"):
        parse_hosts("127.0.0.1,,10.0.0.1")
    assert peer_host("::ffff:10.0.0.2:5555") == "10.0.0.2"
    assert peer_host("[fe80::1%eth0]:5555") == "fe80::1"


def test_the_status_line_shows_changes_and_refusals_with_the_peer():
    listener = RegistrationListener(lambda m: None, allowed_hosts={"10.1.1.1"})
    assert listener.status_text() == ""
    listener(message(rigid(shift=(1, 0, 0))), "10.1.1.1:9")
    listener(message(rigid(shift=(2, 0, 0))), "10.9.9.9:4")
    assert listener.status_text() == " | registration 1 applied (10.1.1.1:9), 1 refused"
