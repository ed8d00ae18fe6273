"""The Python client's figures (issue 11's targets, a benchmark, not a
test): the round trip of one ``send`` of 256 B through the daemon into a
remote durable inbox, one client; and how many messages/s ``on_message``
takes into one Python process (each acked). Needs two running daemons on
one relay and the receiving agent's instance id:

    python3 python/bench.py --from-dir DIR_A --to-dir DIR_B --to-instance ID_B

(``agent-link-bench daemon`` measures the daemons themselves.)
"""

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent_link import AgentLink  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-dir", required=True)
    ap.add_argument("--to-dir", required=True)
    ap.add_argument("--to-instance", required=True)
    ap.add_argument("--sends", type=int, default=300)
    ap.add_argument("--messages", type=int, default=3000)
    a = ap.parse_args()
    alice = AgentLink(agent_id="py-bench-alice", dir=a.from_dir)
    bob = AgentLink(agent_id="py-bench-bob", dir=a.to_dir)
    bob.register()
    while bob.recv() is not None:
        pass
    to = f"{a.to_instance}/py-bench-bob"
    lat = []
    for _ in range(a.sends):
        t = time.perf_counter()
        alice.send(to, "x" * 256)
        lat.append(time.perf_counter() - t)
    lat = sorted(lat[a.sends // 10:])
    print(f"send 256 B, one client, {len(lat)} measured: p50 {statistics.median(lat) * 1e3:.2f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
    while bob.recv() is not None:  # the round-trip messages
        pass
    n = a.messages - a.messages % 8
    def fill(k: int) -> None:
        for _ in range(k):
            alice.send(to, "y" * 256)
    threads = [threading.Thread(target=fill, args=(n // 8,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = 0

    @bob.on_message
    def handle(msg) -> None:
        nonlocal got
        got += 1
        if got == n:
            bob.stop()

    t0 = time.perf_counter()
    bob.run_forever()
    dt = time.perf_counter() - t0
    print(f"on_message: {n} waiting messages handled and acked in {dt:.2f} s = {n / dt:.0f} msg/s")
    assert bob.inbox() == [], "every handled message was acked"


if __name__ == "__main__":
    main()
