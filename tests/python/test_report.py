"""`vae-pipeline report` on the 24 Kodak images with TAEF2 at 256, against references nobody here
wrote: Pillow's resize, onnxruntime's Python API, numpy and scikit-image; and the page it writes,
opened in a real headless Chromium.
"""
from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from PIL import Image

from report_reference import reconstruct, report_card, run_report, skimage_ssim
from vp_helpers import REPO, require

SIZE = 256
PSNR_TOL_DB = 0.05  # the contract: Pillow vs our resize differ by at most 1 level
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def kodak(shared) -> Path:
    d = require(shared / "data" / "kodak", "Kodak images")
    assert len(list(d.glob("*.png"))) == 24
    return d


@pytest.fixture(scope="module")
def kodak_report(binary, shared, kodak, tmp_path_factory) -> Path:
    """report.html, metrics.parquet, summary.json of `report --input kodak --model taef2 --size 256`."""
    tmp = tmp_path_factory.mktemp("kodak-report")
    out = tmp / "report"
    proc = run_report(binary, ["--input", kodak, "--model", report_card(shared, tmp), "--size", SIZE, "--out", out])
    assert "report:" in proc.stderr and "PSNR" in proc.stderr, proc.stderr
    return out


@pytest.fixture(scope="module")
def python_reference(shared, kodak) -> dict:
    """key -> (psnr, ssim, raw latent) from Pillow + onnxruntime + numpy/scikit-image."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    enc = ort.InferenceSession(str(shared / "models" / "taef2_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(shared / "models" / "taef2_decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    ref = {}
    for path in sorted(kodak.glob("*.png")):
        x, y, z = reconstruct(path, SIZE, enc, dec)
        mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
        ref[path.name] = (10 * np.log10(1.0 / mse), skimage_ssim(x, y)[0], z)
    return ref


def metrics_table(out: Path) -> dict:
    t = pq.read_table(out / "metrics.parquet").to_pylist()
    return {(r["model"], r["key"]): r for r in t}


def test_per_image_psnr_matches_python_reference(kodak_report, python_reference):
    rows = metrics_table(kodak_report)
    assert sorted(k for _, k in rows) == sorted(python_reference), "one row per Kodak image"
    worst = 0.0
    for key, (psnr, ssim, z) in python_reference.items():
        row = rows[("taef2", key)]
        worst = max(worst, abs(row["psnr"] - psnr))
        assert abs(row["psnr"] - psnr) <= PSNR_TOL_DB, f"{key}: PSNR {row['psnr']:.4f} vs Python {psnr:.4f}"
        # SSIM and the latent statistics see the same ±1-level resize difference.
        assert abs(row["ssim"] - ssim) <= 2e-3, f"{key}: SSIM {row['ssim']:.5f} vs scikit-image {ssim:.5f}"
        assert abs(row["latent_mean"] - z.mean()) <= 2e-3, key
        assert abs(row["latent_std"] - z.std()) <= 2e-3, key
    print(f"worst per-image PSNR difference against the Python reference: {worst:.4f} dB")


def test_summary_agrees_with_metrics_and_numpy_latent_statistics(kodak_report, python_reference):
    summary = json.loads((kodak_report / "summary.json").read_text())
    assert (summary["source"], summary["size"], summary["inputs"], summary["failed"]) == ("images", SIZE, 24, 0)
    m = summary["models"]["taef2"]
    rows = [r for (model, _), r in metrics_table(kodak_report).items() if model == "taef2"]
    psnr = np.array([r["psnr"] for r in rows])
    ssim = np.array([r["ssim"] for r in rows])
    assert m["images"] == 24 and m["failed"] == 0
    # mean ± std over images (numpy's std, ddof 0), not a global MSE
    assert m["psnr_mean"] == pytest.approx(psnr.mean(), abs=1e-9)
    assert m["psnr_std"] == pytest.approx(psnr.std(), abs=1e-9)
    assert m["ssim_mean"] == pytest.approx(ssim.mean(), abs=1e-12)
    assert m["ssim_std"] == pytest.approx(ssim.std(), abs=1e-12)
    assert "lpips_mean" not in m, "no --lpips: no LPIPS numbers"

    z = np.stack([v[2] for v in python_reference.values()]).astype(np.float64)  # (24, 32, 32, 32)
    channel_mean = z.mean(axis=(0, 2, 3))
    channel_std = z.std(axis=(0, 2, 3))
    np.testing.assert_allclose(m["latent_channel_mean"], channel_mean, atol=2e-3)
    np.testing.assert_allclose(m["latent_channel_std"], channel_std, atol=2e-3)
    assert m["latent_std"] == pytest.approx(z.std(), abs=1e-3)
    assert m["latent_mean"] == pytest.approx(z.mean(), abs=1e-3)
    assert m["recommended_scaling_factor"] == pytest.approx(1 / m["latent_std"], rel=1e-12)
    assert m["recommended_shift_factor"] == m["latent_mean"]
    assert (m["card_scaling_factor"], m["card_shift_factor"]) == (1.0, 0.0)
    assert m["stored_latent_std"] == pytest.approx(m["latent_std"])
    # The card's values are judged in units of the stored latents' std: within 10% of 1 and 0.
    assert m["scaling_factor_fits"] == (abs(m["latent_std"] - 1) <= 0.1)
    assert m["shift_factor_fits"] == (abs(m["latent_mean"]) <= 0.1)
    assert ("does not fit" in m["verdict"]) == (not m["scaling_factor_fits"])
    assert ("would centre them" in m["verdict"]) == (not m["shift_factor_fits"])
    print(
        f"Kodak/TAEF2 {SIZE}: PSNR {m['psnr_mean']:.2f} ± {m['psnr_std']:.2f} dB, SSIM {m['ssim_mean']:.4f} ± "
        f"{m['ssim_std']:.4f}, latent std {m['latent_std']:.4f}, mean {m['latent_mean']:.4f}, recommended "
        f"scaling_factor {m['recommended_scaling_factor']:.4f}, shift_factor {m['recommended_shift_factor']:.4f}"
    )


class Cdp:
    """A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe` (fds 3 and 4,
    NUL-separated JSON): no extra packages and no TCP port."""

    def __init__(self, exe: Path, profile: Path, log: Path):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds():  # runs in the child: fd 3 is its input, fd 4 its output
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [
                str(exe), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            close_fds=False, preexec_fn=wire_fds,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_child], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def test_report_html_renders_in_headless_chromium(kodak_report, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium", pytrace=False)
    page = (kodak_report / "report.html").resolve()
    url = page.as_uri()
    log = tmp_path / "chromium.log"
    browser = Cdp(CHROMIUM, tmp_path / "profile", log)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1200, "height": 2400, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        nav = browser.send("Page.navigate", {"url": url}, session=session)
        assert "errorText" not in nav, nav
        browser.wait_for("Page.loadEventFired")
        state = browser.send(
            "Runtime.evaluate",
            {
                "expression": """Promise.all([...document.images].map(i => i.decode())).then(() => JSON.stringify({
                    images: document.images.length,
                    decoded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
                    sizes: [...new Set([...document.images].map(i => i.naturalWidth + 'x' + i.naturalHeight))],
                    svgs: document.querySelectorAll('svg').length,
                    summaryCells: document.querySelectorAll('table.summary td').length,
                    title: document.title,
                    text: document.body.innerText}))""",
                "awaitPromise": True,
                "returnByValue": True,
            },
            session=session,
        )
        assert "exceptionDetails" not in state, f"an image failed to decode: {state}"
        dom = json.loads(state["result"]["value"])
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    finally:
        browser.close()

    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    failed = [e["params"] for e in browser.events if e.get("method") == "Network.loadingFailed"]
    external = [u for u in requests if u != url and not u.startswith("data:")]
    assert not failed, f"failed requests: {failed}"
    assert not external, f"the page requested {external}: it must be self-contained"
    assert url in requests, f"the page itself was not loaded: {requests[:5]}"

    assert dom["title"] == "VAE reconstruction report"
    assert dom["images"] == dom["decoded"] == 12, f"worst 8 + best 4 rows, all decoded: {dom}"
    assert dom["sizes"] == [f"{3 * SIZE + 8}x{SIZE}"], dom["sizes"]
    assert dom["svgs"] == 2, "PSNR histogram + latent statistics"
    assert dom["summaryCells"] >= 16
    for word in ("PSNR", "SSIM", "scaling_factor", "worst 1", "best 1", ".png"):
        assert word in dom["text"], word

    png = base64.b64decode(shot)
    kept = REPO / "target" / "test-scratch" / "report-browser"
    kept.mkdir(parents=True, exist_ok=True)
    (kept / "screenshot.png").write_bytes(png)
    shutil.copyfile(page, kept / "report.html")
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (2400, 1200, 3), pixels.shape
    not_white = (pixels.min(axis=2) < 235).mean()
    assert pixels.std() > 30 and not_white > 0.2, (
        f"screenshot looks blank: std {pixels.std():.1f}, {not_white:.1%} non-white (see {kept / 'screenshot.png'})"
    )


def test_per_channel_card_statistics_are_of_the_stored_latents(binary, shared, kodak, tmp_path):
    """A Qwen-Image-style card (latents_mean/latents_std): the report's stored-latent statistics
    are those of what precompute stores, and its advice is per-channel, never a scaling_factor."""
    from vp_helpers import run_precompute, tensor

    inp = tmp_path / "in"
    inp.mkdir()
    for name in sorted(p.name for p in kodak.glob("*.png"))[:4]:
        shutil.copyfile(kodak / name, inp / name)
    base = report_card(shared, tmp_path).read_text()
    rng = np.random.default_rng(8)
    mean, std = rng.normal(0, 0.3, 32).round(4), rng.uniform(0.2, 0.6, 32).round(4)
    card = tmp_path / "per-channel.toml"
    card.write_text(base.replace('name = "taef2"', 'name = "per-channel"')
                    + f"latents_mean = {json.dumps(mean.tolist())}\nlatents_std = {json.dumps(std.tolist())}\n")
    shards = tmp_path / "shards"
    run_precompute(binary, ["--input", inp, "--out", shards, "--model", card, "--size", 64, "--dtype", "f32"])
    stored = np.concatenate([tensor(pq.read_table(f), "latent").astype(np.float64).ravel()
                             for f in sorted(shards.glob("*/part-*.parquet"))])
    out = tmp_path / "report"
    run_report(binary, ["--input", inp, "--model", card, "--size", 64, "--out", out])
    m = json.loads((out / "summary.json").read_text())["models"]["per-channel"]
    assert m["stored_latent_std"] == pytest.approx(stored.std(), rel=1e-3)
    assert m["stored_latent_mean"] == pytest.approx(stored.mean(), abs=1e-3)
    assert m["card_latents_mean"] == pytest.approx(mean.tolist()) and m["card_latents_std"] == pytest.approx(std.tolist())
    # The recommended per-channel values give every channel mean 0 and std 1.
    channel_mean, channel_std = np.array(m["latent_channel_mean"]), np.array(m["latent_channel_std"])
    np.testing.assert_allclose(m["recommended_latents_mean"], channel_mean, rtol=1e-9)
    np.testing.assert_allclose(m["recommended_latents_std"], channel_std, rtol=1e-9)
    assert (m["recommended_scaling_factor"], m["recommended_shift_factor"]) == (1.0, 0.0)
    assert "latents_mean/latents_std do not fit" in m["verdict"] and "scaling_factor" not in m["verdict"], m["verdict"]
