"""One peer measurement in a fresh process (peers' venv): `python bench/peers/peer_child.py OP FOLDER IDS_FILE`.

OPs:
  load:PEER        time importing the peer and loading the model from FOLDER (tokenizer included)
  rss:PEER:WHAT    peak RSS of one operation (WHAT: resid30, sites, everything, lens), measured as
                   bench/child.py measures mechscope's: load, read every weight once, reset the
                   high-water mark, run the operation, read the high-water mark

Prints one JSON line. The plain-HF baselines in this venv come from bench/child.py itself (its `hf_*`
operations import only transformers).
"""

from __future__ import annotations

import json
import sys
import time

T_START = time.perf_counter()

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import tools  # noqa: E402


def time_load(peer: str, folder: str) -> dict:
    t0 = time.perf_counter()
    tools.import_peer(peer)
    t1 = time.perf_counter()
    handle = tools.load(peer, folder)
    t2 = time.perf_counter()
    assert tools.tokenizer(handle) is not None
    return {"import_s": t1 - t0, "load_s": t2 - t1}


def measure_rss(peer: str, what: str, folder: str, ids_file: str) -> dict:
    import torch

    rss_start = common.rss_bytes()
    handle = tools.load(peer, folder)
    ids = torch.load(ids_file, weights_only=True)
    lens_in = tools.lens_inputs(tools.tokenizer(handle)) if what == "lens" else None
    rss_loaded = common.rss_bytes()
    with torch.inference_mode():
        checksum = sum(float(p.float().sum()) for p in tools.parameters(handle))
    rss_weights = common.rss_bytes()
    peak_load = common.hwm_bytes()
    hwm_reset = common.reset_hwm()
    with torch.inference_mode():
        if what == "lens":
            out = tools.lens(peer, handle, *lens_in)
        else:
            out = {"resid30": tools.resid30, "sites": tools.sites, "everything": tools.everything}[what](peer, handle, ids)
        held = common.tensor_bytes(out.values())
    peak_op = common.hwm_bytes()
    return {
        "rss_start": rss_start,
        "rss_loaded": rss_loaded,
        "rss_weights": rss_weights,
        "peak_load": peak_load,
        "peak_op": peak_op,
        "peak_process": max(peak_load, peak_op),
        "hwm_reset": hwm_reset,
        "result_bytes": held,
        "checksum": checksum,
    }


def main(argv: list[str]) -> None:
    op, folder, ids_file = argv
    kind, _, rest = op.partition(":")
    if kind == "load":
        result = time_load(rest, folder)
    elif kind == "rss":
        peer, _, what = rest.partition(":")
        result = measure_rss(peer, what, folder, ids_file)
    else:
        raise SystemExit(f"unknown op {op!r}: expected load:PEER or rss:PEER:WHAT")
    result["child_s"] = time.perf_counter() - T_START
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
