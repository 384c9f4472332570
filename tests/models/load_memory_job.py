"""Measure anonymous-memory peak while loading a checkpoint: `python load_memory_job.py BIG TINY`."""

import json
import os
import sys
import threading
import time

import jax

import lorajax


def rss_anon_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(big: str, tiny: str) -> None:
    lorajax.models.from_pretrained(tiny)  # warm-up: imports, XLA runtime
    base, peak, stop = rss_anon_kb(), [0], [False]

    def poll():
        while not stop[0]:
            peak[0] = max(peak[0], rss_anon_kb())
            time.sleep(0.001)

    t = threading.Thread(target=poll)
    t.start()
    _, params = lorajax.models.from_pretrained(big)
    jax.block_until_ready(params)
    stop[0] = True
    t.join()
    print(json.dumps({"ckpt_kb": os.path.getsize(os.path.join(big, "model.safetensors")) / 1024,
                      "peak_kb": peak[0] - base, "final_kb": rss_anon_kb() - base}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
