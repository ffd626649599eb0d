"""Settings of `ppomax demo`: the full profile and the `--quick` one.

The paper's numbers are for 7B models trained for days; a ~1M-parameter Llama on the hh-mini world needs
learning rates two to three orders of magnitude larger and a few thousand PPO samples per run instead of
millions. Every number below is ours (chosen for this world and this model size, on 2 CPU cores) unless its
comment names the paper. The PPO runs start from the shipped `vanilla` and `ppo_max` presets; both get the same
sizes, lengths and learning rates, so they differ by the paper's tricks, with one documented exception:

==========================  =============  ==========  ==========================================================
setting                     paper / preset  demo        why
==========================  =============  ==========  ==========================================================
policy_lr / critic_lr       5e-7 / 1.5e-6  1e-4/2e-4   a ~1M model; 80 iterations must show vanilla's drift
ppo_epochs, buffer          1, 128         2, 64       few samples per run on 2 CPU cores
max_new_tokens              128            40          hh-mini answers are 5-30 tokens
ppo_max kl.coef             0.05 (fig. 7)  0.5         measured on seed 0: at this learning rate 0.05 and 0.2 let
                                                        PPO-max drift into the RM's length bias (0.2: length
                                                        9.6 -> 17 tokens, gold 0.62 -> 0.43, loses to SFT
                                                        54/139); 0.3 wins 100/47, 0.5 wins 77/19 with KL
                                                        0.04/token. The penalty must scale with how fast the
                                                        policy moves; the paper's 0.05 is tuned for lr 5e-7.
world.sft_noise             (world: 0.15)  0.3         SFT with flaws an RM can see (harmful compliance, refusing
                                                        harmless requests), as real SFT models have
==========================  =============  ==========  ==========================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class DemoProfile:
    name: str
    # hh-mini world (WorldConfig fields; the rest keep their defaults)
    world: dict[str, Any] = field(default_factory=dict)
    # tokenizer and model
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 160
    # pre-training on the world's pretrain.jsonl (plain text, loss on every token)
    pretrain_epochs: float = 3.0
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    # SFT
    sft_epochs: float = 2.0
    sft_lr: float = 1e-3
    sft_batch: int = 32
    # reward model (paper eq. 2 with the LM term, beta_rm = 1 as in paper 4.2)
    rm_epochs: float = 2.0
    rm_lr: float = 5e-4
    rm_batch: int = 32
    # PPO (both runs)
    ppo_iterations: int = 80
    rollout_batch: int = 32
    buffer_size: int = 64
    minibatch_size: int = 32
    ppo_epochs: int = 2
    policy_lr: float = 1e-4
    critic_lr: float = 2e-4
    max_new_tokens: int = 40
    max_prompt_tokens: int = 48
    # per preset, `--set` overrides as `ppomax train-ppo --set` takes them (ppomax.config.apply_overrides)
    ppo_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # evaluation on held-out prompts
    eval_prompts: int = 400
    eval_max_new_tokens: int = 40
    tie_margin: float = 0.1
    n_samples: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = DemoProfile(
    name="full",
    world=dict(sft_noise=0.3),
    ppo_overrides={"ppo_max": ("ppo.kl.coef=0.5",)},
)

QUICK = replace(
    FULL,
    name="quick",
    world=dict(
        FULL.world,
        n_pretrain=8000,
        n_sft_train=1500,
        n_sft_valid=200,
        n_prefs_train=2000,
        n_prefs_valid=200,
        n_prefs_test=200,
        n_prompts_train=500,
        n_prompts_valid=50,
        n_prompts_test=100,
    ),
    vocab_size=768,
    hidden_size=96,
    intermediate_size=256,
    num_layers=3,
    pretrain_epochs=2.0,
    sft_epochs=2.0,
    rm_epochs=1.0,
    ppo_iterations=20,
    eval_prompts=100,
    n_samples=3,
)

PROFILES = {"full": FULL, "quick": QUICK}
