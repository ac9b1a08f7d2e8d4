#!/usr/bin/env python3
"""A small Django project whose test run (`manage.py test`) tests/suites.rs runs directly and
through pgnear: Django creates its test database, migrates it, runs notes/tests.py, and drops
the test database at the end. The connection comes from PGHOST, PGPORT, PGUSER, PGPASSWORD."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
