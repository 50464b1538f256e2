"""Where a scoring run's wall time went, from Ray's task timeline (`ray.timeline()`): for the decode
tasks, the inference actors' start and their batches, how many ran at once (mean and most), their
busy seconds, and when they started and ended, counted from the run's start. Used by gpu_score.py, so
one GPU call says whether the actor waited for decoded images, for its own start, or for neither.

    summary = summarise(ray.timeline(), run_started)     # run_started: time.time() at the run's start
"""

from __future__ import annotations

# Ray's timeline names each task event's category "task::<task or actor method>"; Ray Data names the
# decode step after its function (MapBatches(load_images)) and the inference actor after its class.
STAGES = {
    "decode tasks": lambda cat: cat.startswith("task::MapBatches(load_images)"),
    "actor start": lambda cat: cat.startswith("task::MapWorker(") and "Predictor" in cat and cat.endswith(".__init__"),
    "actor batches": lambda cat: cat.startswith("task::MapWorker(") and "Predictor" in cat and cat.endswith(".submit"),
}


def concurrency(spans: list[tuple[float, float]]) -> tuple[float, int]:
    """(mean, most) spans running at once, over the time from the first start to the last end."""
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = most = 0
    area = 0.0
    last = points[0][0]
    for t, step in points:
        area += now * (t - last)
        last, now = t, now + step
        most = max(most, now)
    width = points[-1][0] - points[0][0]
    return (area / width if width > 0 else float(most)), most


def summarise(events: list[dict], since: float) -> dict:
    """Per stage: n, busy_s, first_start_s and last_end_s (seconds after `since`, a time.time()), and the
    mean and most running at once. Events before `since` (an earlier run on the same Ray) are left out."""
    out = {}
    for stage, wanted in STAGES.items():
        spans = [(e["ts"] / 1e6 - since, (e["ts"] + e["dur"]) / 1e6 - since) for e in events
                 if e.get("ph") == "X" and wanted(str(e.get("cat", ""))) and e["ts"] / 1e6 >= since]
        if not spans:
            continue
        mean, most = concurrency(spans)
        out[stage] = {"n": len(spans), "busy_s": round(sum(e - s for s, e in spans), 2),
                      "first_start_s": round(min(s for s, _ in spans), 2),
                      "last_end_s": round(max(e for _, e in spans), 2),
                      "mean_at_once": round(mean, 2), "most_at_once": most}
    return out
