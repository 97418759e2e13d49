"""Running `litllm` as a user does (a separate process) and reading what a training run logged."""
import csv
import subprocess
import sys


def litllm(*args, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litllm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def logged(out_dir, key="loss") -> dict[int, float]:
    """{step: value} from every CSV log version under out_dir (a resumed run writes a new version)."""
    values = {}
    for path in sorted((out_dir / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get(key):
                values[int(row["step"])] = float(row[key])
    return values
