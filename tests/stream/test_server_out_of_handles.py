"""Out of file handles, the OpenIGTLink server rests its listener instead of spinning a core.

Found by a red-team run (session 32): 1,100 idle connections on the web and ZeroMQ ports used up
regseg's 1,024 file handles. A client then connecting to the OpenIGTLink server stayed queued,
``accept()`` failed with EMFILE, the listener woke ``select()`` at once again, and the server's
I/O thread used a whole core (~100,000 failed accepts a second) until the handles came back.

The server runs in a child process with a low handle limit (so the test runner's own limit is
never touched); the child fills its handles, a client connects, and the child reports how much
CPU its process used over the next two seconds and whether the client is served once handles
are free again.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, os, resource, sys, time
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    from regseg.stream.igtl.server import IgtlServer
    server = IgtlServer(port=0)
    spare = []
    try:
        while True:
            spare.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print(server.port, flush=True)  # only now: the client must come when no handle is left
    sys.stdin.readline()  # the parent has connected
    time.sleep(0.2)
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(2.0)
    cpu_share = (time.process_time() - cpu0) / (time.monotonic() - t0)
    failures = server.stats()["accept_failures"]
    for fd in spare:
        os.close(fd)
    served = server.wait_for_clients(1, timeout=5.0)
    print(json.dumps({"cpu_share": cpu_share, "accept_failures": failures, "served": served,
                      "stats": server.stats()}), flush=True)
    server.close()
""")


def test_a_failed_accept_rests_the_listener_and_the_client_is_served_later():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        client = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        child.stdin.write("connected\n")
        child.stdin.flush()
        report = json.loads(child.stdout.readline())
        client.close()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
        child.stdout.close()
    assert report["accept_failures"] >= 1, report  # the handles really ran out
    # Before the fix: about one core (0.9-1.0) and ~10^5 failures a second.
    assert report["cpu_share"] < 0.3, report
    assert report["accept_failures"] <= 5, report  # one try a second, not a spin
    assert report["served"], report  # and the client is let in once handles are free
    assert report["stats"]["clients_accepted"] == 1


def test_the_live_entry_raises_the_soft_file_limit_to_the_hard_one():
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
        from regseg.stream.entry import raise_file_limit
        print(raise_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["4096", "4096", "4096"]
