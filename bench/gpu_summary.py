"""`python -m bench.gpu_summary OUT`: the last lines of `bash bench/gpu.sh`, one per figure that matters,
read back from what its steps wrote under OUT (a step that was cut short or failed says so), so that
the end of the output, which is what a lent machine's reply carries, holds the whole result."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from bench.levers import summary_line


def _read(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(out: Path) -> list[str]:
    lines = ["== summary"]
    levers = out / "levers.jsonl"
    entries = [json.loads(line) for line in levers.read_text().splitlines() if line.strip()] if levers.exists() else []
    lines += [summary_line(e) for e in entries if e.get("lever") != "environment"] or ["(i) levers: no figures"]
    profile = _read(out / "profile.json")
    base = (profile or {}).get("settings", {}).get("base")
    if base:
        kinds = ", ".join(f"{k} {v / 1e3:.3f}" for k, v in base["kinds_us"].items())
        lines.append(f"(i) profile of the baseline's step, ms: {kinds}; gaps {base['gaps_us'] / 1e3:.3f} "
                     f"of {base['step_ms_measured']:.3f}")
    check = _read(out / "gpu_check.json")
    if check:
        failed = [n for n, c in check["checks"].items() if c["status"] == "FAIL"]
        counts = {s: sum(c["status"] == s for c in check["checks"].values()) for s in ("PASS", "FAIL", "SKIP")}
        lines.append(f"(ii) acceptance: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
                     f"{' (' + ', '.join(failed) + ')' if failed else ''}; "
                     f"{check.get('wall_seconds', check.get('seconds'))} s")
    else:
        lines.append("(ii) acceptance: no gpu_check.json")
    e2e = _read(out / "end_to_end.json")
    if e2e:
        lines.append(f"(iii) end to end: {e2e.get('epochs')} of {e2e.get('epochs_asked')} epochs in "
                     f"{e2e.get('seconds')} s ({e2e.get('status')}), settings {e2e.get('settings')}")
    else:
        lines.append("(iii) end to end: no end_to_end.json")
    packing = _read(out / "packing.json")
    if packing:
        for mode in ("processes", "processes+mps"):
            if mode in packing:
                figures = packing[mode].get("figures", {})
                steady = ", ".join(f"K={k} {f['steady_images_per_second']:.0f}" for k, f in figures.items())
                error = packing[mode].get("error")
                lines.append(f"(iv) packing, {mode}: steady img/s {steady or 'none'}; recommended K "
                             f"{packing[mode].get('recommended_k')}{'; ' + error[:200] if error else ''}")
    else:
        lines.append("(iv) packing: not run, or no packing.json")
    return lines


if __name__ == "__main__":
    print("\n".join(summary(Path(sys.argv[1]))))
