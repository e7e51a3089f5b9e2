#!/usr/bin/env python3
"""Summarize secantus_kill9_resume.py JSONL output: one row per (variant, mode, load)."""

import collections
import json
import statistics
import sys


def key(r):
    v = " ".join(r.get("server_extra") or []) or "default"
    if r.get("journal"):
        v += " j:true"
    return (v, r["mode"], "load" if r["load"] else "1 writer")


def main(paths):
    groups = collections.OrderedDict()
    for p in paths:
        for line in open(p):
            r = json.loads(line)
            groups.setdefault(key(r), []).append(r)
    hdr = ("variant", "mode", "load", "n", "err", "acked_lost>0", "lost_med/max",
           "tok_gone", "tok>oplog_last", "skip_SA", "skip_RA", "skip_SAOT", "all5_missed_SA",
           "gap_med/max", "ms_after_ack_med")
    print(" | ".join(hdr))
    for k, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        lost = [r["acked_lost"] for r in ok]
        gone = sum(1 for r in ok if not r["token_entry_exists"])
        newer = sum(1 for r in ok if r["token_newer_than_oplog"])

        def skipped(kind):
            return sum(1 for r in ok if r["resume"].get(kind, {}).get("new_seen", 5) < 5)

        all_missed = sum(1 for r in ok if r["resume"].get("startAfter", {}).get("new_seen") == 0)
        # gap = oplog entries lost past the token = new inserts silently skipped
        gaps = []
        for r in ok:
            sa = r["resume"].get("startAfter", {})
            if sa.get("new_seen", 5) < 5:
                if sa.get("new_seen") == 0 and r.get("extra_inserts_until_event"):
                    gaps.append(5 + r["extra_inserts_until_event"] - 1)
                else:
                    gaps.append(5 - sa.get("new_seen", 5))
        ms = [r.get("ms_since_last_ack", 0) for r in ok]
        row = (*k, len(rs), len(rs) - len(ok),
               sum(1 for x in lost if x), f"{statistics.median(lost) if lost else '-'}/{max(lost) if lost else '-'}",
               gone, newer, skipped("startAfter"), skipped("resumeAfter"), skipped("startAtOpTime"),
               all_missed,
               f"{statistics.median(gaps) if gaps else '-'}/{max(gaps) if gaps else '-'}",
               statistics.median(ms) if ms else "-")
        print(" | ".join(str(x) for x in row))


if __name__ == "__main__":
    main(sys.argv[1:])
