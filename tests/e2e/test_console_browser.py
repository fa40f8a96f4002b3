"""The console in a real browser: Debian's headless Chromium (driven by Selenium through Debian's chromedriver,
never a downloaded browser) against `tollway serve --workers 2`. It signs in, opens each page, checks the
numbers on screen against the API's, downloads the CSV, and saves screenshots under build/test-output/.
The same server's metrics port shows one scrape covering both workers."""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.config import write_config

from tollway.local.embedded import free_port

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
OUTPUT = Path(__file__).resolve().parents[2] / "build" / "test-output"
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="Debian's chromium and chromium-driver (make test installs them)")


@pytest.fixture(scope="module")
def served(serve_module: Any, sim: Any, pg: Any, redis_url: str, tmp_path_factory: Any) -> Any:
    # one model nobody priced: a USD budget cannot see its answers, and the Budgets page says so
    config = write_config(tmp_path_factory.mktemp("console") / "tollway.yaml", sim.url,
                          extra_models=[{"name": "sim-unpriced", "upstream": "sim"}])
    metrics_port = free_port()
    proc = serve_module("--config", str(config), "--workers", "2", env={
        "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "false",
        "TOLLWAY_METRICS_PORT": str(metrics_port)})
    proc.metrics_port = metrics_port
    return proc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    OUTPUT.mkdir(parents=True, exist_ok=True)
    downloads = OUTPUT / "downloads"
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def sign_in(driver: Any, base: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/console/login")
    driver.find_element(By.ID, "key").send_keys(key)
    submit(driver, "form[action='/console/login'] button")


def submit(driver: Any, selector: str) -> None:
    """Click and wait for the next page (the old one goes stale)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, selector).click()

    def gone(_: Any) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:  # chromium, when the check lands mid-navigation
            if "does not belong to the document" in str(exc):
                return True
            raise
        return False

    WebDriverWait(driver, 10).until(gone)


def rows(driver: Any, table_id: str) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    out = []
    for row in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr"):
        cells = [c.text for c in row.find_elements(By.CSS_SELECTOR, "th, td")]
        if len(cells) > 1:  # (a table's "nothing here" row is one cell)
            out.append(cells)
    return out


def table(driver: Any, table_id: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in rows(driver, table_id)}


GREET = """\
model: sim-small
messages:
  - {role: system, content: "You greet {{ customer }} politely."}
variables:
  customer: {type: string}
"""


def money(value: str) -> str:
    return f"${Decimal(value):,.6f}"


def fits(driver: Any) -> bool:
    return bool(driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1"))


def test_finance_and_admin_use_the_console_in_a_browser(served, browser, make_tenant, admin):
    from selenium.webdriver.common.by import By

    base = served.url.removesuffix("/v1")
    app = make_tenant()
    finance = make_tenant(role="finance")
    with httpx.Client(base_url=base, timeout=30) as client:
        # finance keys read their tenant's costs; the traffic comes from a key of another tenant here, so
        # the finance key's tenant gets its spend from an app key of its own
        finance_app = client.post("/v1/admin/keys", headers=admin.headers,
                                  json={"tenant": finance.name, "role": "app"}).json()["key"]
        for i, model in enumerate(["sim-large", "sim-small", "sim-small", "auto", "sim-large"]):
            resp = client.post("/v1/chat/completions", headers={"authorization": f"Bearer {finance_app}",
                                                                "x-tollway-user": f"user{i % 2}",
                                                                "x-tollway-tags": "console"},
                               json={"model": model, "max_tokens": 5 + i,
                                     "messages": [{"role": "user", "content": f"browser line {i}"}]})
            assert resp.status_code == 200, resp.text
        # and one through a versioned prompt: its 40-character version id is a row of the by-prompt table
        pushed = client.post("/v1/prompts/greet/versions", headers=admin.headers, json={
            "tenant": finance.name, "message": "greet", "content": GREET})
        assert pushed.status_code == 201, pushed.text
        version = pushed.json()["version"]
        resp = client.post("/v1/chat/completions", headers={"authorization": f"Bearer {finance_app}"}, json={
            "model": "prompt", "messages": [{"role": "user", "content": "hi"}],
            "prompt": {"name": "greet", "version": version, "variables": {"customer": "Ada"}}})
        assert resp.status_code == 200, resp.text
        put = client.put("/v1/admin/budgets", headers=admin.headers, json={
            "tenant": finance.name, "window": "month", "limit_usd": "0.01", "alerts": ["0.5", "forecast"]})
        assert put.status_code == 200, put.text
        [warning] = put.json()["warnings"]
        assert warning["code"] == "unpriced_models" and "sim-unpriced" in warning["models"]
        today = datetime.now(UTC).date()
        period = {"from": today.replace(day=1).isoformat(), "to": today.isoformat()}
        deadline = time.monotonic() + 10
        while True:  # the ledger writes in the background
            api = {g: client.get("/v1/reports/costs", headers=finance.headers, params={**period, "group_by": g}).json()
                   for g in ("model", "route")}
            if api["model"]["totals"]["requests"] == 6 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert api["model"]["totals"]["requests"] == 6

    # an app key is refused at sign-in
    sign_in(browser, base, app.key)
    assert "finance and admin keys" in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text

    sign_in(browser, base, finance.key)
    assert browser.current_url.endswith("/console/costs")
    assert browser.find_element(By.ID, "total-spend").text == money(api["model"]["totals"]["spend_usd"])
    assert browser.find_element(By.ID, "total-requests").text == "6"
    assert browser.find_element(By.ID, "total-routing-saved").text == money(api["model"]["totals"]["routing_saved_usd"])
    by_model = table(browser, "table-model")
    assert {k: v[0] for k, v in by_model.items()} == {g["group"]: money(g["spend_usd"]) for g in api["model"]["groups"]}
    by_route = table(browser, "table-route")
    assert {k: v[0] for k, v in by_route.items()} == {g["group"]: money(g["spend_usd"]) for g in api["route"]["groups"]}
    by_prompt = table(browser, "table-prompt")
    assert f"greet@{version}" in by_prompt and len(version) == 40
    assert fits(browser)  # at 1280 px, with the 40-character version id in its table
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart rect")
    browser.save_screenshot(str(OUTPUT / "console-costs.png"))

    browser.find_element(By.ID, "download-csv").click()
    deadline = time.monotonic() + 10
    while not list(browser.downloads.glob("*.csv")) and time.monotonic() < deadline:
        time.sleep(0.1)
    [downloaded] = list(browser.downloads.glob("*.csv"))
    lines = list(csv.DictReader(downloaded.open()))
    model_rows = {r["group"]: r["spend_usd"] for r in lines if r["group_by"] == "model"}
    assert Decimal(model_rows.pop("TOTAL")) == Decimal(api["model"]["totals"]["spend_usd"])
    assert {g: money(v) for g, v in model_rows.items()} == {k: v[0] for k, v in by_model.items()}

    browser.get(f"{base}/console/budgets")
    budgets = table(browser, "table-budgets")
    assert len(budgets) == 1
    assert fits(browser)  # at 1280 px: no horizontal overflow
    [(_, cells)] = budgets.items()
    assert cells[0] == datetime.now(UTC).strftime("month %Y-%m")  # the window as a person reads it
    assert "50%, forecast" in next(iter(budgets.values()))[-1]
    assert browser.find_elements(By.CSS_SELECTOR, "figure svg.chart polyline")
    notice = browser.find_element(By.ID, "unpriced")  # the API's warning, on screen beside the USD limit
    assert notice.is_displayed() and "sim-unpriced" in notice.text and "$0" in notice.text
    browser.save_screenshot(str(OUTPUT / "console-budgets.png"))
    browser.get(f"{base}/console/costs?tenant={app.name}")
    assert "own tenant" in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text

    browser.set_window_size(390, 844)  # a phone
    for page in ("costs", "budgets"):
        browser.get(f"{base}/console/{page}")
        assert fits(browser), page
    browser.save_screenshot(str(OUTPUT / "console-costs-phone.png"))
    browser.set_window_size(1280, 1000)
    submit(browser, "form[action='/console/logout'] button")
    assert browser.current_url.endswith("/console/login")

    sign_in(browser, base, admin.key)
    for page, table_id in (("operations", "table-replicas"), ("audit", "table-audit"), ("keys", "table-keys")):
        browser.get(f"{base}/console/{page}")
        assert table(browser, table_id), page
        assert fits(browser), page
        browser.save_screenshot(str(OUTPUT / f"console-{page}.png"))
    browser.get(f"{base}/console/operations")
    replicas = table(browser, "table-replicas")
    assert "sim" in replicas
    assert replicas["sim"][0] in ("closed", "half-open", "open")
    browser.get(f"{base}/console/audit?tenant={finance.name}")
    changes = rows(browser, "table-audit")
    assert any(row[3].startswith("budget ") and row[3].endswith(": set") and '"limit_usd": "0.0100000000"' in row[5]
               for row in changes), changes
    # a progressive rollout set through the admin API shows on the quality page at the next load
    with httpx.Client(base_url=base, timeout=30) as client:
        put = client.put("/v1/admin/rollouts/sim-large", headers=admin.headers,
                         json={"candidate": "sim-small", "steps": [5, 50, 100], "min_samples": 50})
        assert put.status_code == 200, put.text
        try:
            browser.get(f"{base}/console/quality")
            shown = table(browser, "table-rollouts")
            assert fits(browser)
            browser.save_screenshot(str(OUTPUT / "console-quality.png"))
        finally:
            client.delete("/v1/admin/rollouts/sim-large", headers=admin.headers)
    assert shown["sim-large"][:5] == ["sim-small", "5%", "0%", "5 → 50 → 100 (min 50)", "active"], shown


def test_one_scrape_of_the_metrics_port_covers_every_worker(served, make_tenant):
    tenant = make_tenant()
    base = served.url.removesuffix("/v1")
    sent = 24
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(sent):  # new connections: the kernel spreads them over both workers
            with httpx.Client(base_url=base, timeout=30) as fresh:
                assert fresh.post("/v1/chat/completions", headers=tenant.headers, json={
                    "model": "sim-small", "messages": [{"role": "user", "content": f"m{i}"}]}).status_code == 200
        text = client.get(f"http://127.0.0.1:{served.metrics_port}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counted = sum(s.value for s in families["tollway_requests"].samples
                  if s.name == "tollway_requests_total" and s.labels.get("tenant") == tenant.name)
    assert counted == sent
    # both workers write their values into the shared folder the scrape sums (files are named by pid)
    files = list((Path(served.env["TOLLWAY_DATA_DIR"]) / "prometheus").glob("*.db"))
    assert len({f.stem.rsplit("_", 1)[-1] for f in files}) >= 2, files
