"""A headless Chromium driven through Selenium WebDriver (chromedriver), for the dashboard tests.

Reads one JSON command per line on stdin and answers one JSON line on stdout:
  {"op": "open", "url": U}                      -> {"ok": true}
  {"op": "eval", "js": "return ..."}            -> {"ok": true, "value": V}
  {"op": "wait", "js": "return ...", "timeout": S}
                                                -> {"ok": true, "value": V, "waited": seconds}
                                                   or {"ok": false, "error": "timeout ..."}
  {"op": "shot", "path": P}                     -> {"ok": true}
  {"op": "errors"}                              -> {"ok": true, "value": [console errors]}
The first line it prints is {"ready": true} (or {"ok": false, "error": ...} when Chromium
cannot start).
"""

import json
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,860", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    except Exception as e:  # noqa: BLE001 - reported to the test
        say({"ok": False, "error": f"chromium did not start: {e}"})
        return 1
    say({"ready": True})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            try:
                if op == "open":
                    driver.get(cmd["url"])
                    say({"ok": True})
                elif op == "eval":
                    say({"ok": True, "value": driver.execute_script(cmd["js"])})
                elif op == "wait":
                    start = time.monotonic()
                    try:
                        value = WebDriverWait(driver, cmd["timeout"], poll_frequency=0.05).until(
                            lambda d: d.execute_script(cmd["js"]))
                        say({"ok": True, "value": value, "waited": time.monotonic() - start})
                    except Exception as e:  # noqa: BLE001
                        say({"ok": False, "error": f"timeout after {cmd['timeout']} s: {e}"})
                elif op == "shot":
                    driver.save_screenshot(cmd["path"])
                    say({"ok": True})
                elif op == "errors":
                    logs = driver.get_log("browser")
                    say({"ok": True, "value": [l["message"] for l in logs if l.get("level") == "SEVERE"]})
                else:
                    say({"ok": False, "error": f"unknown op {op}"})
            except Exception as e:  # noqa: BLE001
                say({"ok": False, "error": str(e)})
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
