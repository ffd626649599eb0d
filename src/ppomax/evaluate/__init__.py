"""Policy-against-baseline evaluation: `ppomax eval` and the demo's judge (paper 6.1-6.2, fig. 10).

Both policies answer the same held-out prompts once each (nucleus sampling with the paper's 6.1 settings:
top-p 0.9, temperature 0.8, repetition penalty 1.1, or greedy). Then, per judge:

* **win / tie / lose** of the policy against the baseline, overall and per subset (``helpful`` / ``harmless``,
  from each prompt's ``subset`` field): the policy wins a prompt when its score exceeds the baseline's by more
  than ``tie_margin``, loses when it is lower by more than ``tie_margin``, else it is a tie;
* the **mean reward** of each side.

A judge is a value-head reward model (kind ``reward-model``: the score of a response is the scalar at its last
token, the EOS of a finished response, as in training, paper eq. 2) or any text scorer ``f(prompts, responses)
-> scores`` under a kind of its own (``ppomax eval --judge gold`` passes the hh-mini world's gold reward, which
lives in :mod:`ppomax.demo`: this module never imports the demo).

Judge-free statistics of each side (paper 5.2's monitoring metrics, measured on the evaluation responses):

* **KL to the baseline**: at every token position of the policy's own responses, the exact
  ``KL(pi_policy(.|s_t) || pi_baseline(.|s_t))`` over the vocabulary (no estimator noise, always >= 0), averaged
  over tokens (``kl_per_token``) and summed per response then averaged (``kl_per_sequence``). The sampled
  log-ratio ``log pi_policy(a_t|s_t) - log pi_baseline(a_t|s_t)`` (the k1 estimator the PPO penalty uses,
  paper eq. 19) is reported beside it as ``kl_k1_per_token``. Both use raw (temperature 1) logits: the
  models' own distributions, whatever the sampling settings.
* **perplexity** of a model on its own responses, ``exp(-mean log pi(a_t|s_t))`` pooled over tokens (the
  paper's 5.2 perplexity; collapsed policies show a low one).
* **length**: response tokens (EOS not counted) and words; the share of responses cut at ``max_new_tokens``.

The modules: :mod:`.generation` (both sides' answers), :mod:`.scoring` (token statistics and reward-model scores
under a model), :mod:`.judging` (win / tie / lose), :mod:`.compare` (:func:`evaluate_models`, the two sides on
the same prompts) and :mod:`.command` (:func:`evaluate`, `ppomax eval` from paths). Import the names from here.
"""

from ppomax.evaluate.command import (
    eval_chat_format,
    evaluate,
    format_table,
    load_eval_prompts,
    run_data_config,
    write_json,
)
from ppomax.evaluate.compare import DEFAULT_MAX_PROMPT_TOKENS, EvalSettings, evaluate_models
from ppomax.evaluate.generation import Generation, generate, prompt_texts
from ppomax.evaluate.judging import SUBSETS, win_tie_lose
from ppomax.evaluate.scoring import TokenStats, reward_model_scores, token_logits_stats

__all__ = [
    "DEFAULT_MAX_PROMPT_TOKENS",
    "SUBSETS",
    "EvalSettings",
    "Generation",
    "TokenStats",
    "eval_chat_format",
    "evaluate",
    "evaluate_models",
    "format_table",
    "generate",
    "load_eval_prompts",
    "prompt_texts",
    "reward_model_scores",
    "run_data_config",
    "token_logits_stats",
    "win_tie_lose",
    "write_json",
]
