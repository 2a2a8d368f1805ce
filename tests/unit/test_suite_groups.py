"""The suite's own scheduling: under ``pytest -n 2 --dist loadgroup`` (README's test command) the
tests of one ``xdist_group`` run on one worker. The full-size tests rely on it (two 10 GB models
would not fit in memory together), and every module is a group (tests/conftest.py). A pytest that
pytest-xdist cannot group under (pytest 9.2 with xdist 3.8) spreads them silently: this fails."""

import os
import subprocess
import sys

import pytest

TESTS = '''
import os
import pytest

def record(name):
    with open(os.environ["WORKERS_FILE"], "a") as f:
        f.write(f"{name} {os.environ['PYTEST_XDIST_WORKER']}\\n")

@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
    record(f"grouped{i}")

@pytest.mark.parametrize("i", range(4))
def test_free(i):
    record(f"free{i}")
'''


def test_a_group_runs_on_one_worker(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "test_groups.py").write_text(TESTS)
    workers = tmp_path / "workers.txt"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                           "loadgroup", str(tmp_path / "test_groups.py")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "WORKERS_FILE": str(workers)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = dict(line.split() for line in workers.read_text().splitlines())
    assert len(ran) == 8
    assert len({ran[f"grouped{i}"] for i in range(4)}) == 1, ran
