"""``python -m scripts.manifests`` (installed as ``wan-validate-manifests``): validate manifests,
print each problem, exit 1 when there is one, 2 when the CRDs cannot be found."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.manifests import DEFAULT_PATHS, find_crd_dir, load_crds, load_manifests, missing_crds_help, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.manifests",
                                     description="Validate Kubernetes manifests against the upstream CRDs and "
                                                 "the cross-checks of this repository, offline.")
    parser.add_argument("paths", nargs="*", default=[str(p) for p in DEFAULT_PATHS],
                        help="manifest files or folders (default: kserve/, karmada/ and jobs/deploy/)")
    parser.add_argument("--crds", type=Path, metavar="DIR",
                        help="folder of the upstream CRD YAMLs (default: $WAN_CRD_DIR, else ../shared/crds)")
    args = parser.parse_args(argv)
    crd_dir = find_crd_dir(args.crds)
    if crd_dir is None or not crd_dir.is_dir():
        print(missing_crds_help(crd_dir), file=sys.stderr)
        return 2
    problems = validate(args.paths, load_crds(crd_dir))
    for problem in problems:
        print(problem)
    count = len(load_manifests(args.paths)[0])
    print(f"{count} manifests, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
