"""`ppomax demo`: the whole RLHF pipeline on hh-mini, a generated world whose true preference is known.

The demo is a user of the library, never a part of it: it calls the trainers, the evaluation and the loaders
a user calls, and no library module imports it (tests/test_layout.py checks, with the demo's import graph:
no cycle).

* :mod:`.pipeline`: the stages in order, cached by fingerprint (``run_demo``, the summary table);
* :mod:`.stages`: each stage (world, tokenizer, pre-training, SFT, RM, both PPO runs, evaluation, report);
* :mod:`.profiles`: the full and ``--quick`` settings, with why each number differs from the paper's;
* :mod:`.report`: the plots, ``report.md`` and the outcome checks (does PPO-max beat SFT, does vanilla
  over-optimise);
* :mod:`.tokenizer`: the byte-level BPE tokenizer trained from scratch (the tests and benchmarks build
  their tiny tokenizers with it too);
* :mod:`.world`: the hh-mini world, its corpora and its gold reward (:mod:`.world.reward` is the gold reward
  as a PPO reward function and as the ``ppomax eval --judge gold`` judge).
"""
