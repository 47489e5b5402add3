"""`python -m bench.tensorboard_view LOGDIR [--screenshots OUT]`: what TensorBoard shows of some runs.

Serves LOGDIR with TensorBoard on a loopback address, then prints what its data API returns, the same
requests its pages make: the runs, the Time Series groups in the order the page shows them (sorted by
name, the first two opened), the HParams tab's columns (those it shows before any is ticked marked)
and its sessions with their trial names, hyperparameters and metrics.
With --screenshots and a Chromium on the machine (`apt-get install chromium`), it also saves what a
browser shows of the Time Series and HParams pages, for a person to look at. `HParamsInProcess` gives
the HParams plugin's two answers without a server (the tests' quick way to ask it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
# What the HParams page asks for: every session group, whatever its status.
SESSION_GROUPS_REQUEST = {"experimentName": "", "allowedStatuses": STATUSES, "colParams": [], "startIndex": 0,
                          "sliceSize": 1000}
EXPERIMENT_REQUEST = {"experimentName": "", "hparamsLimit": 1000}


class TensorBoardServer:
    """TensorBoard on 127.0.0.1 and a free port, for as long as the `with` block lasts."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "TensorBoardServer":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(self.logdir), "--host", "127.0.0.1",
             "--port", str(self.port), "--load_fast", "false", "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        return self

    def __exit__(self, *_: Any) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def wait_for_runs(self, wanted: int, timeout: float = 90) -> list[str]:
        """The run list once it has `wanted` runs (TensorBoard loads event files in the background)."""
        deadline, runs = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                runs = self.get("/data/runs")
                if len(runs) >= wanted:
                    return runs
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        raise TimeoutError(f"TensorBoard at {self.url} listed {runs} after {timeout} s")

    def wait_for_sessions(self, wanted: int, timeout: float = 60) -> dict[str, dict]:
        """The HParams sessions once there are `wanted` (their files load after the run list)."""
        deadline = time.monotonic() + timeout
        while True:
            sessions = sessions_table(self.session_groups())
            if len(sessions) >= wanted or time.monotonic() > deadline:
                return sessions
            time.sleep(0.5)

    def time_series_groups(self) -> list[str]:
        """Tag groups as Time Series orders them: tags sorted by name, a group per first path part."""
        tags = self.get("/data/plugin/timeseries/tags")
        names = set()
        for plugin in ("scalars", "histograms"):
            for run_tags in tags[plugin]["runTagInfo"].values():
                names |= set(run_tags)
        names |= set(tags["images"]["tagRunSampledInfo"])
        groups: list[str] = []
        for tag in sorted(names, key=lambda t: t.replace("/", "\0")):
            if tag.split("/", 1)[0] not in groups:
                groups.append(tag.split("/", 1)[0])
        return groups

    def experiment(self) -> dict:
        return self.post("/data/plugin/hparams/experiment", EXPERIMENT_REQUEST)

    def session_groups(self) -> list[dict]:
        return self.post("/data/plugin/hparams/session_groups", SESSION_GROUPS_REQUEST)["sessionGroups"]


class HParamsInProcess:
    """What the HParams plugin answers for `logdir`, read once, without a server: the plugin's own
    request handlers over TensorBoard's event multiplexer, answering in the JSON that the server sends.
    Its imports are its own: serving needs TensorBoard's plugins only in the server's process."""

    def __init__(self, logdir: Path) -> None:
        from tensorboard import context
        from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.hparams import backend_context

        events = plugin_event_multiplexer.EventMultiplexer()
        events.AddRunsFromDirectory(str(logdir))
        events.Reload()
        provider = data_provider.MultiplexerDataProvider(events, str(logdir))
        self._backend = backend_context.Context(base_plugin.TBContext(
            data_provider=provider, logdir=str(logdir), multiplexer=events))
        self._context = context.RequestContext()

    def experiment(self) -> dict:
        from tensorboard.plugins.hparams import api_pb2, get_experiment

        return self._answer(get_experiment.Handler, api_pb2.GetExperimentRequest, EXPERIMENT_REQUEST)

    def session_groups(self) -> list[dict]:
        from tensorboard.plugins.hparams import api_pb2, list_session_groups

        return self._answer(list_session_groups.Handler, api_pb2.ListSessionGroupsRequest,
                            SESSION_GROUPS_REQUEST).get("sessionGroups", [])

    def _answer(self, handler: Any, request_type: Any, body: dict) -> dict:
        from google.protobuf import json_format
        from tensorboard import plugin_util

        request = json_format.ParseDict(body, request_type())
        return json.loads(plugin_util.proto_to_json(handler(self._context, self._backend, "", request).run()))


def sessions_table(groups: list[dict]) -> dict[str, dict]:
    """{session name: {"trial", "status", "hparams", "metrics": {tag: (value, step)}}}; "trial" is its
    group's name, which the table shows as "Trial ID"."""
    out = {}
    for g in groups:
        for s in g["sessions"]:
            out[s["name"]] = {"trial": g["name"], "status": s["status"], "hparams": g["hparams"],
                              "metrics": {m["name"]["tag"]: (m["value"], m["trainingStep"]) for m in s["metricValues"]}}
    return out


def shown_columns(experiment: dict) -> tuple[list[str], list[str]]:
    """The hyperparameters and metrics that the HParams tab shows before any is ticked, as its query
    pane picks them (tf-hparams-query-pane's `_computeHParams` and `_computeMetrics` in TensorBoard's
    webfiles): the first five hyperparameters once those marked `differs` are moved to the front (a
    stable sort), and the first five metrics."""
    hparams = sorted(experiment.get("hparamInfos", []), key=lambda h: not h.get("differs", False))
    return [h["name"] for h in hparams[:5]], [m["name"]["tag"] for m in experiment.get("metricInfos", [])[:5]]


def screenshot(url: str, out: Path) -> bool:
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        return False
    subprocess.run([browser, "--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                    "--hide-scrollbars", "--window-size=1600,1100", "--virtual-time-budget=20000",
                    f"--screenshot={out}", url],
                   capture_output=True, timeout=120, check=False)
    return out.exists()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tensorboard_view", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logdir", type=Path)
    p.add_argument("--runs", type=int, default=1, help="wait until TensorBoard has this many training runs")
    p.add_argument("--screenshots", type=Path, help="folder for PNGs of the pages (needs Chromium)")
    args = p.parse_args()
    with TensorBoardServer(args.logdir) as tb:
        print("runs:", tb.wait_for_runs(2 * args.runs))
        sessions = tb.wait_for_sessions(args.runs)
        print("time series groups (first two open):", tb.time_series_groups())
        experiment = tb.experiment()
        hparams, metrics = shown_columns(experiment)
        print("hparams (* shown before any is ticked):",
              {("*" if h["name"] in hparams else "") + h["name"]: h["type"] for h in experiment["hparamInfos"]})
        print("metrics (* shown):", [("*" if m["name"]["tag"] in metrics else "") + m["name"]["tag"]
                                     for m in experiment["metricInfos"]])
        print("sessions:", json.dumps(sessions, indent=2))
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            for name, page in (("time_series", "#timeseries"), ("hparams", "#hparams")):
                shot = args.screenshots / f"{name}.png"
                print(f"{shot}: {'written' if screenshot(tb.url + '/' + page, shot) else 'no Chromium here'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
