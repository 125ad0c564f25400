"""The results pages and README's headline block are current renders of the results files."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_pages_are_current():
    # A stale page fails here as in CI: python -m docs.render_results check
    r = subprocess.run([sys.executable, "-m", "docs.render_results", "check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout


def test_results_files_record_provenance():
    # Every results file a page renders says where its numbers come from: machine, commit,
    # date (a field that was never recorded is null, but the field is there).
    files = list((ROOT / "docs" / "results").glob("*.json"))
    files += list((ROOT / "benchmarks" / "results" / "full").glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        prov = data.get("provenance") or {}
        machine = data.get("machine") or prov.get("machine") or (prov if "cpu" in prov else None)
        assert isinstance(machine, dict), f"{path.name}: no machine"
        commit_keys = {"code_commit", "git_commit"}
        assert commit_keys & (set(prov) | set(data) | set(machine)), f"{path.name}: no commit"
        assert {"date", "results_commit"} & (set(prov) | set(machine)), f"{path.name}: no date"
