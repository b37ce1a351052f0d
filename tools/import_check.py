"""Import every module of every installed groundlab distribution (CI's import check)."""

import importlib
import pkgutil
import sys

PACKAGES = ["shared", "clawmachine", "ivm", "vp_mllm", "omg_llava", "tldr"]


def main() -> int:
    failures, count = [], 0
    for name in PACKAGES:
        root = importlib.import_module(f"groundlab.{name}")
        modules = [root.__name__] + [m.name for m in pkgutil.walk_packages(root.__path__, root.__name__ + ".")]
        for mod in modules:
            if mod.endswith(".__main__"):  # running it is its job, not importing it
                continue
            try:
                importlib.import_module(mod)
                count += 1
            except Exception as err:  # report every failure, not just the first
                failures.append(f"{mod}: {type(err).__name__}: {err}")
    for f in failures:
        print("FAILED", f)
    print(f"imported {count} modules, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
