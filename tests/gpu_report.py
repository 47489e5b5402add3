"""A pytest plugin: after a session that ran `gpu` tests, a table of them (PASS, FAIL or SKIP, seconds,
why), and with `--acceptance-out DIR` the same as DIR/gpu_check.json, with each check's figures (what
the tests recorded with `record_property`). `bash bench/gpu.sh` prints and keeps both. A session where
every `gpu` test was skipped (no GPU) prints no table."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Generator

import pytest

_CALL = pytest.StashKey[pytest.CallInfo]()
_ROWS = pytest.StashKey[list]()
_STARTED = pytest.StashKey[float]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ROWS] = []
    config.stash[_STARTED] = time.perf_counter()


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    if call.when == "call" or call.excinfo is not None and _CALL not in item.stash:
        item.stash[_CALL] = call


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Generator[None, Any, Any]:
    started = time.perf_counter()
    result = yield
    if item.get_closest_marker("gpu") is not None:
        item.config.stash[_ROWS].append(_row(item, time.perf_counter() - started))
    return result


def _row(item: pytest.Item, seconds: float) -> dict[str, Any]:
    call = item.stash.get(_CALL, None)
    status, detail = "PASS", ""
    if call is None:
        status, detail = "SKIP", "not run"
    elif call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        status, detail = "SKIP", str(call.excinfo.value.msg)
    elif call.excinfo is not None:
        status, detail = "FAIL", call.excinfo.exconly().splitlines()[0][:400]
    name = item.name.removeprefix("test_")
    return {"name": name, "test": item.nodeid, "status": status, "detail": detail, "seconds": round(seconds, 1),
            **dict(item.user_properties)}


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash[_ROWS]
    out = config.getoption("acceptance_out")
    if not rows or (out is None and all(r["status"] == "SKIP" for r in rows)):  # nothing to report
        return
    write = terminalreporter.write_line
    width = max(len(r["name"]) for r in rows)
    write("")
    write(f"{'check':{width}}  result  seconds")
    for r in rows:
        write(f"{r['name']:{width}}  {r['status']:6}  {r['seconds']:7.1f}  {r['detail'][:150]}")
    failed = [r["name"] for r in rows if r["status"] == "FAIL"]
    total = round(sum(r["seconds"] for r in rows), 1)
    write(f"{'all':{width}}  {'FAIL' if failed else 'PASS':6}  {total:7.1f}  {', '.join(failed)}")
    # The checks' runs go side by side (tests/acceptance), so their seconds add up to more than the session's.
    wall = round(time.perf_counter() - config.stash[_STARTED], 1)
    write(f"{'session':{width}}  {'':6}  {wall:7.1f}  wall time, collection included")
    if out is not None:
        option = config.getoption
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": option("acceptance_device"),
            **{k: option(f"acceptance_{k}") for k in ("n_train", "n_test", "epochs", "classes", "batch_size")},
            "passed": not failed, "seconds": total, "wall_seconds": wall,
            "checks": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows}}, indent=2))
