"""The CI workflow is valid for GitHub and keeps its end-to-end job blocking.

A workflow with a schema error is not run at all by GitHub, which looks like a green build.
`check-jsonschema` validates it offline against GitHub's workflow schema (vendored in the
package); the broken copies prove the check can fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML  # comes with check-jsonschema

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
CHECK = Path(sys.executable).parent / "check-jsonschema"


def _check(path: Path) -> subprocess.CompletedProcess:
    argv = [str(CHECK), "--builtin-schema", "vendor.github-workflows", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _workflow() -> dict:
    return YAML(typ="safe").load(WORKFLOW.read_text())


def test_workflow_matches_githubs_schema():
    result = _check(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("jobs:\n", "job:\n"),  # a misspelt top-level key
        ("    timeout-minutes: 30\n", "    timeout-minutes: 30\n    continue_on_error: true\n"),
        ("  - run: tools/bootstrap.sh\n", "  - run: tools/bootstrap.sh\n        uses: a@v1\n"),
    ],
    ids=["top-level-key", "job-key", "run-and-uses"],
)
def test_schema_check_rejects_a_broken_workflow(tmp_path, old, new):
    text = WORKFLOW.read_text()
    assert old in text, f"the workflow changed: update this case ({old!r})"
    broken = tmp_path / "ci.yml"
    broken.write_text(text.replace(old, new, 1))
    result = _check(broken)
    assert result.returncode != 0, result.stdout
    assert "Schema validation errors" in result.stdout + result.stderr


def test_end_to_end_job_blocks_and_has_node():
    job = _workflow()["jobs"]["e2e"]
    assert "continue-on-error" not in job
    assert all("continue-on-error" not in step for step in job["steps"])
    uses = [step.get("uses", "") for step in job["steps"]]
    assert any(u.startswith("actions/setup-node@") for u in uses)
    runs = " ".join(step.get("run", "") for step in job["steps"])
    assert "tools/bootstrap.sh" in runs and "tests/e2e" in runs


def test_test_jobs_run_the_readme_command():
    tests = _workflow()["jobs"]["tests"]
    assert set(tests["strategy"]["matrix"]["os"]) == {"ubuntu-latest", "macos-14"}
    assert [step["run"] for step in tests["steps"] if "run" in step] == [".ci/run"]
    readme_command = "tools/bootstrap.sh && .venv/bin/python -m pytest"
    assert readme_command in (ROOT / "README.md").read_text()
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "timed bootstrap tools/bootstrap.sh && timed tests .venv/bin/python -m pytest" in ci_run
