"""Runs a third-party pytest suite and writes each test's outcome as JSON (as run_suite.py does
for unittest suites).

Usage: run_pytest_suite.py <suite dir> <output.json> <pytest arguments...>
An outcome is "pass", "fail" (a failure or an error, in setup, call or teardown), or "skip".
"""
import json
import os
import sys

import pytest


class Recorder:
    def __init__(self):
        self.outcomes = {}

    def pytest_runtest_logreport(self, report):
        key = report.nodeid
        if report.failed:
            self.outcomes[key] = "fail"
        elif report.skipped and self.outcomes.get(key) != "fail":
            self.outcomes[key] = "skip"
        elif report.when == "call" and report.passed and key not in self.outcomes:
            self.outcomes[key] = "pass"


def main():
    suite_dir, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.chdir(suite_dir)
    recorder = Recorder()
    pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=line", *args],
                plugins=[recorder])
    with open(out, "w") as f:
        json.dump(recorder.outcomes, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
