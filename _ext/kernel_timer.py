# IPython startup file, copied by _ext/bench.py into the build's IPYTHONDIR: every kernel the
# book's build starts times its cells and records its peak memory. After each cell it rewrites
# one small JSON file (temporary file, then rename), so a kernel that dies still leaves its record.
def _safetybook_timer():
    import hashlib
    import json
    import os
    import resource
    import time

    folder = os.environ.get("SAFETYBOOK_BENCH_PARTS")
    ip = get_ipython()  # noqa: F821 - defined in IPython startup files
    if not folder or ip is None:
        return
    start = time.perf_counter()
    record = {"pid": os.getpid(), "cells": []}
    state = {}

    def before(info):
        state["t"] = time.perf_counter()
        state["source"] = info.raw_cell

    def after(result):
        source = state.get("source", "")
        record["cells"].append({
            "sha": hashlib.sha256(source.encode()).hexdigest()[:12],
            "line": next((line for line in source.splitlines() if line.strip()), "")[:100],
            "seconds": round(time.perf_counter() - state.get("t", start), 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # so far
        })
        record["wall_s"] = round(time.perf_counter() - start, 1)
        record["peak_rss_mb"] = record["cells"][-1]["peak_rss_mb"]
        path = os.path.join(folder, f"kernel-{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    ip.events.register("pre_run_cell", before)
    ip.events.register("post_run_cell", after)


_safetybook_timer()
del _safetybook_timer
