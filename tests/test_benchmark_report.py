"""``python benchmarks/report.py`` runs end to end (tiny sizes) and its FLOP model holds."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_prints_one_row_per_method_and_batch():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--device", "cpu", "--batches", "3", "5",
         "--rounds", "1", "--recipe-samples", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    # The script exits with an error when its multiply-add model disagrees with FlopCounterMode.
    assert "(= FlopCounterMode's count)" in out
    rows = [line for line in out.splitlines() if line.startswith("| 3 ") or line.startswith("| 5 ")]
    methods = {line.split("|")[2].strip().split(" (x ")[0] for line in rows}
    assert {"cpp", "torch", "autograd", "torch.func recipe", "paper's recipe"} == methods
    assert len(rows) == 2 * len(methods)
