"""``featlift compare``: every (method, task) cell of a leaderboard, cached and resumable, ranked on quality and cost.

- `tasks`: the table of task names (``davis``, ``probe-voc``, ``probe-camvid``, ``warp``), where each
  dataset lies under the data root, and the settings a comparison may change;
- `methods`: method specs, checkpoint fingerprints, and training the methods that have no checkpoint;
- `cells`: a cell's key (a hash of everything that determines its result) and the on-disk cache of cells;
- `leaderboard`: ``leaderboard.md`` and ``results.json``; `pareto`: the Pareto front and the plot;
- `run`: `run_compare`, which ties them together.
"""

from .run import CompareOptions, CompareOutcome, run_compare

__all__ = ["CompareOptions", "CompareOutcome", "run_compare"]
