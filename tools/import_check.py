"""Import every module of every installed groundlab distribution (CI's import check)."""

import importlib
import pkgutil
import sys


def installed() -> list[str]:
    """Every installed groundlab distribution's top-level package: ``groundlab`` is a namespace package
    that each distribution adds one folder to, so a new package is found without a list to edit."""
    import groundlab

    return sorted(m.name for m in pkgutil.iter_modules(groundlab.__path__) if m.ispkg)


def main() -> int:
    failures, count = [], 0
    names = installed()
    print("packages:", ", ".join(names))
    for name in names:
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
