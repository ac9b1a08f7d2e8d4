"""Runs a third-party driver's own unittest suite and writes each test's outcome as JSON.

Usage: run_suite.py <suite dir (holding tests/)> <output.json>
The connection comes from the environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).
An outcome is "pass", "fail" (a failure or error, in any subtest), or "skip".
"""
import json
import os
import sys
import unittest


class Recorder(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes = {}

    def _set(self, test, outcome):
        key = test.id()
        if self.outcomes.get(key) != "fail":
            self.outcomes[key] = outcome

    def addSuccess(self, test):
        super().addSuccess(test)
        self._set(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set(test, "fail")

    def addError(self, test, err):
        super().addError(test, err)
        # setUpClass errors and the like have no test of their own.
        self._set(test, "fail")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._set(test, "skip")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._set(test, "pass")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.outcomes[test.id()] = "fail"


def main():
    suite_dir, out = sys.argv[1], sys.argv[2]
    os.chdir(suite_dir)
    sys.path.insert(0, suite_dir)
    tests = unittest.TestLoader().discover("tests", top_level_dir=suite_dir)
    runner = unittest.TextTestRunner(resultclass=Recorder, verbosity=1, stream=sys.stderr)
    result = runner.run(tests)
    with open(out, "w") as f:
        json.dump(result.outcomes, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
