"""`ppomax ablate`: the paper's ablations (fig. 6, 7, 8 and 12) reproduced on hh-mini, judged by its gold reward.

Per seed, the demo's cached base stages (world, tokenizer, pre-training, SFT, RM: :func:`ppomax.demo.pipeline.
base_stages`) are built or reused, then every variant of :data:`VARIANTS` is a PPO run from them, followed by its
evaluation against SFT on held-out prompts (the demo's gold judge and RM judge) and its language-modelling loss on
held-out pretraining text (the alignment tax of fig. 12). The layout of one seed is the demo's, so `ppomax demo
--out DIR/seed-0` and `ppomax ablate --out DIR` share the base stages and the two runs ``ppo_max`` and
``ppo_vanilla``::

    DIR/seed-N/{world,tokenizer,pretrain,sft,rm}/   the demo's stages
    DIR/seed-N/ppo_vanilla/, ppo_max/                the demo's two PPO runs (variants vanilla and ppo_max)
    DIR/seed-N/ppo_<variant>/                        the other variants' PPO runs
    DIR/seed-N/eval_<variant>/                       vs_sft.json (ppomax.evaluate) and heldout_lm.json
    DIR/seed-N/probe_<variant>/                      memory.json: the estimators comparison's memory probes
    DIR/report/                                      ablate.md, summary.json, one PNG per figure

The modules: :mod:`.variants` (the variant table and which a run selects), :mod:`.stages` (one seed's variant
runs, evaluations and memory probes), :mod:`.run` (:func:`run_ablate`: every seed, in parallel or not, then the
report); the report: :mod:`.numbers` (what one run's files say), :mod:`.monitor` (the collapse monitor replayed),
:mod:`.verdicts` (the paper's claims), :mod:`.estimators` (the critic-free estimators against PPO-max),
:mod:`.figures` (the PNGs) and :mod:`.report` (``ablate.md`` and ``summary.json``).
"""

from ppomax.demo.ablate.run import run_ablate
from ppomax.demo.ablate.variants import (
    BY_NAME,
    QUICK,
    STAGE_NAMES,
    VARIANTS,
    Variant,
    comparison,
    probed,
    select,
)

__all__ = [
    "BY_NAME",
    "QUICK",
    "STAGE_NAMES",
    "VARIANTS",
    "Variant",
    "comparison",
    "probed",
    "run_ablate",
    "select",
]
