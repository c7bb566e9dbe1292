"""Registration changes from the network are an operator's act: allowed peers only, rate-limited,
sanity-checked, logged with the peer, counted per peer (issue 9).

3D Slicer sends the user's registration as a TRANSFORM named ``MRIToReference`` (Slicer's
convention for a transform node named A-To-B: it maps MRI RAS mm to the tracker's Reference) or
``ReferenceToMRI``. Applied at once and unchecked, an anonymous 10 mm shift once moved the
registered TRE from 0.64 to 8.8 mm while flagging 11 of 240 frames: a confident overlay in the
wrong place. So a registration is refused unless it comes from a host named with
``--accept-registration-from``, arrives at least ``min_interval_s`` after the last one applied,
is a finite, invertible, near-rigid affine, and (once a registration is set) moves the prostate
by at most ``max_jump_mm`` and turns by at most ``max_jump_deg`` (unless ``allow_jump``).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Collection

import numpy as np
from pyigtl.messages import MessageBase, TransformMessage

from regseg.errors import InputError
from regseg.geometry import REGISTRATION_SCALE_RANGE, check_registration
from regseg.stream.igtl.wire import RateLimitedLog

log = logging.getLogger(__name__)

#: TRANSFORM device names Slicer may send with the registration, and whether the matrix must be
#: inverted to give ReferenceToMRI (the pipeline's ``reference_to_mri``).
REGISTRATION_DEVICES = {"MRIToReference": True, "ReferenceToMRI": False}
#: One change a second: a person pushing a transform from Slicer, not a script sweeping one.
MIN_INTERVAL_S = 1.0
#: The largest change taken without --allow-registration-jump: a re-registration corrects a few
#: mm (the prostate moves 2-5 mm with the probe); 10 mm is about half a prostate's width, and
#: 10 degrees turns a point 20 mm from the centre by 3.5 mm.
MAX_JUMP_MM = 10.0
MAX_JUMP_DEG = 10.0
#: Near-rigid: the 3x3 part's singular values (scales) within these bounds (the same rule as a
#: --reference-to-mri file's: :func:`regseg.geometry.check_registration`).
SCALE_RANGE = REGISTRATION_SCALE_RANGE
REFUSAL_REASONS = ("not_allowed", "rate_limited", "bad_matrix", "jump")
MAX_PEERS_NAMED = 32


def parse_hosts(text: str | None, flag: str = "--accept-registration-from") -> frozenset[str]:
    """The IP addresses of a comma-separated list of host names or addresses.

    Raises:
        InputError: an empty entry or a name that does not resolve (the message names it).
    """
    if not text:
        return frozenset()
    addresses: set[str] = set()
    for host in (part.strip() for part in text.split(",")):
        if not host:
            raise InputError(f"{flag} {text!r}: an empty host name; HOST[,HOST] expected, e.g. "
                             "127.0.0.1,slicer-pc")
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise InputError(f"{flag}: host {host!r} does not resolve ({exc}); give the address "
                             "or name of the computer running 3D Slicer") from exc
        addresses.update(_normal_host(info[4][0]) for info in infos)
    return frozenset(addresses)


def _normal_host(address: str) -> str:
    """'::ffff:10.0.0.2' -> '10.0.0.2'; an IPv6 scope is dropped."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def peer_host(peer: str) -> str:
    """The address part of "host:port" (IPv6 hosts contain colons too)."""
    return _normal_host(peer.rsplit(":", 1)[0].strip("[]"))


def registration_problem(matrix: np.ndarray) -> str | None:
    """Why ``matrix`` is not a usable ReferenceToMRI (None if it is): a finite, invertible,
    near-rigid affine with no reflection (:func:`regseg.geometry.check_registration`; MRI and
    tracker are both in mm)."""
    try:
        check_registration(matrix, what="matrix")
    except InputError as exc:
        return str(exc)
    return None


def registration_jump(old: np.ndarray, new: np.ndarray, pivot: np.ndarray) -> tuple[float, float]:
    """(mm, deg) between two ReferenceToMRI matrices: how far the MRI point that ``old`` put at
    ``pivot`` moves under ``new``, and the angle of the rotation between them."""
    change = new @ np.linalg.inv(old)  # MRI as registered before -> MRI as registered now
    moved = change[:3, :3] @ pivot + change[:3, 3]
    u, _, vt = np.linalg.svd(change[:3, :3])
    rotation = u @ vt
    cos = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.linalg.norm(moved - pivot)), math.degrees(math.acos(cos))


class RegistrationListener:
    """Takes the operator's registration from Slicer, under the safeguards in the module docstring.

    Use as an :class:`~regseg.stream.igtl.server.IgtlServer` ``on_message`` callback (it runs on
    the server's I/O thread). The inverse of ``MRIToReference`` (or ``ReferenceToMRI`` as is) is
    handed to ``apply`` (e.g. ``Pipeline.set_reference_to_mri``), from the next frame on. Until
    :meth:`bind` gives ``apply``, the latest accepted matrix is kept and handed over then. Other
    messages are ignored.

    Args:
        apply: where accepted ReferenceToMRI matrices go.
        allowed_hosts: IP addresses whose registrations are taken (:func:`parse_hosts`); empty:
            every registration is refused (the default: the network cannot re-register).
        reference_to_mri: the registration in use (e.g. ``--reference-to-mri``); None: none yet,
            and the first accepted one is not checked for a jump (it is the initial one).
        pivot_mri: (3,) MRI RAS mm where a jump is measured: the prostate centre.
        min_interval_s: accepted registrations at least this far apart; others refused.
        max_jump_mm, max_jump_deg: larger changes are refused unless ``allow_jump``.
    """

    def __init__(
        self,
        apply: Callable[[np.ndarray], None] | None = None,
        *,
        allowed_hosts: Collection[str] = (),
        reference_to_mri: np.ndarray | None = None,
        pivot_mri: np.ndarray | None = None,
        min_interval_s: float = MIN_INTERVAL_S,
        max_jump_mm: float = MAX_JUMP_MM,
        max_jump_deg: float = MAX_JUMP_DEG,
        allow_jump: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self._apply = apply
        self._pending: np.ndarray | None = None
        self.allowed_hosts = frozenset(_normal_host(h) for h in allowed_hosts)
        self.current = None if reference_to_mri is None else np.array(reference_to_mri, float)
        self.pivot_mri = np.zeros(3) if pivot_mri is None else np.asarray(pivot_mri, float)
        self.min_interval_s = min_interval_s
        self.max_jump_mm, self.max_jump_deg = max_jump_mm, max_jump_deg
        self.allow_jump = allow_jump
        self.applied = 0
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.peers: dict[str, dict[str, int]] = {}
        self.last_peer = ""
        self.last_change = ""  # "+3.2 mm, 1.0 deg from 127.0.0.1:50000"
        self._last_applied_s = -math.inf
        self._log = RateLimitedLog(log)

    def bind(self, apply: Callable[[np.ndarray], None]) -> None:
        """Set where matrices go; a matrix accepted before this call is handed over now."""
        with self._lock:
            self._apply, pending, self._pending = apply, self._pending, None
        if pending is not None:
            apply(pending)

    def __call__(self, message: MessageBase, peer: str) -> None:
        invert = REGISTRATION_DEVICES.get(message.device_name)
        if invert is None or not isinstance(message, TransformMessage):
            return
        name = message.device_name
        host = peer_host(peer)
        if host not in self.allowed_hosts:
            allowed = ",".join(sorted(self.allowed_hosts)) or "none"
            return self._refuse("not_allowed", host, f"{name} from {peer} refused: this host may "
                                "not change the registration (allowed: "
                                f"{allowed}; see --accept-registration-from)")
        now = time.monotonic()
        if now - self._last_applied_s < self.min_interval_s:
            return self._refuse("rate_limited", host, f"{name} from {peer} refused: "
                                f"{now - self._last_applied_s:.2f} s after the last change; at "
                                f"most one per {self.min_interval_s:g} s (send it again)")
        matrix = np.array(message.matrix, dtype=np.float64)
        problem = registration_problem(matrix)
        if problem is None and invert:
            matrix = np.linalg.inv(matrix)
        if problem is not None:
            return self._refuse("bad_matrix", host, f"{name} from {peer} refused: {problem}")
        change = "initial registration"
        if self.current is not None:
            mm, deg = registration_jump(self.current, matrix, self.pivot_mri)
            change = f"moves the prostate centre {mm:.1f} mm, turns {deg:.1f} deg"
            if (mm > self.max_jump_mm or deg > self.max_jump_deg) and not self.allow_jump:
                return self._refuse("jump", host, f"{name} from {peer} refused: it {change}; "
                                    f"limits {self.max_jump_mm:g} mm, {self.max_jump_deg:g} deg "
                                    "(--allow-registration-jump to take larger changes)")
        with self._lock:
            apply = self._apply
            if apply is None:
                self._pending = matrix
        if apply is not None:
            apply(matrix)
        self.current = matrix
        self._last_applied_s = now
        self.applied += 1
        self._count(host, "applied")
        self.last_peer = peer
        self.last_change = f"{change} ({name} from {peer})"
        log.warning("OpenIGTLink: registration CHANGED by %s (%s): %s; used from the next frame",
                    peer, name, change)

    def _refuse(self, reason: str, host: str, why: str) -> None:
        self.refused[reason] += 1
        self._count(host, "refused")
        self._log.warning(reason, f"OpenIGTLink: registration {why}")

    def _count(self, host: str, what: str) -> None:
        if host not in self.peers and len(self.peers) >= MAX_PEERS_NAMED:
            host = "other"
        counts = self.peers.setdefault(host, {"applied": 0, "refused": 0})
        counts[what] += 1

    def status_text(self) -> str:
        """For the live status line: "" until a registration arrives, then e.g.
        " | registration 1 applied (127.0.0.1:50000), 2 refused"."""
        refused = sum(self.refused.values())
        if not (self.applied or refused):
            return ""
        last = f" ({self.last_peer})" if self.last_peer else ""
        return f" | registration {self.applied} applied{last}, {refused} refused"

    def stats(self) -> dict:
        """applied, refused (total and by reason), per-peer counts, the last change and its peer,
        and the safeguards in force."""
        return {
            "applied": self.applied,
            "refused": sum(self.refused.values()),
            "refused_by_reason": dict(self.refused),
            "peers": {host: dict(counts) for host, counts in self.peers.items()},
            "last_peer": self.last_peer,
            "last_change": self.last_change,
            "allowed_hosts": sorted(self.allowed_hosts),
            "limits": {"min_interval_s": self.min_interval_s, "max_jump_mm": self.max_jump_mm,
                       "max_jump_deg": self.max_jump_deg, "allow_jump": self.allow_jump},
        }
