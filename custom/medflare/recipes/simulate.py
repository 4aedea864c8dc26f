"""Run a job folder through its recipe on NVFlare's ``SimEnv``: what ``medflare run`` starts.

    python -m medflare.recipes.simulate JOB_DIR --workspace-root DIR -n N [-t T] [--gpu G]
                                        [--site-data TEMPLATE]

The simulation workspace is ``DIR/<job name>`` (``SimEnv``'s layout). Exit status 0 when the
simulator completed the job, 1 when it did not or the recipe refused the environment, 2 for a
job folder that cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medflare.recipes.simulate")
    parser.add_argument("job")
    parser.add_argument("--workspace-root", required=True)
    parser.add_argument("-n", "--num-clients", type=int, required=True)
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("--gpu", default=None)
    parser.add_argument("--site-data", default=None)
    args = parser.parse_args(argv)

    from nvflare.recipe.sim_env import SimEnv

    from medflare.recipes.job_definition import JobDefinitionError
    from medflare.recipes.recipe import MedflareRecipe, RecipeEnvError

    try:
        recipe = MedflareRecipe.from_job_folder(args.job, site_data=args.site_data)
    except JobDefinitionError as e:
        print(f"medflare: {e}", file=sys.stderr)
        return 2
    env = SimEnv(
        num_clients=args.num_clients,
        num_threads=args.threads,
        gpu_config=args.gpu,
        workspace_root=args.workspace_root,
    )
    try:
        recipe.run(env)
    except (RecipeEnvError, RuntimeError) as e:
        print(f"medflare: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
