"""benchmarks/locustfile.py, headless for a few seconds against the live service (with an API
key, image URLs and scores): every task runs, and nothing fails."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import arrowvision
from arrowvision.service.app import create_app
from arrowvision.service.config import ServiceConfig
from arrowvision.service.security import SecurityConfig

from .servers import LiveService

ROOT = Path(__file__).resolve().parents[1]


def test_locust_headless_run_has_no_failures(siglip_all_parquet, tmp_path):
    model = arrowvision.ImageTextModel.from_parquet(siglip_all_parquet)
    app = create_app(model.vision, ServiceConfig(allow_private_urls=True), model, security=SecurityConfig(api_key="load-key"))
    with LiveService(app) as base:
        result = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless", "-u", "4",
             "-r", "4", "-t", "5s", "--host", base, "--csv", str(tmp_path / "load"), "--exit-code-on-error", "1",
             "--only-summary", "--loglevel", "WARNING"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "ARROWVISION_API_KEY": "load-key"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "load_stats.csv") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in ("single (multipart)", "batch of 4 (base64)", "single (image_url)", "score (image_url + text)"):
        assert int(rows[name]["Request Count"]) > 0, name
    assert int(rows["Aggregated"]["Failure Count"]) == 0 and int(rows["Aggregated"]["Request Count"]) > 10
