"""Typed config of the RLHF stage (`python -m stages.rlhf --config FILE`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from glm.config import ConfigError
from stages.engine.config import EngineConfig
from stages.sft.config import SFTSource
from stages.tracking import TrackingConfig

MODES = ("reward", "ppo", "grpo", "rloo", "dpo")
POLICY_GRADIENT = ("ppo", "grpo", "rloo")
"""Modes that train the policy on its own sampled rollouts (prompt rows, iteration_fn)."""
FORMATS = ("auto", "prompt", "conversation", "instruction")
FAMILIES = ("language", "repetition", "truncated")


@dataclass
class PreferenceSource:
    """One file set of preference pairs (JSONL, local path, glob or URI)."""

    uri: str
    format: Literal["auto", "prompt", "conversation", "instruction"] = "auto"
    """Row shape (`shared/data/preference/`): `prompt` (text prompt, an hh-rlhf
    "Human: ... Assistant:" transcript is split into rounds), `conversation` (role/content
    turns ending with the user), `instruction` (instruction, input, history [[q, a], ...]);
    each with `chosen` and `rejected` (a string or a {role, content} turn). `auto`: per row."""
    name: str = ""
    """Name in the manifest and MLflow (default: the file stem of the uri)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"PreferenceSource.format must be one of {FORMATS}, got {self.format!r}")
        if not self.name:
            self.name = self.uri.rstrip("/").rsplit("/", 1)[-1].split(".")[0].replace("*", "x")


@dataclass
class SyntheticPairsConfig:
    """Preference pairs made from SFT chats (`stages/rlhf/families.py`): the chosen side is a
    chat's last reply, the rejected side that reply spoiled in one of the families' ways. Their
    signal is one a small model can learn; each pair carries its family as its tag."""

    sources: list[SFTSource] = field(default_factory=list)
    """SFT chat files (any shape `stages.sft.formatting.parse_row` reads: alpaca, ShareGPT,
    OpenAI messages); chats with tool calls are skipped. Empty: no synthetic pairs."""
    families: dict[str, float] = field(default_factory=lambda: {f: 1.0 for f in FAMILIES})
    """Family -> weight; each pair's family is drawn with probability weight / sum (0 or not
    listed = never):
    `language` (rejected: the last reply of a chat in the other language, zh <-> en),
    `repetition` (rejected: the reply's start, then one of its phrases looped until it is as
    long as the reply), `truncated` (rejected: the reply's first `truncated_chars` characters
    or fewer). A chat a family cannot spoil (too short, no reply in the other language) yields
    no pair of it (counted as `skipped`)."""
    pairs_per_chat: int = 1
    """Pairs drawn from each chat (each its own family draw)."""
    truncated_chars: int = 8
    """`truncated`: the rejected reply keeps between 2 and this many characters; chats whose
    reply is shorter than 4x this have no truncated pair, and a chosen reply cut to fit
    max_len keeps at least 4x this many (a cut at a sentence end, `data.fit_reply`)."""
    min_repeats: int = 4
    """`repetition`: the looped phrase appears at least this many times in a row."""

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown or any(w < 0 for w in self.families.values()):
            raise ConfigError(f"SyntheticPairsConfig.families: weights >= 0 of {FAMILIES}, got {self.families}")
        if self.sources and not any(w > 0 for w in self.families.values()):
            raise ConfigError("SyntheticPairsConfig: sources are set but every family weight is 0")
        if self.pairs_per_chat < 1 or self.truncated_chars < 2 or self.min_repeats < 2:
            raise ConfigError(f"SyntheticPairsConfig: pairs_per_chat must be >= 1, truncated_chars >= 2 and "
                              f"min_repeats >= 2, got {self.pairs_per_chat}, {self.truncated_chars}, {self.min_repeats}")


@dataclass
class PreferenceDataConfig:
    """How preference pairs become rows: pair rows (reward, dpo) or prompt rows (ppo)."""

    sources: list[PreferenceSource] = field(default_factory=list)
    """Files of real preference pairs; a pair's family tag is its source's name."""
    synthetic: SyntheticPairsConfig = field(default_factory=SyntheticPairsConfig)
    """Pairs made from SFT chats, tagged by family (reward and dpo; ppo takes their prompts)."""
    max_len: int = 256
    """Longest prompt + response of one side; a pair row holds both sides (2 x max_len).
    Prompts are cut from the left; a response longer than what is left (at least 3/4 of it) is
    cut at its last sentence end that fits (counted as truncated)."""
    max_prompt_len: int = 128
    """PPO: longest prompt (cut from the left), [gMASK] included."""
    validation_fraction: float = 0.1
    """Share of pairs held out (by content hash; synthetic pairs by their chat's): accuracy /
    validation reward. The reward stage reports held-out accuracy per family at export."""
    max_samples: int = 0
    """Use at most this many pairs per source, chats per synthetic source (0 = all)."""
    output: str = ""
    """Where the prepared rows go (default: `<stage output>_data`)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_len < 16 or self.max_prompt_len < 4:
            raise ConfigError(f"PreferenceDataConfig: max_len must be >= 16 and max_prompt_len >= 4, "
                              f"got {self.max_len}, {self.max_prompt_len}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"PreferenceDataConfig.validation_fraction must be in [0, 1), got {self.validation_fraction}")


@dataclass
class RuleRewardConfig:
    """A rule-based reward instead of a reward model (checks and experiments): the share of
    response tokens that are in a target set."""

    token_ids: list[int] = field(default_factory=list)
    """Rewarded token ids."""
    text: str = ""
    """Or: rewarded tokens are those of this text (tokenized with the base's tokenizer)."""

    @property
    def enabled(self) -> bool:
        return bool(self.token_ids or self.text)


@dataclass
class RewardsConfig:
    """The sequence reward of a rollout: a weighted sum of the model reward (the reward model, or
    `rule_reward`'s token share) and verifiable rule rewards, each in [0, 1]."""

    model: float = 1.0
    """Weight of the reward model's score (or of rule_reward's token share); 0 = no reward model."""
    language: float = 0.0
    """Weight of: the reply is in the prompt's language (`stages.effects.language`: zh where three
    times the CJK characters reach the Latin letters, a character weighing a word; else en)."""
    length: float = 0.0
    """Weight of: the reply's token count is within [min_tokens, max_tokens]."""
    repetition: float = 0.0
    """Weight of: the share of distinct token n-grams (`ngram`) in the reply (1 = no n-gram twice)."""
    format: float = 0.0
    """Weight of: the reply ended by itself (a stop token), not cut at max_new_tokens."""
    min_tokens: int = 1
    max_tokens: int = 64
    ngram: int = 4

    def __post_init__(self) -> None:
        weights = [self.model, self.language, self.length, self.repetition, self.format]
        if any(w < 0 for w in weights) or not any(weights):
            raise ConfigError(f"RewardsConfig: weights must be >= 0 and one of them > 0, got {weights}")
        if not 0 <= self.min_tokens <= self.max_tokens or self.ngram < 1:
            raise ConfigError("RewardsConfig: need 0 <= min_tokens <= max_tokens and ngram >= 1")

    @property
    def rules(self) -> dict[str, float]:
        """The rule rewards in use: name -> weight."""
        named = {"language": self.language, "length": self.length, "repetition": self.repetition,
                 "format": self.format}
        return {k: w for k, w in named.items() if w > 0}


@dataclass
class PPOConfig:
    """Policy-gradient training on the policy's own rollouts (modes ppo, grpo, rloo): per engine
    step, each worker samples responses to the prompts of its batch (one per prompt for ppo,
    samples_per_prompt for grpo / rloo), scores them, and runs ppo_epochs x minibatches
    optimizer steps on the clipped surrogate. The engine's train_steps and warmup_steps count
    these engine steps; the LR schedule runs over the optimizer steps within them."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    """Rollouts sample softmax(logits / temperature); every log-prob (behaviour, current policy,
    reference) and the entropy are computed at this temperature, so the ratios and the KL are
    those of the distribution actually sampled."""
    top_k: int = 0
    """Must stay 0: rollouts sample the full (tempered) distribution, the one that is scored."""
    top_p: float = 1.0
    """Must stay 1.0 (as top_k)."""
    truncated: Literal["bootstrap", "score"] = "bootstrap"
    """ppo, a response cut at max_new_tokens (it has not ended): `bootstrap` gives it no sequence
    score and bootstraps its return from the critic's value at the cut; `score` scores it as if
    it had ended (rewards that judge any prefix, e.g. rule_reward's token share). grpo / rloo
    always score it (the `format` rule reward tells a cut reply apart)."""
    samples_per_prompt: int = 4
    """grpo / rloo: k responses per prompt, a group on one worker (its baseline); ppo: 1 always."""
    ppo_epochs: int = 1
    """Passes over the rollout buffer per iteration."""
    minibatches: int = 1
    """Optimizer steps per pass (the buffer is split into this many minibatches)."""
    kl_coef: float = 0.05
    """KL to the reference: ppo, a per-token penalty in the reward (initial value if adaptive);
    grpo, the weight of the k3 estimator in the loss; rloo, a penalty on the summed sequence KL
    in the sequence reward."""
    adaptive_kl: bool = False
    """ppo: adapt kl_coef toward kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    value_clip: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.5
    """Weight of the value loss (actor and critic take one backward and one optimizer step; their
    gradients are clipped separately, each to engine.optim.grad_clip)."""
    critic_lr_scale: float = 1.0
    """Critic learning rate = engine.optim.lr x this (DeepSpeed-Chat trains it at about half the actor's)."""
    entropy_coef: float = 0.0
    normalize_reward: bool = True
    """ppo: scores minus the running mean, over the running std (moments checkpointed). grpo / rloo
    never do: their baselines come from the group."""
    reward_clip: float = 5.0
    """Clip normalised scores to +-this (0 = off)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of a language-modelling loss on `ptx_data` in every optimizer step."""
    ptx_data: str = ""
    """A data-stage (or SFT prepared) output whose train rows feed PPO-ptx."""
    validation_samples: int = 4
    """Validation: seeded samples per held-out prompt (same seeds at every validation), beside
    the greedy answer."""

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1 or self.minibatches < 1 or self.max_new_tokens < 1:
            raise ConfigError("PPOConfig: ppo_epochs, minibatches and max_new_tokens must be >= 1")
        if self.critic_lr_scale <= 0:
            raise ConfigError(f"PPOConfig.critic_lr_scale must be > 0, got {self.critic_lr_scale}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("PPOConfig: ptx_coef > 0 needs ptx_data (a data-stage output)")
        if not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ConfigError(f"PPOConfig: gamma must be in (0, 1] and lam in [0, 1], got {self.gamma}, {self.lam}")
        if self.temperature <= 0:
            raise ConfigError(f"PPOConfig.temperature must be > 0, got {self.temperature}")
        if self.top_k != 0 or self.top_p != 1.0:
            raise ConfigError("PPOConfig: top_k must be 0 and top_p 1.0 (rollouts sample the full distribution at "
                              "`temperature`, which is the one their log-probs are scored under)")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"PPOConfig.samples_per_prompt must be >= 2 (a group baseline), got "
                              f"{self.samples_per_prompt}")
        if self.truncated not in ("bootstrap", "score"):
            raise ConfigError(f"PPOConfig.truncated must be 'bootstrap' or 'score', got {self.truncated!r}")
        if self.validation_samples < 0:
            raise ConfigError("PPOConfig.validation_samples must be >= 0")


@dataclass
class DPOConfig:
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / pi_ref)."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed share of flipped preference labels."""


@dataclass
class RLHFConfig:
    """Reward modelling, PPO or DPO from an SFT inference checkpoint, on the training engine."""

    output: str
    """Where the exported checkpoint goes: the reward model (mode reward) or the policy."""
    mode: Literal["reward", "ppo", "grpo", "rloo", "dpo"] = "reward"
    base: str = ""
    """The SFT stage's inference checkpoint (or another, e.g. ChatGLM-6B weights imported with
    `python -m glm.chatglm_hf import`): the reward model's backbone, the actor, the reference."""
    reward_model: str = ""
    """ppo / grpo / rloo: the reward stage's checkpoint (frozen reward, and PPO's critic's initialisation)."""
    rule_reward: RuleRewardConfig = field(default_factory=RuleRewardConfig)
    """ppo / grpo / rloo without a reward model: a rule-based reward (PPO's critic then starts from `base`)."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """ppo / grpo / rloo: the weights of the model reward and of the rule rewards."""
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"hidden_dropout": 0.0, "attention_dropout": 0.0})
    """GLMConfig fields changed for training (dropout off: PPO's ratios need a deterministic policy)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sample_prompts: list[str] = field(default_factory=lambda: ["你好", "What can you do?"])
    """Answered by the exported policy (ppo, dpo) and logged to MLflow."""
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"RLHFConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.engine.tensor_parallel > 1:
            raise ConfigError(f"rlhf: engine.tensor_parallel {self.engine.tensor_parallel} is not supported (reward "
                              f"and value heads, PPO's and DPO's extra models are not sharded); use "
                              f"engine.tensor_parallel: 1")
        if self.mode in POLICY_GRADIENT and self.engine.grad_accum_steps != 1:
            raise ConfigError(f"{self.mode}: engine.grad_accum_steps must be 1 (use ppo.minibatches; the rollout batch "
                              "is engine.micro_batch_size prompts per worker)")

    def data_fingerprint(self, base_identity: str) -> str:
        """Hash of everything the prepared rows depend on (data config, layout, tokenizer)."""
        d = asdict(self.data)
        d.pop("output")
        layout = "prompts" if self.mode in POLICY_GRADIENT else "pairs"
        blob = json.dumps({"data": d, "layout": layout, "base": base_identity}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class RLHFChainConfig:
    """What the pipeline's rlhf stage runs: a reward model, then the policy (PPO, GRPO or RLOO
    against that reward model, or DPO, which needs none)."""

    policy: RLHFConfig
    """mode ppo, grpo, rloo or dpo; its output is the model the next stages take."""
    reward: RLHFConfig | None = None
    """mode reward; trained first and used as the policy's reward_model (PPO without one set)."""

    def __post_init__(self) -> None:
        if self.policy.mode not in (*POLICY_GRADIENT, "dpo"):
            raise ConfigError(f"rlhf.policy.mode must be one of {(*POLICY_GRADIENT, 'dpo')}, got {self.policy.mode!r}")
        if self.reward is not None and self.reward.mode != "reward":
            raise ConfigError(f"rlhf.reward.mode must be 'reward', got {self.reward.mode!r}")
