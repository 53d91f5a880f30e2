"""`MLflowLogger` end to end: into the workspace's own SQLite store (params, metrics, artifacts read back with a plain
`MlflowClient`, a second logger continuing the same run, NaN dropped), and into a real `mlflow server` started here
on 127.0.0.1 — including the server going away in the middle of a run, which must not raise."""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from stereo_kit.io import write_image
from stereo_kit.train.logging import RUN_FILE, MLflowLogger

CONFIG = {"model": {"preset": "tiny", "max_disp": 96},
          "data": {"datasets": [{"name": "samples", "weight": 1.0}, {"name": "motorcycle", "weight": 2.0}],
                   "image_sizes": [[320, 256]], "index_cache": None},
          "train": {"lr": 1e-4, "amp": True}}


def artifacts(tmp_path: Path) -> tuple[Path, Path]:
    "A small JSON file and a PNG, as a run stores its resolved config and a visualisation."
    config = tmp_path / "inputs" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(CONFIG))
    panel = tmp_path / "inputs" / "panel.png"
    write_image(panel, np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    return config, panel


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def test_local_store_logs_reads_back_and_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = (tmp_path / "run").resolve()
    config_file, panel = artifacts(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MLflowLogger(workspace, run_name="first")
        logger.log_params(CONFIG)
        logger.log_params({"max_steps": 3, "enable_mlflow": True})
        for step in range(3): logger.log_metrics({"train/loss": 1 / (step + 1), "train/epe": 2.0 - step}, step)
        logger.log_metrics({"train/loss": math.nan, "train/epe": math.inf}, step=3)          # dropped, not fatal
        logger.log_artifact(config_file, "config")
        logger.log_artifact(panel, "vis/00000003")
        logger.close()
    assert logger.failures == 0
    assert dict(logger.dropped_metrics) == {"train/loss": 1, "train/epe": 1}
    assert [str(w.message).split(": ", 1)[1] for w in caught if "dropped" in str(w.message)] == [
        "metric 'train/loss' is nan at step 3; dropped (non-finite values are not logged, and counted in `dropped_metrics`)"]

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace}/mlflow.db")
    run = client.get_run(logger.run_id)
    assert (run.info.status, run.info.run_name) == ("FINISHED", "first")
    assert run.data.params == {"model.preset": "tiny", "model.max_disp": "96", "data.datasets.0.name": "samples",
                               "data.datasets.0.weight": "1.0", "data.datasets.1.name": "motorcycle",
                               "data.datasets.1.weight": "2.0", "data.image_sizes.0": "[320,256]",
                               "data.index_cache": "null", "train.lr": "0.0001", "train.amp": "true",
                               "max_steps": "3", "enable_mlflow": "true"}
    assert history(client, logger.run_id, "train/loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert history(client, logger.run_id, "train/epe") == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert [f.path for f in client.list_artifacts(logger.run_id, "config")] == ["config/config.json"]
    [stored_panel] = client.list_artifacts(logger.run_id, "vis/00000003")
    assert (stored_panel.path, stored_panel.file_size) == ("vis/00000003/panel.png", panel.stat().st_size)
    downloaded = client.download_artifacts(logger.run_id, "config/config.json", str(tmp_path / "downloaded"))
    assert json.loads(Path(downloaded).read_text()) == CONFIG
    assert len(list((workspace / "mlartifacts").rglob("panel.png"))) == 1          # inside the workspace, not in cwd
    assert json.loads((workspace / RUN_FILE).read_text()) == {
        "run_id": logger.run_id, "tracking_uri": f"sqlite:///{workspace}/mlflow.db",
        "experiment_id": run.info.experiment_id}

    resumed = MLflowLogger(workspace)
    assert (resumed.run_id, resumed.resumed) == (logger.run_id, True)
    assert client.get_run(logger.run_id).info.status == "RUNNING"
    with pytest.warns(UserWarning, match="'train/epe' is nan at step 3; dropped"):
        resumed.log_metrics({"train/loss": 0.25, "train/epe": math.nan}, step=3)
    resumed.close("KILLED")
    assert history(client, logger.run_id, "train/loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25)]
    assert history(client, logger.run_id, "train/epe") == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert client.get_run(logger.run_id).info.status == "KILLED"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [logger.run_id]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    "`mlflow server` on 127.0.0.1 in its own process group, so that stopping it stops its workers too."
    def __init__(self, folder: Path, timeout: float = 60):
        port = free_port()
        self.url, self.log = f"http://127.0.0.1:{port}", folder / "server.log"
        folder.mkdir(parents=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not answer {self.url}/health within {timeout:.0f} s; "
                            f"{self.log}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response: return response.status == 200
        except OSError: return False

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try: self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    try: importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("`mlflow server` needs the full mlflow package (pip install -e '.[dev]'); only mlflow-skinny is installed")
    server = MlflowServer(tmp_path / "server")
    try: yield server
    finally: server.stop()


@pytest.mark.slow
def test_tracking_server_logs_and_survives_its_loss(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    workspace = (tmp_path / "run").resolve()
    config_file, panel = artifacts(tmp_path)
    logger = MLflowLogger(workspace, run_name="served")
    logger.log_params(CONFIG)
    for step in range(3): logger.log_metrics({"train/loss": 1 / (step + 1)}, step)
    logger.log_artifact(config_file, "config")
    logger.log_artifact(panel, "vis")
    assert logger.failures == 0

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(logger.run_id)
    assert (run.info.run_name, run.info.status) == ("served", "RUNNING")
    assert (run.data.params["data.datasets.1.weight"], run.data.params["train.amp"]) == ("2.0", "true")
    assert history(client, logger.run_id, "train/loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert [f.path for f in client.list_artifacts(logger.run_id, "config")] == ["config/config.json"]
    assert [f.path for f in client.list_artifacts(logger.run_id, "vis")] == ["vis/panel.png"]
    assert len(list((tmp_path / "server" / "artifacts").rglob("panel.png"))) == 1      # uploaded through the server
    assert not (workspace / "mlflow.db").exists()
    assert json.loads((workspace / RUN_FILE).read_text())["tracking_uri"] == mlflow_server.url

    mlflow_server.stop()                             # the server goes away mid-run: logging fails, training goes on
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")          # fail at once instead of minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log_metrics({"train/loss": 0.25}, step=3)
        logger.close()
    assert logger.failures == 2
    assert any("training goes on" in str(w.message) for w in caught)
